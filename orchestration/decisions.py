"""Why was this applicant refused? One decision traced back to the model version, its gates and its data.

    python -m orchestration.decisions <decision-id>          the decision, its model version, report, gates, data
    python -m orchestration.decisions --verify               check the audit log's chains, MACs and checkpoints;
                                                             exit 1 and name the first bad seq if broken
    python -m orchestration.decisions <decision-id> --outcome 1 [--reason "..."]
                                                             record what really happened (1: positive class); a
                                                             different outcome than the one on record needs a reason
    python -m orchestration.decisions --find [--spec S] [--since 2026-01-01T00:00] [--until ...]
                                             [--version 3] [--variant champion|canary|shadow] [--limit 20]

Reads the audit log (`$INTELLIGENTOPS_AUDIT_URL`, else SQLite under `$INTELLIGENTOPS_HOME`) with its keys
(`$INTELLIGENTOPS_KEYS_DIR`, else `<home>/keys`: `audit-enc.key` to show an applicant's fields, `audit-mac.key` to
verify), the MLflow registry (the version's lineage tags and run) and the Dagster instance (`$DAGSTER_HOME`, else
`<home>/dagster`: the compliance report's materialization and gate results for that version, the training data's
materialization, and the chain heads `<spec>/inference_log` checkpointed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from assets import naming
from assets.audit_anchors import inference_log_anchors
from core.audit import OUTCOME_RULES, AuditError, AuditKeyError


def _resources() -> dict[str, Any]:
    from dataclasses import replace

    from resources import resources_for
    from resources.settings import Settings

    # The lookup reads this machine's view of the stores: the local resources, whatever the deployment.
    return resources_for(replace(Settings.from_env(), deployment="local"))


def _instance(home: str):
    import dagster as dg

    os.environ.setdefault("DAGSTER_HOME", str(Path(home) / "dagster"))
    if not Path(os.environ["DAGSTER_HOME"]).is_dir():
        return None
    try:
        return dg.DagsterInstance.get()
    except Exception:
        return None


def _materializations(instance, spec: str, asset: str, limit: int = 50) -> list[Any]:
    import dagster as dg

    if instance is None:
        return []
    result = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=naming.asset_key(spec, asset)),
                                             limit=limit)
    return [r.asset_materialization for r in result.records if r.asset_materialization is not None]


def _meta_value(meta: dict[str, Any], key: str) -> Any:
    v = meta.get(key)
    return getattr(v, "value", v)


def _gate_results(instance, spec: str, version: str) -> dict[str, tuple[bool, str]]:
    """Each compliance gate's latest result for this model version, from the instance's check history."""
    import dagster as dg

    if instance is None:
        return {}
    key = naming.asset_key(spec, naming.COMPLIANCE_REPORT)
    out: dict[str, tuple[bool, str]] = {}
    for m in _materializations(instance, spec, naming.COMPLIANCE_REPORT):
        if str(_meta_value(m.metadata, "model_version")) != version:
            continue
        break
    else:
        return {}
    names = ("fairness", "performance", "explainability", "robustness", "data_governance", "integrity",
             "documentation")
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(key, n) for n in names])
    for check_key, rec in records.items():
        evaluation = rec.event.dagster_event.event_specific_data if rec and rec.event and rec.event.dagster_event \
            else None
        if evaluation is None:
            continue
        mv = evaluation.metadata.get("model_version")
        if mv is not None and str(mv.value) == version:
            out[check_key.name] = (bool(evaluation.passed), evaluation.description or "")
    return out


def explain_decision(decision_id: str, out=sys.stdout) -> int:
    res = _resources()
    store = res["audit"].store()
    rec = store.get(decision_id)
    if rec is None:
        print(f"no decision {decision_id!r} in the audit log at {store.location()}", file=sys.stderr)
        return 1
    w = out.write
    w(f"decision {rec.decision_id}\n")
    w(f"  time: {rec.time}   spec: {rec.spec}   variant: {rec.variant}   caller key id: {rec.key_id or '-'}\n")
    verdict = "POSITIVE (flagged)" if rec.decision == 1 else "negative (not flagged)"
    w(f"  decision: {rec.decision} = {verdict}: probability {rec.probability:.4f} against the operating threshold "
      f"{rec.threshold:.4f}\n")
    w(f"  model: {rec.model_name}   model version: {rec.model_version}   latency {rec.latency_ms:.1f} ms\n")
    sealed = None
    try:
        inputs, factors = dict(rec.inputs.items()), list(rec.top_factors)
    except AuditKeyError as exc:  # encrypted, and this reader does not hold audit-enc.key: say so, show the rest
        sealed, inputs, factors = str(exc), {}, []
        w(f"  inputs and top factors: encrypted, not shown: {sealed}\n")
    if sealed is None:
        w("  inputs:\n")
        for k, v in inputs.items():
            w(f"    {k}: {v!r}\n")
        w("  top factors (how far the score moves when the feature is set to a typical value):\n")
        for f in factors:
            w(f"    {f.get('feature')}: value {f.get('value')!r}, contribution {f.get('contribution'):+.4f}\n")
    if rec.similar_cases:
        w(f"  similar past cases (row ids in the training data): {', '.join(rec.similar_cases)}\n")
    history = store.outcome_history(rec.decision_id)
    if not history:
        w("  observed outcome: not recorded\n")
    for e in history:
        kind = f"correction: {e.reason}" if e.correction else (f"reason: {e.reason}" if e.reason else "report")
        w(f"  observed outcome: {e.outcome} at {e.at} by key {e.key_id or '-'} ({kind}; outcome event {e.id})\n")
    if len(history) > 1:
        labels = {rule: store.outcomes([rec.decision_id], rule=rule).get(rec.decision_id, "none (disputed)")
                  for rule in OUTCOME_RULES}
        w(f"  label by rule: {', '.join(f'{k}: {v}' for k, v in labels.items())}\n")
    w(f"  audit record: seq {rec.seq}, record hash {rec.record_hash[:16]}..., input hash {rec.input_hash[:16]}...\n")

    mlflow = res["mlflow"]
    w(f"\nmodel version {rec.model_version} of {rec.model_name} ({mlflow.resolved_tracking_uri()})\n")
    try:
        mv = mlflow.client().get_model_version(rec.model_name, rec.model_version)
        tags = dict(mv.tags or {})
        w(f"  MLflow run: {mv.run_id}\n")
        for t in naming.LINEAGE_TAGS:
            w(f"  {t}: {tags.get(t, '-')}\n")
        for t in ("operating_threshold", "promoted_at", "promoted_by", "approved_by", "approval_reason",
                  "overridden_gates", "rolled_back_by"):
            if t in tags:
                w(f"  {t}: {tags[t]}\n")
    except Exception as exc:
        tags = {}
        w(f"  (the registry has no such version: {exc})\n")

    home = res["storage"].home
    report = Path(home) / rec.spec / "compliance" / f"v{rec.model_version}" / "report.md"
    w(f"  compliance report: {report if report.is_file() else f'{report} (not written)'}\n")
    instance = _instance(home)
    gates = _gate_results(instance, rec.spec, rec.model_version)
    if gates:
        w("  gates for this version:\n")
        for name, (passed, text) in sorted(gates.items()):
            w(f"    {name}: {'passed' if passed else 'FAILED'}: {text.splitlines()[0] if text else ''}\n")
    else:
        w("  gates for this version: no compliance_report check results in the Dagster instance\n")

    w("\ntraining data behind it\n")
    dataset_hash = tags.get("dataset_hash")
    w(f"  validated snapshot hash: {dataset_hash or '-'}\n")
    for m in _materializations(instance, rec.spec, naming.VALIDATED_DATASET):
        if dataset_hash and _meta_value(m.metadata, "content_hash") == dataset_hash:
            w(f"  rows: {_meta_value(m.metadata, 'dagster/row_count')} (raw snapshot "
              f"{str(_meta_value(m.metadata, 'raw_hash'))[:16]}..., "
              f"{_meta_value(m.metadata, 'rows_set_aside')} rows set aside)\n")
            break
    for m in _materializations(instance, rec.spec, naming.MODEL_CHECKPOINT):
        if tags.get("checkpoint_sha256") and _meta_value(m.metadata, "weights_sha256") == tags["checkpoint_sha256"]:
            w(f"  trained on {_meta_value(m.metadata, 'train_rows')} rows, validated on "
              f"{_meta_value(m.metadata, 'val_rows')}; splits hash {tags.get('splits_hash', '-')}\n")
            break
    if sealed is not None:
        print(f"the applicant's fields could not be shown: {sealed}", file=sys.stderr)
        return 1
    return 0


def verify(out=sys.stdout) -> int:
    res = _resources()
    store = res["audit"].store()
    anchors = inference_log_anchors(_instance(res["storage"].home))
    check = store.verify(anchors=anchors)
    w = out.write
    where = f"the audit log at {store.location()}"
    found = f"{check.checked} records, {check.outcome_events_checked} outcome events"
    sources = f"{check.checkpoints_checked} checkpoints (the file {store.checkpoint_path or '-'} and " \
              f"{len(anchors)} from inference_log materializations)"
    if check.ok:
        w(f"{where} verifies: {found}, {sources}\n")
    else:
        w(f"{where} does NOT verify ({found} checked, {sources}):\n")
        if check.first_bad_seq is not None:
            w(f"  FIRST BAD SEQ: {check.first_bad_seq}\n")
        if check.first_bad_outcome_event is not None:
            w(f"  FIRST BAD OUTCOME EVENT: {check.first_bad_outcome_event}\n")
        for p in check.problems:
            w(f"  {p}\n")
    for rule in check.rules:
        w(f"  rule: {rule}\n")
    return 0 if check.ok else 1


def find(args: argparse.Namespace, out=sys.stdout) -> int:
    store = _resources()["audit"].store()
    found = store.find(spec=args.spec, since=args.since, until=args.until, model_version=args.version,
                       variant=args.variant, limit=args.limit)
    for r in found:
        out.write(f"{r.time}  {r.decision_id}  {r.spec} v{r.model_version} {r.variant:8s} decision {r.decision} "
                  f"p={r.probability:.3f}\n")
    if not found:
        out.write("no decisions match\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.decisions", description=__doc__.split("\n")[0])
    parser.add_argument("decision_id", nargs="?", help="the decision id an answer carried")
    parser.add_argument("--verify", action="store_true", help="verify the audit log's hash chain")
    parser.add_argument("--find", action="store_true", help="list decisions matching the filters, newest first")
    parser.add_argument("--spec")
    parser.add_argument("--since", help="ISO-8601 time, UTC unless it says otherwise")
    parser.add_argument("--until")
    parser.add_argument("--version", help="model version")
    parser.add_argument("--variant", choices=["champion", "canary", "shadow"])
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the audit record as JSON")
    parser.add_argument("--outcome", type=int, choices=[0, 1],
                        help="record what really happened for the decision (1: the positive class); the drift "
                             "report's live metrics read it")
    parser.add_argument("--reason", help="why: needed when the outcome corrects the one on record")
    args = parser.parse_args(argv)
    if not (args.decision_id or args.verify or args.find):
        parser.error("give a decision id, --verify or --find")
    try:
        if args.verify:
            return verify()
        if args.find:
            return find(args)
        if args.outcome is not None:
            store = _resources()["audit"].store()
            event = store.record_outcome(args.decision_id, args.outcome, reason=args.reason, key_id=cli_key_id())
            print(f"recorded outcome {args.outcome} for decision {args.decision_id} (outcome event {event}, key id "
                  f"{cli_key_id()})")
            return 0
        if args.json:
            from dataclasses import asdict

            rec = _resources()["audit"].store().get(args.decision_id)
            if rec is None:
                print(f"no decision {args.decision_id!r}", file=sys.stderr)
                return 1
            print(json.dumps(asdict(rec), indent=2))
            return 0
        return explain_decision(args.decision_id)
    except AuditError as exc:  # unknown decision, a correction without a reason, a key the log needs
        print(f"decisions: {exc}", file=sys.stderr)
        return 1


def cli_key_id() -> str:
    """Who records an outcome from this command line: `cli:<user>` on the outcome chain."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


if __name__ == "__main__":
    sys.exit(main())
