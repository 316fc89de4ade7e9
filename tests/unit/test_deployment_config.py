"""The deployment section of the spec, the server config built from it, and request validation: plain functions."""

import json
from pathlib import Path

import pytest
from support import write_spec

from assets.checks.data_quality import Profile
from assets.deployment import accepted_ranges, server_config
from assets.monitoring import observe_inference_log
from assets.serving_client import percentile, v2_request
from assets.spec import SpecError, load_spec
from core.audit import AuditStore
from core.server_config import ServerConfig
from workloads.serving.decoding import InvalidRequest, columns_from_v2, validate_columns
from workloads.serving.gateway import ApiKey, load_keys
from workloads.serving.limits import CallerLimits

BASE = {"name": "loans", "source": {"kind": "file", "path": "loans.csv"},
        "target": {"column": "outcome", "positive": ["default"]},
        "features": {"numeric": ["income", "term"], "categorical": ["purpose"], "text": ["title"]}}


def test_deployment_defaults_and_errors(tmp_path: Path):
    loaded = load_spec(write_spec(tmp_path, BASE))
    d = loaded.spec.deployment
    assert d.traffic.mode == "champion" and d.retention_days == 183 and d.port is None
    with pytest.raises(SpecError, match="unknown key 'deployment.trafic'"):
        load_spec(write_spec(tmp_path, {**BASE, "deployment": {"trafic": {}}}))
    with pytest.raises(SpecError, match="deployment.traffic.mode"):
        load_spec(write_spec(tmp_path, {**BASE, "deployment": {"traffic": {"mode": "blue-green"}}}))
    with pytest.raises(SpecError, match="deployment.redact: 'ssn' is not a feature column"):
        load_spec(write_spec(tmp_path, {**BASE, "deployment": {"redact": ["ssn"]}}))


def test_server_config_from_spec_and_profile(tmp_path: Path):
    spec = {**BASE, "validation": {"columns": {"term": {"allowed": [36, 60]}, "income": {"min": 0}}},
            "deployment": {"traffic": {"mode": "canary", "canary_share": 0.2}, "redact": ["title"],
                           "api_keys_file": "keys.json"}}
    spec["features"] = {"numeric": ["income"], "categorical": ["purpose", "term"], "text": ["title"]}
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [{"id": "ops", "sha256": "a" * 64, "models": ["*"]}]}))
    loaded = load_spec(write_spec(tmp_path, spec))
    profile = Profile(numeric={"income": (1000.0, 5000.0)}, categories={"purpose": ["car", "home"]}, row_count=10)
    numeric, categorical = accepted_ranges(loaded.spec, profile)
    assert numeric == {"income": [0.0, 5000.0 + 0.5 * 4000.0]}  # declared min wins; learned max plus tolerance
    assert categorical == {"purpose": ["car", "home"], "term": ["36", "60"]}
    config, key = server_config(loaded, str(tmp_path / "home"), "sqlite:///m.db", "sqlite:///a.db", profile)
    assert config.mode == "canary" and config.canary_share == 0.2 and config.redact == ["title"]
    keys = json.loads(Path(config.api_keys_file).read_text())["keys"]
    assert [k["id"] for k in keys] == ["ops", "deployment-smoke", "deployment-operator"] and key and \
        key not in json.dumps(keys)
    assert Path(config.api_keys_file).stat().st_mode & 0o077 == 0
    assert set(load_keys(config).values()) >= {ApiKey("ops", ("*",), 6000)}


def _cfg(**over) -> ServerConfig:
    base = dict(spec="loans", tracking_uri="x", audit_url="y", numeric={"income": [0.0, 100.0]},
                categorical={"purpose": ["car", "home"], "term": ["36", "60.0"]}, text=["title"], max_batch_rows=3,
                min_known_fraction=0.0)
    return ServerConfig(**{**base, **over})


def test_validation_names_the_field_and_keeps_good_rows():
    cfg = _cfg()
    rows = validate_columns({"income": [5, None, "7.5"], "purpose": ["car", None, "home"],
                                   "term": [36, 60, "36"], "title": ["nurse", None, ""]}, cfg)
    assert rows[0] == {"income": 5.0, "purpose": "car", "term": "36", "title": "nurse"}
    assert rows[1]["term"] == "60.0" and rows[2]["income"] == 7.5
    bad = [({"income": [True]}, "field 'income' row 0: expected a number"),
           ({"income": [float("inf")]}, "not a finite number"),
           ({"income": [101]}, "outside the accepted range [0, 100]"),
           ({"purpose": [["car"]]}, "field 'purpose' row 0: expected a category"),
           ({"term": [48]}, "'48' is not a known category"),
           ({"title": [{"a": 1}]}, "field 'title' row 0: expected text")]
    good = {"income": [1.0], "purpose": ["car"], "term": ["36"], "title": ["x"]}
    for change, message in bad:
        with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
            validate_columns({**good, **change}, cfg)
    with pytest.raises(InvalidRequest, match="4 rows in one request; at most 3"):
        validate_columns({k: v * 4 for k, v in good.items()}, cfg)
    with pytest.raises(InvalidRequest, match="different numbers of rows"):
        validate_columns({**good, "income": [1.0, 2.0]}, cfg)


def test_v2_request_round_trips_through_the_pandas_codec_reader(tmp_path: Path):
    from kserve import InferInput, InferRequest

    rows = [{"income": 1.0, "purpose": "car", "term": "36", "title": "nurse"},
            {"income": None, "purpose": None, "term": "60.0", "title": None}]
    spec = load_spec(write_spec(tmp_path, {
        **BASE, "features": {"numeric": ["income"], "categorical": ["purpose", "term"], "text": ["title"]}})).spec
    body = v2_request(spec, rows)
    assert [(t["name"], t["datatype"], t["shape"]) for t in body["inputs"]] == [
        ("income", "FP64", [2]), ("purpose", "BYTES", [2]), ("term", "BYTES", [2]), ("title", "BYTES", [2])]
    request = InferRequest(model_name="loans", infer_inputs=[
        InferInput(t["name"], t["shape"], t["datatype"], t["data"]) for t in body["inputs"]])
    assert validate_columns(columns_from_v2(request, _cfg()), _cfg()) == rows
    nested = InferRequest(model_name="loans", infer_inputs=[InferInput("income", [2, 1], "FP64", [[1.0], [2.0]])])
    assert columns_from_v2(nested, _cfg()) == {"income": [1.0, 2.0]}
    with pytest.raises(InvalidRequest, match="text goes as datatype BYTES"):
        columns_from_v2(InferRequest(model_name="loans", infer_inputs=[
            InferInput("title", [1], "INT64", [3])]), _cfg())


def test_token_bucket_and_percentile():
    limits = CallerLimits()
    assert limits.take("key:a", 2) == 0 and limits.take("key:a", 2) == 0 and limits.take("key:a", 2) > 0
    assert limits.take("key:b", 2) == 0  # another caller has its own bucket
    assert percentile([1, 2, 3, 4, 100], 99) == 100 and percentile([5.0], 50) == 5.0


def test_inference_log_observation(tmp_path: Path):
    store = AuditStore(f"sqlite:///{tmp_path / 'a.db'}")
    rec = {"spec": "loans", "model_name": "loans", "model_version": "1", "inputs": {"x": 1}, "probability": 0.2,
           "decision": 0, "threshold": 0.5}
    store.append([{**rec, "decision_id": f"c{i}", "variant": "champion"} for i in range(5)]
                 + [{**rec, "decision_id": f"s{i}", "variant": "shadow"} for i in range(2)])
    obs = observe_inference_log(store, "loans", window_size=2)
    assert obs.decisions == 7 and obs.per_variant == {"champion": 5, "shadow": 2} and obs.complete_windows == 2
    assert obs.latest_seq == 7 and obs.chain_ok and obs.chain_checked == 7
