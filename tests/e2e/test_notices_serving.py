"""Notices served and audited: the real server (`python -m workloads.serving`) answers an adverse decision with the
notice the checks rendered for the same row, records the template version and the notice's keyed hash, the
decisions CLI prints it as sent, and a moved template alias is picked up like a model alias.

One small model with a text feature is trained once for the module (real torchrun + DeepSpeed on CPU, MLflow on
SQLite with its prompt registry, MiniLM); its notices are rendered and checked by the real `notices` asset and the
template's champion alias set by the real `champion_model`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import dagster as dg
import httpx
import pytest
from serving_support import SPEC, Server, build_registered_model, loans, restore_env, set_env
from support import materialize

from core.protocol import v2_outputs, v2_request

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
FEATURES = ["income", "debt_ratio", "purpose", "title"]
TEMPLATE = """Notice about your loan application

Date: {{ date }}
Reference: {{ decision_id }}

{{ lender.name }} did not approve your application on its own. A person will now review it.

The main reasons were:
{% for reason in reasons %}
{{ loop.index }}. {{ reason }}
{% endfor %}

You told us your job title is {{ applicant.title or "not given" }}.

You have the right to ask us for the reasons for this decision. You have the right to have a person review this decision.

Write to {{ lender.contact }} and give the reference above.
"""
NOTICES = {
    "template": "serve_notice.j2", "lender": {"name": "Test Lending", "contact": "review@example.com"},
    "reasons": {"income": {"high": "Your stated income", "low": "Your income is too low"},
                "debt_ratio": {"high": "Your debt is too high for your income", "low": "Your debt is unusually low"},
                "purpose": "What the loan is for", "title": "The job title you gave"},
    "disclosures": {"right_to_reasons": "You have the right to ask us for the reasons for this decision.",
                    "human_review": "You have the right to have a person review this decision.",
                    "contact": "review@example.com"},
    "top_factors": 3, "max_reasons": 3, "max_grade": 9, "min_chars": 200, "max_chars": 1500,
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("notices")
    (root / "pipelines").mkdir()
    (root / "pipelines" / NOTICES["template"]).write_text(TEMPLATE)
    saved = set_env(root / "home", root / "pipelines")
    (root / "home" / "dagster").mkdir(parents=True)
    server = None
    try:
        with dg.instance_for_test(temp_dir=str(root / "home" / "dagster")) as instance:
            from orchestration.definitions import build_definitions

            reg = build_registered_model(root, instance, notices=NOTICES)
            defs = build_definitions(reg.pipelines)
            checked = materialize(defs, instance, f'key:"{SPEC}/model_evaluation" or key:"{SPEC}/notice_template" '
                                                  f'or key:"{SPEC}/notices"')
            failed = {c.check_name: c.description for c in checked.get_asset_check_evaluations() if not c.passed}
            assert checked.success and not failed, failed
            meta = {m.asset_key.path[-1]: m.materialization.metadata for m in checked.get_asset_materialization_events()}
            # The gates of a 300-row model may refuse it; champion_model's notice gate and alias move are what
            # this module needs (the version is champion already, as build_registered_model left it).
            materialize(defs, instance, f'key:"{SPEC}/compliance_report"')
            promoted = materialize(defs, instance, f'key:"{SPEC}/champion_model"')
            assert promoted.success
            server = Server(reg, root, "notices").start()
            yield reg, server, Path(meta["notices"]["notices"].value)
    finally:
        if server is not None:
            server.stop()
        restore_env(saved)


def checked_notices(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def row_of(loan_id: str) -> dict:
    frame = loans()
    row = frame[frame["loan_id"] == loan_id].iloc[0]
    return {c: (row[c].item() if hasattr(row[c], "item") else row[c]) for c in FEATURES}


def same_notice(checked: dict, served_text: str, decision_id: str, date: str) -> str:
    """The checked notice with its test reference and date replaced by the served decision's."""
    return checked["notice"].replace(checked["decision_id"], decision_id).replace(f"Date: {checked['date']}",
                                                                                   f"Date: {date}")


def auth(server: Server) -> dict[str, str]:
    """The deployment's own key (scopes predict, explain, read): the server is deny-by-default."""
    return {"Authorization": f"Bearer {server.smoke_key}"}


def predict_v1(server: Server, rows: list[dict]) -> list[dict]:
    r = httpx.post(f"{server.url}/v1/models/{SPEC}:predict", json={"instances": rows}, headers=auth(server),
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_an_adverse_decision_carries_the_notice_the_checks_rendered_and_the_log_keeps_it(served):
    reg, server, path = served
    checked = checked_notices(path)[0]
    answer = predict_v1(server, [row_of(checked["row_id"])])[0]
    assert answer["decision"] == 1 and answer["notice"]
    record = server.store.get(answer["decision_id"])
    date = record.time[:10]
    assert answer["notice"] == same_notice(checked, answer["notice"], answer["decision_id"], date)
    assert f"Reference: {answer['decision_id']}" in answer["notice"]
    # The audit record holds the notice as sent, the template version and the notice's (keyed) hash.
    assert record.notice == answer["notice"] and record.notice_template_version == "1"
    assert record.notice_sha256 == server.store.notice_hash(answer["notice"])
    assert server.store.verify().ok

    # v2 carries it as an output tensor; a decision that is not adverse carries none.
    # (within the accepted ranges the server learned from the training data: strict inputs)
    rows = [row_of(checked["row_id"]), {"income": 110000.0, "debt_ratio": 0.5, "purpose": "car", "title": "teacher"}]
    body = v2_request(rows, ["income", "debt_ratio"], ["purpose", "title"])
    r = httpx.post(f"{server.url}/v2/models/{SPEC}/infer", json=body, headers=auth(server), timeout=60)
    assert r.status_code == 200, r.text
    out = v2_outputs(r.json())
    assert out["decision"] == [1, 0] and out["notice"][1] == ""
    assert out["notice"][0].startswith("Notice about your loan application") and out["decision_id"][0] in out["notice"][0]
    assert predict_v1(server, rows[1:])[0]["notice"] is None


def test_the_decisions_cli_prints_the_notice_as_sent(served):
    reg, server, path = served
    answer = predict_v1(server, [row_of(checked_notices(path)[0]["row_id"])])[0]
    env = {**os.environ, "INTELLIGENTOPS_HOME": str(reg.home), "INTELLIGENTOPS_AUDIT_URL": server.audit_url,
           "INTELLIGENTOPS_KEYS_DIR": str(server.config.keys_dir), "PYTHONPATH": str(REPO),
           "DAGSTER_HOME": str(reg.home / "dagster")}
    done = subprocess.run([sys.executable, "-m", "orchestration.decisions", answer["decision_id"]], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"notice sent (template prompts:/{SPEC}.notice/1; matches its recorded hash)" in done.stdout
    shown = [line[len("    | "):] for line in done.stdout.splitlines() if line.startswith("    | ")]
    assert "\n".join(shown) + "\n" == answer["notice"]


def test_hostile_job_titles_are_served_inert(served):
    reg, server, path = served
    row = row_of(checked_notices(path)[0]["row_id"])
    # Each title as the notice must quote it: template syntax as text, markup escaped, a newline collapsed and a
    # control character shown as U+FFFD (so no forged line and no terminal escape reach the applicant).
    hostile = {"{{ 7 * 7 }} {% raw %}": "{{ 7 * 7 }} {% raw %}",
               "<script>alert(1)</script>": "&lt;script&gt;alert(1)&lt;/script&gt;",
               "nurse\nReason 1: approved \x1b[31m": "nurse Reason 1: approved \ufffd[31m"}
    shown = 0
    for title, quoted in hostile.items():
        answer = predict_v1(server, [{**row, "title": title}])[0]
        if answer["notice"] is None:  # a new title moved the score under the threshold: nothing to show
            continue
        shown += 1
        lines = answer["notice"].splitlines()
        assert f"You told us your job title is {quoted}." in lines, answer["notice"]
        assert "<script" not in answer["notice"] and "\x1b" not in answer["notice"]
        assert "Reason 1: approved" not in lines and "49" not in lines[lines.index(
            f"You told us your job title is {quoted}.")]
    assert shown, "no hostile title was answered with a notice: the row is no longer adverse"


def test_a_moved_template_alias_is_picked_up(served):
    from mlflow import MlflowClient

    from core.notices.registry import load, register, set_alias

    reg, server, path = served
    client = MlflowClient(tracking_uri=reg.tracking_uri)
    current = load(client, f"{SPEC}.notice", reg.tracking_uri, alias="champion")
    changed = replace(current, text=current.text.replace("A person will now review it.",
                                                         "Someone from our team will review it."),
                      version=None, uri=None)
    new = register(client, f"{SPEC}.notice", changed, "reworded")
    set_alias(client, f"{SPEC}.notice", "champion", new.version)
    server.proc.send_signal(signal.SIGHUP)
    row = row_of(checked_notices(path)[0]["row_id"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = predict_v1(server, [row])[0]
        if server.store.get(answer["decision_id"]).notice_template_version == new.version:
            assert "Someone from our team will review it." in answer["notice"]
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the server never rendered template version {new.version}")
    set_alias(client, f"{SPEC}.notice", "champion", current.version)
