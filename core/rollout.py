"""Progressive rollout: the policy a spec declares, the split in force, and where a rollout stands (Dagster-free).

A spec's `deployment.rollout` is `direct` (a version that passes the gates becomes champion at once) or a list of
steps, each gated by an analysis of the live decisions it saw (assets/rollout.py):

```yaml
deployment:
  rollout:
    steps:
      - {mode: shadow, decisions: 1000}              # the challenger scores every request; only the champion answers
      - {mode: canary, share: 0.1, decisions: 300}   # 10% of requests answered by the challenger
      - {mode: canary, share: 0.5, decisions: 1000, min_outcomes: 100}
    analysis: {alpha: 0.05}                          # then promotion
```

`decisions` counts the challenger's own decisions in the step (scored in shadow, answered in canary);
`min_outcomes` the ones with an outcome reported, which the live AUC test needs before the step may advance.

The split in force is the newest control event of the serving chain (core/audit/serving_events.py): its mode,
share and challenger version. A spec with no event yet is served as its server config says (the spec's
`deployment.traffic`), the challenger then being whatever `@challenger` points to. During a rollout the challenger
is the version the rollout names, never the alias, which a newer registration moves before any gate has passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.audit.serving_events import ServingEvent

DIRECT = "direct"
ACTIVE_KINDS = ("rollout", "step", "hold")  # a rollout is under way while the newest control event is one of these


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RolloutStep(_Strict):
    """One step: who serves (shadow, or a canary share) and the evidence it needs before it may advance."""

    mode: Literal["shadow", "canary"]
    share: float | None = Field(None, gt=0, lt=1, description="canary: the share of requests @challenger answers")
    decisions: int = Field(ge=10, description="the challenger's decisions in this step (scored in shadow, answered "
                                              "in canary) before its analysis may advance it")
    min_outcomes: int = Field(0, ge=0, description="of those, how many need an outcome reported before the step "
                                                   "may advance (the live AUC test); 0: it may advance on the rest")

    @model_validator(mode="after")
    def _share(self) -> RolloutStep:
        if self.mode == "canary" and self.share is None:
            raise ValueError("a canary step needs a share (0 < share < 1), e.g. {mode: canary, share: 0.1, "
                             "decisions: 300}")
        if self.mode == "shadow" and self.share is not None:
            raise ValueError("a shadow step takes no share: the challenger scores every request, none is answered "
                             "by it")
        if self.min_outcomes > self.decisions:
            raise ValueError(f"min_outcomes ({self.min_outcomes}) is more than the step's decisions "
                             f"({self.decisions})")
        return self

    @property
    def label(self) -> str:
        return "shadow" if self.mode == "shadow" else f"canary{round((self.share or 0) * 100):g}"


class RolloutAnalysisSettings(_Strict):
    """What an analysis tests at, beside the compliance thresholds it shares with the gates (fairness:
    `max_demographic_parity_difference` and `min_group_size`; live AUC: `max_auc_regression`)."""

    alpha: float = Field(0.05, gt=0, lt=0.5, description="the significance level of every test")
    max_error_rate_increase: float = Field(0.01, ge=0, le=1, description="failed rows beyond the champion's rate "
                                                                          "that count as worse")
    max_slo_exceedance: float = Field(0.01, ge=0, lt=1, description="the share of the challenger's decisions that "
                                                                     "may take longer than deployment.slo_p99_ms "
                                                                     "(0.01: a p99 within the SLO)")


class RolloutPolicy(_Strict):
    """Steps, each gated by an analysis of its live decisions, then promotion."""

    steps: list[RolloutStep] = Field(min_length=1)
    analysis: RolloutAnalysisSettings = RolloutAnalysisSettings()




@dataclass(frozen=True)
class Split:
    """Who serves: `mode` with `share`, and the challenger version (None: the `@challenger` alias). `source` is the
    control event it comes from (None: the server config)."""

    mode: str
    share: float
    challenger: str | None
    source: int | None = None

    @property
    def needs_challenger(self) -> bool:
        return self.mode != "champion"


def split_in_force(event: ServingEvent | None, mode: str, share: float) -> Split:
    """The split a server applies: the newest control event's, else its config's."""
    if event is None:
        return Split(mode=mode, share=share, challenger=None)
    if event.mode in (None, "champion"):
        return Split(mode="champion", share=0.0, challenger=None, source=event.id)
    # An event without a challenger keeps the spec's own canary or shadow policy: its challenger is the alias.
    return Split(mode=event.mode, share=float(event.share or 0.0), challenger=event.challenger, source=event.id)


@dataclass(frozen=True)
class RolloutState:
    """A rollout under way: which version against which champion, at which step, held or not."""

    rollout: str
    champion: str
    challenger: str
    step: int  # 1-based
    mode: str
    share: float
    held: bool
    event: ServingEvent  # the newest control event

    def partition(self, policy: RolloutPolicy) -> str:
        return step_partition(self.rollout, self.step, policy.steps[self.step - 1])

    def is_last(self, policy: RolloutPolicy) -> bool:
        return self.step >= len(policy.steps)


def rollout_state(latest: ServingEvent | None) -> RolloutState | None:
    """The rollout under way, from the newest control event of the spec; None when there is none."""
    if latest is None or latest.kind not in ACTIVE_KINDS or not latest.rollout or not latest.challenger:
        return None
    return RolloutState(rollout=latest.rollout, champion=str(latest.champion), challenger=str(latest.challenger),
                        step=int(latest.step or 1), mode=str(latest.mode), share=float(latest.share or 0.0),
                        held=latest.kind == "hold", event=latest)


def rollout_id(version: str, earlier_rollouts_of_version: int) -> str:
    """`v3` for version 3's first rollout, `v3.2` for its second."""
    return f"v{version}" if not earlier_rollouts_of_version else f"v{version}.{earlier_rollouts_of_version + 1}"


def step_partition(rollout: str, step: int, definition: RolloutStep) -> str:
    """The analysis partition of one step: `<rollout>-<step>-<shadow|canaryNN>`, e.g. `v3-2-canary10`."""
    return f"{rollout}-{step}-{definition.label}"


def parse_partition(key: str) -> tuple[str, int]:
    """(rollout, step) of a step partition key; another shape is a ValueError naming it."""
    try:
        rollout, step, _ = key.rsplit("-", 2)
        return rollout, int(step)
    except ValueError:
        raise ValueError(f"{key!r} is not a rollout step partition (<rollout>-<step>-<shadow|canaryNN>)") from None


@dataclass(frozen=True)
class StepWindow:
    """The decisions one rollout step saw: those committed after `after_seq` and up to `last_seq` (None: the step is
    still in force), with the split of the control event that began it."""

    rollout: str
    step: int
    begun_by: ServingEvent
    after_seq: int
    last_seq: int | None
    ended_by: ServingEvent | None

    @property
    def champion(self) -> str:
        return str(self.begun_by.champion)

    @property
    def challenger(self) -> str:
        return str(self.begun_by.challenger)

    @property
    def mode(self) -> str:
        return str(self.begun_by.mode)


def _took_effect(events: list[ServingEvent], control: ServingEvent) -> int:
    """The decision seq after which a server served `control`'s split: its first `applied` event's `seq_at`, or the
    control event's own while no server has reported applying it yet."""
    for e in events:
        if e.kind == "applied" and e.id > control.id and e.evidence.get("control_event") == control.id:
            return e.seq_at
    return control.seq_at


def step_window(events: list[ServingEvent], rollout: str, step: int) -> StepWindow | None:
    """Where step `step` of `rollout` begins and ends among the decisions, from the spec's serving events (oldest
    first). A hold, or a resume of the same step, does not end it; anything else does."""
    begun = next((e for e in events if e.kind in ("rollout", "step") and e.rollout == rollout and e.step == step),
                 None)
    if begun is None:
        return None
    ended = next((e for e in events if e.id > begun.id and e.is_control
                  and not (e.rollout == rollout and e.step == step and e.kind in ("hold", "step"))), None)
    return StepWindow(rollout=rollout, step=step, begun_by=begun, after_seq=_took_effect(events, begun),
                      last_seq=None if ended is None else _took_effect(events, ended), ended_by=ended)
