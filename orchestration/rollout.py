"""A person in charge of a rollout, from the command line; and who served when.

    python -m orchestration.rollout <spec>                       where the rollout stands: its steps, each step's
                                                                 analysis (verdict and figures), the split in force
    python -m orchestration.rollout <spec> promote  --actor A --reason R   the challenger now, the steps left skipped
    python -m orchestration.rollout <spec> hold     --actor A --reason R   no automatic advance until a person acts
    python -m orchestration.rollout <spec> resume   --actor A --reason R   carry on a held rollout at its step
    python -m orchestration.rollout <spec> advance  --actor A --reason R   to the next step now
    python -m orchestration.rollout <spec> rollback --actor A --reason R   the challenger out (or, with no rollout
                                                                           under way, champion back to previous)

Each move runs the same Dagster job the rollout sensor and the UI's Launchpad run (`<spec>__promote`, `__hold`,
`__rollout_step`, `__rollback`), in this process on the instance (`$DAGSTER_HOME`, else `<home>/dagster`), so it is
a run on record with its actor and reason, and an event on the audit store's serving chain.
`python -m orchestration.decisions --served-at <time>` answers who served at a moment (`served_at` below).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from assets import naming
from core.audit.serving_events import CONTROL_KINDS, ServingEvent

JOBS = {"promote": ("promote", "promote_challenger", {}), "hold": ("hold", "hold_rollout", {}),
        "resume": ("rollout_step", "advance_rollout", {"resume": True}),
        "advance": ("rollout_step", "advance_rollout", {}), "rollback": ("rollback", "rollback_champion", {})}


def utc_text(value: str) -> str:
    """Any ISO-8601 time as the UTC text the audit store writes (naive: UTC)."""
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise SystemExit(f"--served-at {value!r}: not an ISO-8601 time (e.g. 2026-03-03T12:00, UTC unless it says "
                         "otherwise)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _evidence_text(e: ServingEvent) -> str:
    keys = ("analysis", "analysis_run", "verdict", "run_id", "job", "approved_by", "rolled_back", "note")
    parts = [f"{k} {e.evidence[k]}" for k in keys if e.evidence.get(k)]
    checks = e.evidence.get("checks")
    if isinstance(checks, dict) and checks:
        parts.append("checks " + ", ".join(f"{k} {v}" for k, v in sorted(checks.items())))
    gates = e.evidence.get("gates")
    if isinstance(gates, dict) and gates:
        parts.append("gates " + ", ".join(f"{k} {'passed' if v else 'FAILED'}" for k, v in sorted(gates.items())))
    return "; ".join(parts) or "none recorded"


def served_at(store: Any, spec: str, when: str) -> list[str]:
    """Who served `spec` at `when` (UTC text): the split in force then, the event that set it (actor, reason,
    evidence), the servers that had applied it, and the decisions of the minutes around it as a cross-check."""
    lines = [f"{spec} at {when}:"]
    events = store.serving_events(spec, until=when)
    control = next((e for e in reversed(events) if e.kind in CONTROL_KINDS), None)
    if control is None:
        lines.append("  no serving event before then (a store older than the serving chain, or nothing served yet)")
    else:
        held = " (held)" if control.kind == "hold" else ""
        lines.append(f"  split: {control.split_text()}{held}")
        where = f", rollout {control.rollout} step {control.step}" if control.rollout else ""
        lines.append(f"  set by serving event {control.id}: {control.kind} by {control.actor} at {control.time}"
                     f"{where}")
        lines.append(f"    reason: {control.reason[:600]}")
        lines.append(f"    evidence: {_evidence_text(control)}")
        applied = {}
        for e in events:
            if e.kind == "applied" and e.evidence.get("control_event") == control.id:
                applied.setdefault(e.actor, e)
        for actor, e in applied.items():
            lines.append(f"  applied by {actor} at {e.time}: its decisions after seq {e.seq_at} are of this split")
        if not applied:
            lines.append("  no server had reported applying it yet (a server takes a split up at its next request)")
    t = datetime.fromisoformat(when.replace("Z", "+00:00"))
    around = store.find(spec=spec, since=(t - timedelta(minutes=5)).isoformat(),
                        until=(t + timedelta(minutes=5)).isoformat(), limit=5000)
    seen = Counter((r.variant, r.model_version) for r in around)
    if seen:
        lines.append("  decisions within 5 minutes: " + ", ".join(f"{v} v{ver} {n}" for (v, ver), n in
                                                                    sorted(seen.items())))
    return lines


def status(store: Any, instance: Any, spec_name: str, out=sys.stdout) -> int:
    """The split in force, the rollout under way, and each of its steps' latest analysis."""
    import dagster as dg

    from assets.rollout_analysis import AnalysisRecord
    from core.rollout import rollout_state

    w = out.write
    latest = store.latest_serving_event(spec_name)
    if latest is None:
        w(f"{spec_name}: no serving event yet (served as the spec's deployment.traffic says)\n")
        return 0
    w(f"{spec_name}: {latest.split_text()} (serving event {latest.id}: {latest.kind} by {latest.actor} at "
      f"{latest.time})\n")
    state = rollout_state(latest)
    if state is None:
        w("  no rollout under way\n")
        return 0
    w(f"  rollout {state.rollout}: v{state.challenger} against champion v{state.champion}, step {state.step}"
      f"{' (held)' if state.held else ''}\n")
    if instance is None:
        return 0
    key = naming.asset_key(spec_name, naming.ROLLOUT_ANALYSIS)
    for p in sorted(k for k in instance.get_dynamic_partitions(f"{spec_name}__rollout_steps")
                    if k.startswith(f"{state.rollout}-")):
        found = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[p]),
                                                limit=1).records
        if not found:
            w(f"  {p}: not analysed yet\n")
            continue
        record = AnalysisRecord.from_metadata(found[0].asset_materialization.metadata, p)
        w(f"  {p}: {record.verdict}: {record.reason[:600]}\n")
    return 0


def _instance(home: str):
    import dagster as dg

    os.environ.setdefault("DAGSTER_HOME", str(Path(home) / "dagster"))
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.get()


def move(spec: str, action: str, actor: str, reason: str, evidence: str = "", instance=None) -> int:
    """Run the move's job in this process on the instance; prints what it did."""
    from orchestration.definitions import build_definitions

    kind, op, extra = JOBS[action]
    defs = build_definitions()
    job = defs.resolve_job_def(naming.job_name(spec, kind))
    config = {"actor": actor, "reason": reason, "evidence": evidence, **extra}
    result = job.execute_in_process(run_config={"ops": {f"{spec}__{op}": {"config": config}}},
                                    instance=instance, raise_on_error=False)
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            print(f"rollout: {action} failed: {event.event_specific_data.error.message.strip()}", file=sys.stderr)
            return 1
    for event in result.all_events:
        if event.event_type_value == "ASSET_OBSERVATION":
            meta = event.event_specific_data.asset_observation.metadata
            print(f"{spec}: {meta['what'].value} (serving event {meta['serving_event'].value}, run {result.run_id})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.rollout", description=__doc__.split("\n")[0])
    parser.add_argument("spec")
    parser.add_argument("action", nargs="?", choices=["status", *JOBS], default="status")
    parser.add_argument("--actor", help="who (required for a move)")
    parser.add_argument("--reason", help="why (required for a move)")
    parser.add_argument("--evidence", default="", help="what it rests on (free text)")
    args = parser.parse_args(argv)
    from dataclasses import replace

    from resources import resources_for
    from resources.settings import Settings

    res = resources_for(replace(Settings.from_env(), deployment="local"))
    instance = _instance(res["storage"].home)
    if args.action == "status":
        return status(res["audit"].store(), instance, args.spec)
    if not (args.actor and args.actor.strip() and args.reason and args.reason.strip()):
        parser.error(f"{args.action} needs --actor and --reason: who moves the split and why go on the record")
    return move(args.spec, args.action, args.actor, args.reason, args.evidence, instance)


if __name__ == "__main__":
    sys.exit(main())
