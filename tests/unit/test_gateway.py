"""The gateway's parts, each tested as the attack it stops: malformed binary-extension bodies (a 500 and a
traceback before), keys without the route's scope, a forged log line, one caller holding the scoring thread,
nonsense rows scored, and caches that grow with every new text."""

from __future__ import annotations

import hashlib
import json
import math
import struct

import pytest

from core.server_config import ServerConfig
from workloads.serving.batching import FairQueue, Pending, row_cost
from workloads.serving.binary import BinaryRequestError, binary_body, json_body
from workloads.serving.decoding import InvalidRequest, validate_columns
from workloads.serving.gateway import ApiKeysError, load_keys
from workloads.serving.logs import refusal_line


def _cfg(**over) -> ServerConfig:
    base = dict(spec="loans", tracking_uri="x", audit_url="y", numeric={"income": [0.0, 1e6], "term": [36.0, 60.0]},
                categorical={"purpose": ["car", "home"]}, text=["title"], nullable=["income", "title"],
                numeric_allowed={"term": [36.0, 60.0]})
    return ServerConfig(**{**base, **over})


REQUEST = {"inputs": [{"name": "income", "datatype": "FP64", "shape": [2], "data": [1.0, 2.0]},
                      {"name": "title", "datatype": "BYTES", "shape": [2], "data": ["nurse", "teacher"]}]}


def test_a_binary_request_as_tritonclient_sends_it_becomes_its_json_with_nan_as_missing():
    body, n = binary_body(REQUEST, {"income": ("FP64", [52000.0, None]), "title": ("BYTES", ["nurse", "é"])})
    decoded = json_body(body, str(n).encode(), 256)
    assert decoded["inputs"][0] == {"name": "income", "datatype": "FP64", "shape": [2], "data": [52000.0, None]}
    assert decoded["inputs"][1]["data"] == ["nurse", "é"] and "parameters" not in decoded["inputs"][1]


@pytest.mark.parametrize(("header", "change", "message"), [
    (b"abc", None, "must be the JSON header's length"),
    (b"-5", None, "must be the JSON header's length"),
    (b"0", None, "between 1 and the body's size"),
    (b"99999999", None, "between 1 and the body's size"),
    (b"1" * 40, None, "must be the JSON header's length"),
    (None, lambda body: body + b"\0\0", "bytes after the last binary input"),
    (None, lambda body: body[:-3], "runs past"),
])
def test_malformed_binary_headers_and_lengths_are_refused_by_name(header, change, message):
    body, n = binary_body(REQUEST, {"income": ("FP64", [1.0, 2.0]), "title": ("BYTES", ["a", "b"])})
    body = change(body) if change else body
    with pytest.raises(BinaryRequestError, match=message):
        json_body(body, header if header is not None else str(n).encode(), 256)


def test_binary_tensors_that_lie_about_their_shape_or_values_are_refused():
    body, n = binary_body({"inputs": [REQUEST["inputs"][0]]}, {"income": ("FP64", [math.inf, 1.0])})
    with pytest.raises(BinaryRequestError, match="input 'income': element 0 is inf, not a finite number"):
        json_body(body, str(n), 256)
    header = json.dumps({"inputs": [{"name": "income", "datatype": "FP64", "shape": [3],
                                     "parameters": {"binary_data_size": 16}}]}).encode()
    with pytest.raises(BinaryRequestError, match="does not match shape of 3 FP64 elements"):
        json_body(header + struct.pack("<2d", 1, 2), str(len(header)), 256)
    header = json.dumps({"inputs": [{"name": "income", "datatype": "FP64", "shape": [10**9],
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    with pytest.raises(BinaryRequestError, match="at most 256"):
        json_body(header + struct.pack("<d", 1), str(len(header)), 256)
    header = json.dumps({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 6}}]}).encode()
    with pytest.raises(BinaryRequestError, match="element 0 runs past"):
        json_body(header + struct.pack("<I", 99) + b"ab", str(len(header)), 256)
    for bad in (b"[1, 2]", b'{"inputs": [{"name": 3}]}', b'{"inputs": [{"name": "a", "datatype": "FP64"}]}'):
        with pytest.raises(BinaryRequestError):
            json_body(bad, str(len(bad)), 256)


def test_keys_carry_scopes_and_an_unknown_scope_is_refused(tmp_path):
    digest = hashlib.sha256(b"k").hexdigest()
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"id": "a", "sha256": digest},
                                         {"id": "b", "sha256": "0" * 64, "scopes": ["outcomes", "read"]}]}))
    keys = load_keys(_cfg(api_keys_file=str(path)))
    assert keys[digest].scopes == ("predict", "explain") and keys["0" * 64].scopes == ("outcomes", "read")
    path.write_text(json.dumps({"keys": [{"id": "a", "sha256": digest, "scopes": ["everything"]}]}))
    with pytest.raises(ApiKeysError, match=r"keys\[0\].scopes must be a list of"):
        load_keys(_cfg(api_keys_file=str(path)))


def test_a_newline_in_a_path_cannot_forge_a_log_line():
    line = refusal_line("127.0.0.1", None, "GET", "/v2/x\n2026-01-01 INFO forged: all good\r\x1b[2J", 404, "no\nroute")
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert json.loads(line)["route"].endswith("forged: all good\r\x1b[2J")


def _pending(caller: str, rows: int, chars: int) -> Pending:
    rs = [{"title": "x" * chars} for _ in range(rows)]
    return Pending(rows=rs, variant="champion", explain=0, key_id=None, caller=caller, arrived=0.0, future=None,
                   costs=[row_cost(r, ["title"]) for r in rs])


def test_a_large_request_is_sliced_and_a_small_one_is_served_alone_in_the_next_batch():
    queue = FairQueue()
    big = [_pending("abuser", 256, 400) for _ in range(3)]
    for p in big:
        queue.put(p)
    first = queue.take(400, 256)
    assert [(s.pending, s.stop - s.start) for s in first] == [(big[0], 1)]  # 400 + 20 chars: ~50 ms of embedding
    small = _pending("victim", 1, 20)
    small.arrived = 1.0
    queue.put(small)
    second = queue.take(400, 256)
    # The abuser's other new requests have had no turn either and came first; then the victim, whose cheap row is
    # never batched behind an expensive slice taken after it.
    assert [s.pending for s in second] == [big[1]]
    assert [s.pending for s in queue.take(400, 256)] == [big[2]]
    assert [s.pending for s in queue.take(400, 256)] == [small]
    # Many cheap rows share a batch: ten 20-character texts fit in 400.
    cheap = FairQueue()
    cheap.put(_pending("a", 30, 20))
    assert sum(s.stop - s.start for s in cheap.take(400, 256)) == 10


def test_rows_a_model_was_never_meant_to_see_are_refused_naming_the_field():
    cfg = _cfg()
    good = {"income": [1.0], "term": [36], "purpose": ["car"], "title": ["nurse"]}
    assert validate_columns(dict(good), cfg)[0]["term"] == 36.0
    for change, message in [({"term": [37]}, "field 'term' row 0: 37 is not one of the values the spec allows"),
                            ({"purpose": [None]}, "field 'purpose' row 0: missing (null), but 'purpose' was never"),
                            ({"term": [None]}, "field 'term' row 0: missing"),
                            ({"income": [-1.0]}, "field 'income' row 0: -1 is outside the accepted range")]:
        with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate_columns({**good, **change}, cfg)
    assert validate_columns({**good, "income": [None]}, cfg)[0]["income"] is None  # may be missing: learned
    everything_missing = _cfg(nullable=None)
    with pytest.raises(InvalidRequest, match=r"row 0: only 0 of 4 features are known"):
        validate_columns({"income": [None], "term": [None], "purpose": [None], "title": [None]}, everything_missing)


def test_learned_ranges_are_not_widened_below_zero():
    from assets.checks.data_quality import Profile
    from assets.deployment import accepted_ranges
    from assets.spec import PipelineSpec

    spec = PipelineSpec.model_validate({
        "name": "loans", "source": {"kind": "file", "path": "x.csv"}, "target": {"column": "y", "positive": [1]},
        "features": {"numeric": ["delinq", "balance"]}})
    numeric, _ = accepted_ranges(spec, Profile(numeric={"delinq": (0.0, 13.0), "balance": (-50.0, -10.0)}))
    assert numeric["delinq"] == [0.0, 19.5] and numeric["balance"] == [-70.0, 0.0]


def test_the_text_cache_is_bounded_in_bytes_not_entries():
    import numpy as np

    from workloads.model_code import _TextCache

    cache = _TextCache(max_bytes=200_000)
    for i in range(1000):
        cache.put(f"{i:04d}" + "x" * 1996, np.ones(384, dtype=np.float32))
    assert cache.bytes <= 200_000 and 0 < len(cache) < 100
    assert cache.get("0999" + "x" * 1996) is not None and cache.get("0000" + "x" * 1996) is None
