"""The HTTP side of a replay: request bodies (core/protocol.py), a small JSON client with the optional bearer key,
sending rows at a rate with their decision ids written down, and reporting outcomes for those decisions."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core import protocol
from workloads.replay import ReplayError



def v2_request(rows: pd.DataFrame, numeric: Sequence[str], text_like: Sequence[str], request_id: str) -> dict:
    """An Open Inference Protocol v2 request in KServe's pandas codec (core/protocol.py): one tensor per column."""
    return protocol.v2_request(rows.to_dict("records"), numeric, text_like, request_id)


def v1_request(rows: pd.DataFrame, numeric: Sequence[str], text_like: Sequence[str]) -> dict:
    return protocol.v1_request(rows.to_dict("records"), numeric, text_like)


def decision_ids(protocol: str, body: dict, rows: int, url: str) -> list[str]:
    """The decision ids in a server's answer, one per row sent; raises naming the field that is wrong."""
    if protocol == "v2":
        outputs = body.get("outputs")
        if not isinstance(outputs, list):
            raise ReplayError(f"{url}: v2 response has no 'outputs' list (keys: {sorted(body)})")
        found = [o for o in outputs if isinstance(o, dict) and o.get("name") == "decision_id"]
        if not found:
            raise ReplayError(f"{url}: v2 response has no output tensor named 'decision_id' (outputs: "
                              f"{[o.get('name') for o in outputs if isinstance(o, dict)]}); the server must "
                              f"return one decision id per row")
        ids = found[0].get("data")
    else:
        ids = body.get("decision_ids")
        if ids is None and isinstance(body.get("predictions"), list):
            preds = body["predictions"]
            ids = [p.get("decision_id") if isinstance(p, dict) else None for p in preds]
        if ids is None or any(i is None for i in ids):
            raise ReplayError(f"{url}: v1 response carries no decision ids ('decision_ids', or 'decision_id' in "
                              f"each prediction); keys: {sorted(body)}")
    if not isinstance(ids, list) or len(ids) != rows:
        raise ReplayError(f"{url}: {len(ids) if isinstance(ids, list) else ids!r} decision ids for {rows} rows sent")
    return [str(i) for i in ids]


# --- HTTP ---------------------------------------------------------------------------------------------------


@dataclass
class Client:
    """A small JSON-over-HTTP client with the optional bearer key; errors say which URL answered what."""

    base_url: str
    api_key: str | None = None
    timeout: float = 30.0
    retries: int = 2
    sent: int = field(default=0)

    def post(self, path: str, body: dict) -> dict:
        url = self.base_url.rstrip("/") + path
        data = json.dumps(body, allow_nan=False).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = resp.read()
                self.sent += 1
                try:
                    return json.loads(payload or b"{}")
                except ValueError as exc:
                    raise ReplayError(f"{url}: answer is not JSON: {payload[:200]!r}") from exc
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:500].decode("utf-8", "replace")
                if exc.code in (401, 403):
                    raise ReplayError(f"{url}: HTTP {exc.code} {detail}; pass a key with the route's scope with "
                                      "--api-key, --api-key-file or $REPLAY_API_KEY (outcomes: the deployment's "
                                      "<home>/<spec>/deployment/operator.key)") from exc
                if exc.code >= 500 and attempt < self.retries:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise ReplayError(f"{url}: HTTP {exc.code} {detail}") from exc
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                if attempt < self.retries:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise ReplayError(f"{url}: cannot reach the server ({exc}); is it running?") from exc
        raise AssertionError("unreachable")


def _batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


@dataclass(frozen=True)
class SendSummary:
    rows: int
    requests: int
    seconds: float
    decisions_file: Path


def send(client: Client, model: str, frame: pd.DataFrame, numeric: Sequence[str], text_like: Sequence[str],
         decisions_path: Path, protocol: str = "v2", rate: float | None = None, batch: int = 1,
         outcome: pd.Series | None = None, row_ids: pd.Series | None = None) -> SendSummary:
    """Send every row of `frame`, `batch` rows per request, at `rate` rows per second (None: as fast as possible).

    Each answered row's decision id is appended to `decisions_path` (JSON lines: decision_id, row, outcome)
    and flushed at once, so a replay stopped half way keeps every decision it got.
    """
    if protocol not in ("v1", "v2"):
        raise ReplayError(f"protocol {protocol!r}: use v1 or v2")
    if batch < 1:
        raise ReplayError(f"batch {batch}: at least 1 row per request")
    if rate is not None and rate <= 0:
        raise ReplayError(f"rate {rate}: rows per second must be positive")
    missing = [c for c in [*numeric, *text_like] if c not in frame.columns]
    if missing:
        raise ReplayError(f"the data has no column(s) {missing} that the model takes")
    path = f"/v2/models/{model}/infer" if protocol == "v2" else f"/v1/models/{model}:predict"
    decisions_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    requests = 0
    with decisions_path.open("a") as out:
        for start, stop in _batches(len(frame), batch):
            if rate is not None:  # an absolute schedule: a slow answer is caught up, not added to every gap
                due = started + start / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            rows = frame.iloc[start:stop]
            body = (v2_request(rows, numeric, text_like, str(uuid.uuid4())) if protocol == "v2"
                    else v1_request(rows, numeric, text_like))
            answer = client.post(path, body)
            ids = decision_ids(protocol, answer, len(rows), client.base_url + path)
            requests += 1
            for k, did in enumerate(ids):
                pos = start + k
                line = {"decision_id": did, "row": None if row_ids is None else _jsonable(row_ids.iloc[pos])}
                if outcome is not None:
                    line["outcome"] = int(outcome.iloc[pos])
                out.write(json.dumps(line) + "\n")
            out.flush()
    return SendSummary(rows=len(frame), requests=requests, seconds=time.monotonic() - started,
                       decisions_file=decisions_path)


def _jsonable(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def read_decisions(path: Path) -> list[dict]:
    if not path.is_file():
        raise ReplayError(f"{path}: no decisions file; run `python -m workloads.replay send --decisions {path}` first")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise ReplayError(f"{path}:{n}: not JSON ({exc})") from exc
        if "decision_id" not in rec:
            raise ReplayError(f"{path}:{n}: no 'decision_id'")
        out.append(rec)
    return out


def report_outcomes(client: Client, model: str, decisions: list[dict], fraction: float = 1.0, seed: int = 0,
                    batch: int = 500) -> int:
    """POST the known outcomes of (a random `fraction` of) the decisions; returns how many were reported."""
    known = [d for d in decisions if d.get("outcome") is not None]
    if not known:
        raise ReplayError("no decision in the file has an outcome; send with a target column (--spec, or "
                          "--target-column and --positive) to record them")
    if not 0 < fraction <= 1:
        raise ReplayError(f"fraction {fraction} must be in (0, 1]")
    if fraction < 1:
        rng = np.random.default_rng(seed)
        keep = rng.choice(len(known), size=max(1, int(round(fraction * len(known)))), replace=False)
        known = [known[i] for i in sorted(keep)]
    for start, stop in _batches(len(known), batch):
        body = {"outcomes": [{"decision_id": d["decision_id"], "outcome": int(d["outcome"])}
                             for d in known[start:stop]]}
        client.post(f"/v2/models/{model}/outcomes", body)
    return len(known)

