"""`<spec>/inference_log` on a real instance: it checkpoints the chain heads outside the store (so a truncation
that also wiped the checkpoint file is still named by `--verify`), and flags a key whose outcome reports
contradict the model far beyond its measured error, naming it, while a normal key is not."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import dagster as dg
import pytest
from audit_support import cli, head_row, truncate_and_restore_head
from support import copy_shipped, materialize

from core.audit import ANCHOR_METADATA, OutcomeReport
from orchestration.definitions import build_definitions

SPEC = "credit_scoring"


@pytest.fixture
def defs(pipelines: Path, home: Path) -> dg.Definitions:
    copy_shipped(pipelines, SPEC)
    return build_definitions(pipelines)


def decisions(n: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        p = rng.choice([0.02, 0.05, 0.1, 0.9, 0.95])
        out.append({"decision_id": uuid.uuid4().hex, "spec": SPEC, "model_name": SPEC, "model_version": "1",
                    "variant": "champion", "inputs": {"Income": 100.0 + i}, "probability": p,
                    "decision": int(p >= 0.5), "threshold": 0.5})
    return out


def inference_log(defs: dg.Definitions, instance) -> dict:
    """The materialization's metadata, and the run's log lines under "log"."""
    done = materialize(defs, instance, f'key:"{SPEC}/inference_log"')
    assert done.success
    (event,) = done.asset_materializations_for_node(f"{SPEC}__inference_log")
    logs = [e.user_message for e in instance.all_logs(done.run_id)]
    return {**{k: v.value for k, v in event.metadata.items()}, "log": logs}


def test_inference_log_checkpoints_the_heads_and_verify_reads_them_back(defs, instance, home: Path):
    store = defs.resources["audit"].store()
    rng = random.Random(1)
    store.append(decisions(40, rng))
    saved = head_row(store)
    store.append(decisions(40, rng))
    meta = inference_log(defs, instance)
    anchor = meta[ANCHOR_METADATA]
    assert meta["chain_verified"] and anchor["decisions"]["seq"] == 80 == meta["chain_head_seq"]
    assert anchor["decisions"]["mac"] and anchor["decisions"]["key_id"] == store.keys.mac_id
    assert any("keyed rule" in line for line in meta["chain_rules"].splitlines())

    # The insider truncates the store, puts the old head back and wipes the checkpoint file beside it.
    store.flush_checkpoints()
    truncate_and_restore_head(store, saved)
    store.checkpoint_path.write_text("")
    out = cli(home, "--verify")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FIRST BAD SEQ: 41" in out.stdout and f"{SPEC}/inference_log materialization" in out.stdout
    assert "seq 41..80 missing at the end of the decisions chain" in out.stdout
    # A broken chain is reported and never vouched for by a new checkpoint.
    broken = inference_log(defs, instance)
    assert not broken["chain_verified"] and ANCHOR_METADATA not in broken


def test_a_contradicting_outcome_burst_from_one_key_is_flagged_and_left_out_of_training(defs, instance):
    store = defs.resources["audit"].store()
    rng = random.Random(7)
    served = store.append(decisions(400, rng))
    honest = [OutcomeReport(r.decision_id, int(rng.random() < r.probability)) for r in served[:200]]
    poisoned = [OutcomeReport(r.decision_id, 1 - r.decision) for r in served[200:260]]  # every one contradicts
    store.record_outcomes(honest, key_id="lender")
    store.record_outcomes(poisoned, key_id="mallory")
    meta = inference_log(defs, instance)
    assert meta["flagged_outcome_keys"] == ["mallory"]
    table = meta["outcome_keys"]
    assert "| mallory | 60 | 60 | 60 | 100.0% |" in table and "**yes**" in table
    assert "| lender | 200 |" in table and table.count("**yes**") == 1
    assert any("outcome reports of key mallory" in line and "left out of training" in line for line in meta["log"])
