"""The server's config crosses a process boundary: the deployment asset writes it, the server reads it, with one
schema (core/server_config.py) and one set of defaults shared with the spec's `deployment:` section."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import write_spec

from assets.spec import Deployment, TrafficPolicy, load_spec
from core.server_config import ServerConfig, ServerConfigError, read_server_config, write_server_config

REPO = Path(__file__).resolve().parents[2]
BASE = {"name": "loans", "source": {"kind": "file", "path": "loans.csv"},
        "target": {"column": "outcome", "positive": ["default"]},
        "features": {"numeric": ["income", "age"], "categorical": ["purpose"], "text": ["title"]}}
SHARED = {"max_batch_rows", "max_body_bytes", "rate_limit_per_minute", "retention_days", "port", "explain_top",
          "similar_cases"}


def _written(tmp_path: Path, **deployment) -> tuple[Path, ServerConfig]:
    """The asset's side: the config built from a spec, written the way the launcher writes it."""
    from assets.deployment import server_config

    loaded = load_spec(write_spec(tmp_path, {**BASE, "deployment": deployment}))
    config, _ = server_config(loaded, str(tmp_path / "home"), "sqlite:///m.db", "sqlite:///a.db", None)
    path = tmp_path / "server.json"
    write_server_config(path, config)
    return path, config


def test_what_the_asset_writes_the_server_reads_back_unchanged(tmp_path: Path) -> None:
    path, written = _written(tmp_path, traffic={"mode": "shadow"}, max_batch_rows=64, redact=["title"])
    read = read_server_config(path)
    assert read == written and read.mode == "shadow" and read.max_batch_rows == 64 and read.redact == ["title"]
    assert read.features == ["income", "age", "purpose", "title"]  # the spec's order: the model's input order
    assert path.stat().st_mode & 0o077 == 0  # it names the registry and the audit database
    assert read_server_config(path, port=9100, audit_url=None).port == 9100  # --port wins, an unset flag does not


def test_the_spec_and_the_server_share_one_set_of_defaults(tmp_path: Path) -> None:
    fields, spec_fields = ServerConfig.model_fields, Deployment.model_fields
    for key in SHARED:
        assert spec_fields[key].default == fields[key].default, key
        assert spec_fields[key].metadata == fields[key].metadata, key  # the same bounds too
    assert TrafficPolicy.model_fields["mode"].default == fields["mode"].default
    assert TrafficPolicy.model_fields["canary_share"].default == fields["canary_share"].default
    _, config = _written(tmp_path)  # a spec that sets nothing serves with the server's own defaults
    minimal = ServerConfig(spec="loans", tracking_uri="t", audit_url="a", text=["title"])
    assert all(getattr(config, key) == getattr(minimal, key) for key in SHARED | {"mode", "canary_share"})


def _file(tmp_path: Path, **change) -> Path:
    path, config = _written(tmp_path)
    raw = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps(raw))
    return path


def test_an_unknown_key_or_a_bad_value_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = _file(tmp_path, max_batch_rowz=3)
    with pytest.raises(ServerConfigError, match=rf"^{re.escape(str(path))}: unknown key 'max_batch_rowz' \(known keys: spec, "):
        read_server_config(path)
    path = _file(tmp_path, max_batch_rows=0)
    with pytest.raises(ServerConfigError, match=rf"^{re.escape(str(path))}: 'max_batch_rows': Input should be greater than or "
                                                r"equal to 1 \(got 0\)"):
        read_server_config(path)
    with pytest.raises(ServerConfigError, match=rf"^{re.escape(str(path))}: 'mode': Input should be 'champion', 'canary' or "
                                                "'shadow'"):
        read_server_config(_file(tmp_path, mode="blue-green"))
    with pytest.raises(ServerConfigError, match=r"numeric.income: the accepted range \[5.0, 1.0\] has its minimum "
                                                "above its maximum"):
        read_server_config(_file(tmp_path, numeric={"income": [5, 1]}))
    with pytest.raises(ServerConfigError, match=rf"^{re.escape(str(path))}: 'port': Input should be less than or equal to 65535"):
        read_server_config(_file(tmp_path), port=70_000)
    path.write_text("{not json")
    with pytest.raises(ServerConfigError, match=rf"^{re.escape(str(path))}: not JSON"):
        read_server_config(path)
    with pytest.raises(ServerConfigError, match=r"cannot read the server config"):
        read_server_config(tmp_path / "missing.json")


def test_a_bad_config_is_refused_before_it_is_written(tmp_path: Path) -> None:
    _, config = _written(tmp_path)
    target = tmp_path / "other.json"
    with pytest.raises(ServerConfigError, match=rf"^{re.escape(str(target))}: unknown key 'probe_key_sha256'"):
        write_server_config(target, {**config.to_json(), "probe_key_sha256": "0" * 64})
    assert not target.exists()
    with pytest.raises(ServerConfigError, match=r"ServerConfig.replace: 'canary_share': .*less than or equal to 1"):
        config.replace(canary_share=2)


def test_secrets_come_from_the_environment_and_an_unset_variable_is_named(tmp_path: Path, monkeypatch) -> None:
    path = _file(tmp_path, audit_url="env:LOANS_AUDIT_URL")
    monkeypatch.delenv("LOANS_AUDIT_URL", raising=False)
    with pytest.raises(ServerConfigError, match=rf"^{re.escape(str(path))}: audit_url is 'env:LOANS_AUDIT_URL' but the environment "
                                                "variable LOANS_AUDIT_URL is not set"):
        read_server_config(path)
    monkeypatch.setenv("LOANS_AUDIT_URL", "postgresql+psycopg2://audit:pw@db/audit")
    assert read_server_config(path).audit_url == "postgresql+psycopg2://audit:pw@db/audit"
    assert "pw" not in path.read_text()


def test_the_server_turns_a_bad_config_into_one_line_and_exit_status_2(tmp_path: Path) -> None:
    path = _file(tmp_path, trafic={"mode": "canary"})
    done = subprocess.run([sys.executable, "-m", "workloads.serving", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"serving: {path}: unknown key 'trafic' (known keys: " \
                                  f"{', '.join(ServerConfig.model_fields)})"
