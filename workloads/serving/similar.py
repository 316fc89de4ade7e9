"""Similar cases: the ids of the training rows whose text is nearest each request's, from the spec's vector index.

The index is the LanceDB table that `<spec>/vector_index` writes (layout of resources/vectors.py) for the spec's
first text column; it is re-read when its table version changes. Up to `IN_MEMORY_ROWS` rows its vectors are
held in memory and searched with one matrix product per batch (exact cosine, milliseconds); above that, each
text is an approximate nearest-neighbour query to LanceDB. Texts are embedded by the served version's own
encoder and answers are cached by text, at most CACHE_BYTES of them (least recently used out first).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from core.server_config import ServerConfig
from workloads.serving.versions import ServedVersion

log = logging.getLogger("intelligentops.serving")


class SimilarCases:
    """Nearest training cases by text, for a spec with a text feature and `similar_cases` > 0."""

    IN_MEMORY_ROWS = 200_000
    CACHE_BYTES = 16 * 1024 * 1024  # answers kept, by text: bounded in bytes, least recently used out first
    ENTRY_OVERHEAD = 200
    RECHECK_SECONDS = 30

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.cache: OrderedDict[str, list[str]] = OrderedDict()
        self.cache_bytes = 0
        self._index: dict[str, Any] | None = None

    def _size(self, text: str, ids: list[str]) -> int:
        return len(text.encode("utf-8", "surrogatepass")) + sum(len(i) + 50 for i in ids) + self.ENTRY_OVERHEAD

    def _remember(self, text: str, ids: list[str]) -> None:
        if text in self.cache:
            self.cache_bytes -= self._size(text, self.cache.pop(text))
        self.cache[text] = ids
        self.cache_bytes += self._size(text, ids)
        while self.cache_bytes > self.CACHE_BYTES and self.cache:
            old, old_ids = self.cache.popitem(last=False)
            self.cache_bytes -= self._size(old, old_ids)

    def index(self) -> dict[str, Any]:
        """The spec's vector index for its first text column, re-read when its table version changes (checked at
        most every RECHECK_SECONDS); empty when there is none."""
        now = time.monotonic()
        cached = self._index
        if cached is not None and now - cached.get("checked", 0) < self.RECHECK_SECONDS:
            return cached
        manifest = Path(self.cfg.vector_db or "") / "manifest.json"
        if not (self.cfg.text and self.cfg.similar_cases and manifest.is_file()):
            if self.cfg.text and self.cfg.similar_cases and cached is None:
                log.warning("%s: no vector index at %s; decisions carry no similar cases", self.cfg.spec, manifest)
            self._index = {"checked": now}
            return self._index
        import lancedb
        import numpy as np

        columns = json.loads(manifest.read_text()).get("columns", {})
        col = next((c for c in self.cfg.text if c in columns), None)
        if col is None:
            self._index = {"checked": now}
            return self._index
        table = lancedb.connect(str(manifest.parent)).open_table(columns[col])
        if cached is not None and cached.get("version") == table.version and cached.get("column") == col:
            cached["checked"] = now
            return cached
        index: dict[str, Any] = {"checked": now, "version": table.version, "column": col, "table": table}
        if table.count_rows() <= self.IN_MEMORY_ROWS:
            data = table.to_arrow().select(["row_id", "vector"])
            vectors = np.asarray(data.column("vector").combine_chunks().flatten(), dtype=np.float32)
            vectors = vectors.reshape(data.num_rows, -1)
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            index["matrix"] = vectors / np.where(norms > 0, norms, 1.0)
            index["row_ids"] = np.asarray(data.column("row_id").to_pylist(), dtype=object)
        self.cache.clear()
        self.cache_bytes = 0
        self._index = index
        return index

    def lookup(self, version: ServedVersion, rows: list[dict[str, Any]]) -> list[list[str]]:
        """Row ids of the training cases whose text is nearest each row's, cached by text."""
        import numpy as np

        index = self.index()
        embed = getattr(version.python_model, "_embed", None)
        if "column" not in index or embed is None:
            return [[] for _ in rows]
        col, k = index["column"], self.cfg.similar_cases
        texts = ["" if r.get(col) is None else str(r[col]).strip() for r in rows]
        found = {t: self.cache.get(t) for t in set(texts) if t}
        for t, ids in found.items():
            if ids is not None:
                self.cache.move_to_end(t)
        todo = sorted(t for t, ids in found.items() if ids is None)
        if todo:
            vectors = np.asarray(embed(todo), dtype=np.float32)  # the model caches these for its own use too
            if "matrix" in index:
                norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                scores = (vectors / np.where(norms > 0, norms, 1.0)) @ index["matrix"].T
                top = np.argsort(-scores, axis=1)[:, :k]
                answers = [[str(r) for r in index["row_ids"][t]] for t in top]
            else:
                answers = [[str(f["row_id"]) for f in index["table"].search(list(map(float, v)),
                                                                           vector_column_name="vector")
                          .distance_type("cosine").limit(k).select(["row_id"]).to_list()] for v in vectors]
            for text, ids in zip(todo, answers):
                found[text] = ids
                self._remember(text, ids)
        return [found.get(t) or [] if t else [] for t in texts]
