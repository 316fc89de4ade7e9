"""Who serves, and the moves that change it: promotion, a rollout's steps, a hold, a rollback.

Each move changes the registry's aliases where it must (`champion`, `previous`; the challenger of a rollout is
named by the rollout, not by `@challenger`, which the next registration moves before any gate has passed) and
appends one control event to the audit store's serving chain (core/audit/serving_events.py) with the actor, the
reason, the evidence it rested on and the whole split after it. The servers apply the newest control event
(workloads/serving/split.py), so the record of who served is the same thing that decides who serves.

The moves are plain functions shared by `champion_model` (a version that passed its gates enters its rollout, or
is promoted at once under `rollout: direct`), the rollout jobs, the rollback job and the CLI
(`python -m orchestration.rollout`); each also rewrites the "History of traffic" of the versions it touches in
their compliance reports.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg

from assets.naming import CHALLENGER, CHAMPION, PREVIOUS
from assets.spec import PipelineSpec
from assets.notice_gate import follow_template
from core.audit import AuditStore
from core.audit.serving_events import ServingEvent
from core.rollout import (RolloutPolicy, RolloutState, rollout_id, rollout_state, split_in_force,
                          step_partition)
from resources.mlflow import MlflowResource
from resources.storage import StorageResource, atomic_write_bytes

HISTORY_TITLE = "History of traffic"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Move:
    """What a move did: the event it recorded, and the champion after it."""

    kind: str
    event: ServingEvent
    champion: str | None
    previous_champion: str | None
    text: str

    @property
    def changed_champion(self) -> bool:
        return self.champion != self.previous_champion


def policy_of(spec: PipelineSpec) -> RolloutPolicy | None:
    """The spec's rollout policy; None for `direct`."""
    return spec.deployment.rollout


def current_rollout(store: AuditStore, spec_name: str) -> RolloutState | None:
    return rollout_state(store.latest_serving_event(spec_name))


def expected_versions(spec: PipelineSpec, mlflow: MlflowResource, store: AuditStore) -> dict[str, str]:
    """The versions a server of `spec` serves once it has applied the split in force: the champion, and the
    challenger when the split has one (the rollout's version, or `@challenger` under the spec's own policy)."""
    champion = mlflow.alias_version(spec.name, CHAMPION)
    if champion is None:
        raise dg.Failure(f"{spec.name}: no model version has alias '{CHAMPION}' in the registry at "
                         f"{mlflow.shown_registry_uri()}; materialize {spec.name}/champion_model")
    expect = {CHAMPION: str(champion.version)}
    t = spec.deployment.traffic
    split = split_in_force(store.latest_serving_event(spec.name), t.mode, t.canary_share)
    if split.needs_challenger:
        if split.challenger:
            expect[CHALLENGER] = split.challenger
        else:
            alias = mlflow.alias_version(spec.name, CHALLENGER)
            if alias is not None:  # without one, the server answers with the champion alone
                expect[CHALLENGER] = str(alias.version)
    return expect


def _steady(spec: PipelineSpec) -> tuple[str, float | None]:
    """The split outside a rollout: the spec's `deployment.traffic` (its challenger is `@challenger`)."""
    t = spec.deployment.traffic
    return t.mode, (t.canary_share if t.mode == "canary" else None)


def _version(mlflow: MlflowResource, spec: str, alias: str) -> str | None:
    v = mlflow.alias_version(spec, alias)
    return None if v is None else str(v.version)


def promote_to(spec: PipelineSpec, mlflow: MlflowResource, store: AuditStore, version: str, actor: str, reason: str,
               evidence: dict[str, Any], promoted_by: str, rollout: str | None = None) -> Move:
    """`champion` -> `version` (the old champion becomes `previous`), on the registry and the serving chain."""
    current = _version(mlflow, spec.name, CHAMPION)
    client = mlflow.client()
    if current is not None and current != version:
        mlflow.set_alias(spec.name, PREVIOUS, current)
    mlflow.set_alias(spec.name, CHAMPION, version)
    follow_template(mlflow, spec.name, version)  # the notice template this version was checked with
    client.set_model_version_tag(spec.name, version, "promoted_at", _now())
    client.set_model_version_tag(spec.name, version, "promoted_by", promoted_by)
    mode, share = _steady(spec)
    event = store.record_serving_event(spec.name, "promote", actor, reason, mode=mode, share=share, champion=version,
                                       rollout=rollout, evidence=evidence)
    return Move("promote", event, version, current, f"champion v{current or 'none'} -> v{version}")


def enter(spec: PipelineSpec, mlflow: MlflowResource, store: AuditStore, version: str, actor: str, reason: str,
          evidence: dict[str, Any]) -> Move | None:
    """A version that passed its gates (or was approved over them) under a rollout policy starts its rollout at the
    first step. None where it is promoted at once instead: `rollout: direct`, or no champion to compare it with."""
    policy = policy_of(spec)
    champion = _version(mlflow, spec.name, CHAMPION)
    if policy is None or champion is None or champion == version:
        return None
    under_way = current_rollout(store, spec.name)
    if under_way is not None and under_way.challenger == version:
        return Move("rollout", under_way.event, champion, champion, f"v{version} is already in rollout "
                                                                     f"{under_way.rollout}")
    if under_way is not None:  # a newer version replaces the one under way: that rollout ends, recorded
        end_rollout(spec, mlflow, store, under_way, actor, f"superseded by v{version}, which passed its gates",
                    evidence)
    earlier = len({e.rollout for e in store.serving_events(spec.name, kinds=("rollout",)) if e.challenger == version})
    rid = rollout_id(version, earlier)
    first = policy.steps[0]
    event = store.record_serving_event(
        spec.name, "rollout", actor, reason, mode=first.mode, share=first.share, champion=champion,
        challenger=version, rollout=rid, step=1, evidence=evidence)
    return Move("rollout", event, champion, champion,
                f"rollout {rid} started: v{version} against champion v{champion}, step 1 of {len(policy.steps)} "
                f"({first.label}, {first.decisions} decisions)")


def advance(spec: PipelineSpec, mlflow: MlflowResource, store: AuditStore, actor: str, reason: str,
            evidence: dict[str, Any], resume: bool = False) -> Move:
    """The rollout under way to its next step, or, after its last, the challenger promoted. `resume`: a held
    rollout carries on at the step it holds (no step is skipped)."""
    policy, state = _policy_and_state(spec, store)
    step = state.step if resume else state.step + 1
    if step > len(policy.steps):
        move = promote_to(spec, mlflow, store, state.challenger, actor, reason, evidence,
                          promoted_by=f"rollout {state.rollout} ({actor})", rollout=state.rollout)
        return Move("promote", move.event, move.champion, move.previous_champion,
                    f"rollout {state.rollout} complete: {move.text}")
    nxt = policy.steps[step - 1]
    event = store.record_serving_event(
        spec.name, "step", actor, reason, mode=nxt.mode, share=nxt.share, champion=state.champion,
        challenger=state.challenger, rollout=state.rollout, step=step, evidence=evidence)
    return Move("step", event, state.champion, state.champion,
                f"rollout {state.rollout} {'resumed at' if resume else 'advanced to'} step {step} of "
                f"{len(policy.steps)}: {step_partition(state.rollout, step, nxt)}")


def promote_now(spec: PipelineSpec, mlflow: MlflowResource, store: AuditStore, actor: str, reason: str,
                evidence: dict[str, Any]) -> Move:
    """A person promotes the challenger of the rollout under way now, skipping the steps left."""
    _, state = _policy_and_state(spec, store)
    move = promote_to(spec, mlflow, store, state.challenger, actor, reason, {**evidence, "skipped_from": state.step},
                      promoted_by=f"{actor}, over rollout {state.rollout} at step {state.step}",
                      rollout=state.rollout)
    return Move("promote", move.event, move.champion, move.previous_champion,
                f"promoted by {actor} at step {state.step} of rollout {state.rollout}: {move.text}")


def hold(spec: PipelineSpec, mlflow: MlflowResource, store: AuditStore, actor: str, reason: str,
         evidence: dict[str, Any]) -> Move:
    """The rollout under way stays at its step: nothing advances it until a person does (a rollback on evidence of
    harm still happens)."""
    _, state = _policy_and_state(spec, store)
    event = store.record_serving_event(
        spec.name, "hold", actor, reason, mode=state.mode, share=state.share if state.mode == "canary" else None,
        champion=state.champion, challenger=state.challenger, rollout=state.rollout, step=state.step,
        evidence=evidence)
    return Move("hold", event, state.champion, state.champion, f"rollout {state.rollout} held at step {state.step}")


def end_rollout(spec: PipelineSpec, mlflow: MlflowResource, store: AuditStore, state: RolloutState, actor: str,
                reason: str, evidence: dict[str, Any]) -> Move:
    """The rollout under way ends without promotion: its challenger leaves the split (the champion keeps
    serving), the version is tagged as rolled back, and `@challenger` is cleared if it still names it."""
    mode, share = _steady(spec)
    event = store.record_serving_event(spec.name, "rollback", actor, reason, mode=mode, share=share,
                                       champion=state.champion, rollout=state.rollout, step=state.step,
                                       evidence={**evidence, "rolled_back": state.challenger})
    client = mlflow.client()
    for k, v in (("rolled_back_at", _now()), ("rolled_back_by", actor), ("rollback_reason", reason[:5000])):
        client.set_model_version_tag(spec.name, state.challenger, k, v)
    if _version(mlflow, spec.name, CHALLENGER) == state.challenger:
        client.delete_registered_model_alias(spec.name, CHALLENGER)
    return Move("rollback", event, state.champion, state.champion,
                f"rollout {state.rollout} rolled back at step {state.step}: v{state.challenger} out, champion "
                f"v{state.champion} answers every request")


def rollback(spec: PipelineSpec, mlflow: MlflowResource, store: AuditStore, actor: str, reason: str,
             evidence: dict[str, Any]) -> Move:
    """The rollback job's move: during a rollout, the rollout ends (its challenger out); otherwise `champion` goes
    back to `previous`. Both record who and why on the version rolled back and on the serving chain."""
    state = current_rollout(store, spec.name)
    if state is not None:
        return end_rollout(spec, mlflow, store, state, actor, reason, evidence)
    current, previous = _version(mlflow, spec.name, CHAMPION), _version(mlflow, spec.name, PREVIOUS)
    if previous is None:
        raise dg.Failure(f"{spec.name}: there is no '{PREVIOUS}' version to roll back to and no rollout under way; "
                         f"champion stays at {current or 'none'}")
    mlflow.set_alias(spec.name, CHAMPION, previous)
    follow_template(mlflow, spec.name, previous)
    client = mlflow.client()
    client.delete_registered_model_alias(spec.name, PREVIOUS)
    if current is not None:
        for k, v in (("rolled_back_at", _now()), ("rolled_back_by", actor), ("rollback_reason", reason[:5000])):
            client.set_model_version_tag(spec.name, current, k, v)
    mode, share = _steady(spec)
    event = store.record_serving_event(spec.name, "rollback", actor, reason, mode=mode, share=share,
                                       champion=previous, evidence={**evidence, "rolled_back": current})
    return Move("rollback", event, previous, current, f"champion v{current or 'none'} -> v{previous}")


def _policy_and_state(spec: PipelineSpec, store: AuditStore) -> tuple[RolloutPolicy, RolloutState]:
    policy = policy_of(spec)
    state = current_rollout(store, spec.name)
    if state is None:
        raise dg.Failure(f"{spec.name}: no rollout is under way (the newest serving event is "
                         f"{_describe(store.latest_serving_event(spec.name))}); nothing to advance, promote or hold")
    if policy is None:
        raise dg.Failure(f"{spec.name}: rollout {state.rollout} is under way but the spec's deployment.rollout is "
                         "'direct' now: roll it back, or give the spec its steps again")
    if state.step > len(policy.steps):
        raise dg.Failure(f"{spec.name}: rollout {state.rollout} is at step {state.step} but deployment.rollout has "
                         f"{len(policy.steps)} steps now: promote or roll back by hand")
    return policy, state


def _describe(e: ServingEvent | None) -> str:
    return "none" if e is None else f"{e.kind} by {e.actor} at {e.time}"


# --- the compliance report's history of traffic ---------------------------------------------------------------


def traffic_history(store: AuditStore, spec_name: str, version: str) -> list[ServingEvent]:
    """Every control event that put `version` into the split, moved it, or took it out."""
    out = []
    for e in store.serving_events(spec_name, kinds=("promote", "rollout", "step", "hold", "rollback", "traffic")):
        if version in (e.champion, e.challenger) or e.evidence.get("rolled_back") == version:
            out.append(e)
    return out


def history_lines(events: list[ServingEvent], version: str) -> list[str]:
    lines = []
    for e in events:
        role = "challenger" if e.challenger == version else "champion" if e.champion == version else "left the split"
        evidence = ", ".join(f"{k} {v}" for k, v in e.evidence.items() if k in ("run_id", "analysis", "verdict"))
        lines.append(f"{e.time}: {e.kind} by {e.actor} (serving event {e.id}): v{version} {role}; "
                     f"{e.split_text()}. Reason: {e.reason[:400]}" + (f" Evidence: {evidence}." if evidence else ""))
    return lines


def write_history(storage: StorageResource, spec_name: str, version: str, store: AuditStore) -> Path | None:
    """Rewrite the "History of traffic" section of `version`'s compliance report (Markdown and HTML)."""
    folder = Path(storage.home) / spec_name / "compliance" / f"v{version}"
    md, page = folder / "report.md", folder / "report.html"
    if not md.is_file():
        return None
    lines = history_lines(traffic_history(store, spec_name, version), version) or ["never served"]
    text = md.read_text().split(f"\n## {HISTORY_TITLE}\n", 1)[0].rstrip() + "\n"
    text += f"\n## {HISTORY_TITLE}\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"
    atomic_write_bytes(md, text.encode())
    if page.is_file():
        doc = page.read_text()
        marker = f"<h2>{HISTORY_TITLE}</h2>"
        head = doc.split(marker, 1)[0].replace("</body></html>", "").rstrip()
        block = marker + "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"
        atomic_write_bytes(page, (head + block + "</body></html>\n").encode())
    return md


def record_history(storage: StorageResource, spec_name: str, store: AuditStore, *versions: str | None) -> None:
    for v in {v for v in versions if v}:
        write_history(storage, spec_name, v, store)
