"""The server under attack, on loopback (issue 17, the server's side). Every test is the attack it stops.

One small model is trained for the module (tests/serving_support.py); the main server runs with API keys of
each scope. A second server speaks mutual TLS with certificates made here by `cryptography`. The audit store's
own attacks (an insider rewriting the chain) are tests/unit/test_audit*.py and tests/e2e/test_insider*.py.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import random
import socket
import ssl
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_support import SPEC, Server, lent_registered

from workloads.serving.binary import binary_body

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ROW = {"income": 52000.0, "debt_ratio": 12.5, "purpose": "car", "title": "registered nurse"}
KEYS = {"predict-key": ["predict"], "explain-key": ["explain"], "report-key": ["outcomes"], "read-key": ["read"],
        "admin-key": ["admin"], "all-key": ["predict", "explain", "outcomes", "read", "admin"]}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {name}"}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    yield from lent_registered(tmp_path_factory)


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guarded")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": k.split("-")[0], "sha256": hashlib.sha256(k.encode()).hexdigest(),
                                          "scopes": v, "rate_limit_per_minute": 100_000} for k, v in KEYS.items()]}))
    # income may be missing (as if the spec said validation.columns.income.max_null_fraction: 0.1); the other
    # columns were never missing in the training data.
    s = Server(registered, tmp, "guarded", api_keys_file=str(keys), nullable=["income"], log_file=str(tmp / "own.log"),
               max_outcomes_per_request=1000).start()
    yield s
    s.stop()


ROUTES = {  # scope -> (method, path, body)
    "predict": ("POST", f"/v1/models/{SPEC}:predict", {"instances": [ROW]}),
    "explain": ("POST", f"/v1/models/{SPEC}:explain", {"instances": [ROW]}),
    "outcomes": ("POST", f"/v2/models/{SPEC}/outcomes", {"outcomes": [{"decision_id": "none", "outcome": 1}]}),
    "read": ("GET", "/intelligentops/status", None),
    "admin": ("POST", f"/v2/repository/models/{SPEC}/unload", None),
}


@pytest.mark.parametrize("scope", list(ROUTES))
def test_each_scope_no_key_401_wrong_scope_403_right_scope_passes(server: Server, scope: str):
    method, path, body = ROUTES[scope]
    wrong = "read-key" if scope != "read" else "predict-key"

    def call(headers):
        return httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=60)

    if scope == "admin":
        # Removed outright: KServe's unload (only a restart brought the model back) answers like no route at all.
        for headers in ({}, bearer("admin-key"), bearer("all-key")):
            assert call(headers).status_code == 404
        assert httpx.get(f"{server.url}/v2/models/{SPEC}/ready").status_code == 200
        return
    assert call({}).status_code == 401
    forbidden = call(bearer(wrong))
    assert forbidden.status_code == 403 and f"scope '{scope}'" in forbidden.text
    allowed = call(bearer({"outcomes": "report-key"}.get(scope, f"{scope}-key")))
    assert allowed.status_code == (404 if scope == "outcomes" else 200), allowed.text  # no such decision: 404


def test_only_health_is_open_and_metadata_status_metrics_and_schema_are_not(server: Server):
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{SPEC}/ready"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    for path in ("/metrics", "/intelligentops/status", f"/v2/models/{SPEC}", "/v2", "/v2/models", "/v1/models"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 401 and "pid" not in r.text and "sqlite" not in r.text, path
    for path in ("/openapi.json", "/docs", "/redoc", "/"):
        assert httpx.get(f"{server.url}{path}", headers=bearer("all-key")).status_code == 404, path
    # The deployment's own keys: the smoke key reads status (the launcher's readiness wait), the operator key
    # reports outcomes but cannot score.
    assert httpx.get(f"{server.url}/intelligentops/status", headers=bearer(server.smoke_key)).status_code == 200
    op = bearer(server.operator_key)
    assert httpx.post(f"{server.url}{ROUTES['predict'][1]}", json={"instances": [ROW]}, headers=op).status_code == 403


def test_error_bodies_echo_nothing_and_name_no_python_internals(server: Server):
    marker = "ZZ-" + "secret-applicant-data" * 3
    url = f"{server.url}/v2/models/{SPEC}/infer"
    answers = [
        httpx.post(url, json={"inputs": marker}, headers=bearer("predict-key")),  # FastAPI's 422
        httpx.post(url, json={"inputs": [{"name": marker, "datatype": "FP64", "shape": [1], "data": [1]}]},
                   headers=bearer("predict-key")),
        httpx.post(url, content=b"{" + marker.encode(), headers=bearer("predict-key")),
        httpx.post(url, content=b"x", headers={**bearer("predict-key"), "Inference-Header-Content-Length": "abc"}),
    ]
    for r in answers:
        assert 400 <= r.status_code < 500, r.text
        assert marker not in r.text and "secret-applicant" not in r.text, r.text
        for internal in ("Traceback", "Error:", "Exception", "KeyError", "ValueError", "pydantic", ".py"):
            assert internal not in r.text, r.text


def test_malformed_binary_extension_requests_are_4xx_never_500(server: Server):
    body, n = binary_body({"inputs": [{"name": c, "datatype": "BYTES" if c in ("purpose", "title") else "FP64",
                                       "shape": [1], "data": [v]} for c, v in ROW.items()]},
                          {"income": ("FP64", [ROW["income"]]), "debt_ratio": ("FP64", [ROW["debt_ratio"]]),
                           "title": ("BYTES", [ROW["title"]])})
    url = f"{server.url}/v2/models/{SPEC}/infer"
    good = httpx.post(url, content=body, headers={**bearer("predict-key"), "Inference-Header-Content-Length": str(n)})
    assert good.status_code == 200, good.text
    for header, content in [("abc", body), ("-1", body), ("0", body), (str(len(body) + 10), body), ("1e3", body),
                            (str(n), body + b"\0\0\0"), (str(n), body[:-4]), (str(n - 3), body), ("", body),
                            ("9" * 30, body), (str(n), body[:n]), ("0x10", body), ("١٢".encode(), body)]:
        r = httpx.post(url, content=content, headers={**bearer("predict-key"), "Inference-Header-Content-Length": header})
        assert 400 <= r.status_code < 500, (header, r.status_code, r.text)


def test_missing_is_accepted_where_learned_and_garbage_is_refused_naming_the_field(server: Server):
    url = f"{server.url}/v1/models/{SPEC}:predict"
    ok = httpx.post(url, json={"instances": [{**ROW, "income": None}]}, headers=bearer("predict-key"))
    assert ok.status_code == 200, ok.text
    # tritonclient's way to send a missing number: NaN in a binary FP64 tensor.
    inputs = [{"name": c, "datatype": "BYTES" if c in ("purpose", "title") else "FP64", "shape": [1], "data": [v]}
              for c, v in ROW.items()]
    for column, expect in (("income", 200), ("debt_ratio", 400)):
        body, n = binary_body({"inputs": inputs}, {column: ("FP64", [None])})
        r = httpx.post(f"{server.url}/v2/models/{SPEC}/infer", content=body,
                       headers={**bearer("predict-key"), "Inference-Header-Content-Length": str(n)})
        assert r.status_code == expect, r.text
        if expect == 400:
            assert f"field '{column}' row 0: missing" in r.json()["error"]
    body, n = binary_body({"inputs": inputs}, {"income": ("FP64", [float("inf")])})
    r = httpx.post(f"{server.url}/v2/models/{SPEC}/infer", content=body,
                   headers={**bearer("predict-key"), "Inference-Header-Content-Length": str(n)})
    assert r.status_code == 400 and "'income'" in r.text and "not a finite number" in r.text
    for row, field in [({**ROW, "debt_ratio": -1.0}, "field 'debt_ratio' row 0: -1 is outside the accepted range [0,"),
                       ({**ROW, "purpose": None}, "field 'purpose' row 0: missing"),
                       ({k: None for k in ROW}, "field 'debt_ratio' row 0: missing")]:
        r = httpx.post(url, json={"instances": [row]}, headers=bearer("predict-key"))
        assert r.status_code == 400 and field in r.json()["error"], r.text


def test_a_newline_in_the_path_cannot_forge_a_log_line_and_refusals_are_counted(server: Server):
    forged = "2026-01-01 00:00:00,000 INFO intelligentops.serving: forged line"
    with socket.create_connection(("127.0.0.1", server.config.port)) as sock:  # %0A decodes to a newline
        sock.sendall(f"GET /v2/x%0A{forged.replace(' ', '%20')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(1000).startswith(b"HTTP/1.1 404")
    httpx.post(f"{server.url}/v1/models/{SPEC}:predict", json={"instances": [{**ROW, "purpose": "boat\nforged"}]},
               headers=bearer("predict-key"))
    time.sleep(0.5)
    lines = Path(server.config.log_file).read_text().splitlines()
    assert lines and not any(line.startswith("2026-01-01") or line.startswith("forged") for line in lines)
    refusals = [json.loads(line.split(": ", 1)[1]) for line in lines if '"event":"refused"' in line]
    assert any(r["route"].startswith("/v2/x\n2026") and r["status"] == 404 and r["client"] == "127.0.0.1"
               for r in refusals)
    assert any(r["key_id"] == "predict" and "boat" in r["reason"] for r in refusals)
    assert "Traceback" not in "\n".join(lines)  # no traceback for a client's mistake
    metrics = httpx.get(f"{server.url}/metrics", headers=bearer("read-key")).text
    assert 'intelligentops_refusals_total{code="404",route="none"}' in metrics
    assert 'intelligentops_refusals_total{code="401",route=' in metrics


def test_liveness_stays_fast_while_a_large_outcomes_report_is_recorded(server: Server):
    ids = [p["decision_id"] for _ in range(4) for p in httpx.post(
        f"{server.url}/v1/models/{SPEC}:predict", json={"instances": [ROW] * 250}, headers=bearer("predict-key"),
        timeout=120).json()["predictions"]]
    report = {"outcomes": [{"decision_id": did, "outcome": i % 2, "reason": "chargeback"} for i, did in enumerate(ids)]}
    too_many = {"outcomes": report["outcomes"] * 2}
    r = httpx.post(f"{server.url}/v2/models/{SPEC}/outcomes", json=too_many, headers=bearer("report-key"))
    assert r.status_code == 413 and "at most 1000" in r.text
    stop, live = threading.Event(), []

    def poll():
        with httpx.Client() as c:
            while not stop.is_set():
                t = time.perf_counter()
                assert c.get(f"{server.url}/v2/health/live").status_code == 200
                live.append(time.perf_counter() - t)
                time.sleep(0.01)

    def polled(n: int, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        while len(live) < n and time.monotonic() < deadline:
            time.sleep(0.005)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        polled(3)  # liveness answered before the report; it keeps polling while the report is recorded ...
        before = len(live)
        r = httpx.post(f"{server.url}/v2/models/{SPEC}/outcomes", json=report, headers=bearer("report-key"),
                       timeout=120)
        polled(before + 2)  # ... and after it: a poll sent while the event loop was busy waits for it
    finally:
        stop.set()
        poller.join()
    assert r.status_code == 200 and r.json() == {"recorded": 1000}
    # A report handled on the event loop froze liveness for 2.6 s; however fast the machine, no poll may wait 0.5 s.
    assert len(live) >= 5 and max(live) < 0.5, max(live)


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(400))


def test_one_row_requests_stay_fast_beside_maximum_size_requests_of_new_texts(server: Server):
    """Before: one 256-row request of new 400-character texts held the scoring thread for ~23 s and a one-row
    request beside it waited as long. The loose bound here is 2 s; the benchmark measures the real target."""
    stop, errors = threading.Event(), []

    def abuser(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=600) as c:
            while not stop.is_set():
                body = {"instances": [{**ROW, "title": _random_text(rng)} for _ in range(256)]}
                r = c.post(f"{server.url}/v1/models/{SPEC}:predict", json=body, headers=bearer("all-key"))
                if r.status_code != 200:
                    errors.append(r.text[:200])

    threads = [threading.Thread(target=abuser, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(3)
    latencies = []
    try:
        with httpx.Client(timeout=600) as c:
            for _ in range(15):
                t0 = time.perf_counter()
                r = c.post(f"{server.url}/v1/models/{SPEC}:predict", json={"instances": [ROW]},
                           headers=bearer("predict-key"))
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert sorted(latencies)[-2] < 2.0, latencies  # all but the slowest one under 2 s


def _route_paths() -> st.SearchStrategy:
    from workloads.serving.routes import DECISIONS

    paths = [p.replace("{model_name}", SPEC).replace("{name}", SPEC).replace("{model_version}", "1")
             for p in DECISIONS]
    return st.sampled_from(paths) | st.text(alphabet=string.printable, max_size=30).map(lambda t: "/v2/" + t)


fuzz_headers = st.dictionaries(
    st.sampled_from(["Inference-Header-Content-Length", "Content-Type", "Content-Length-X", "X-API-Key",
                     "Authorization", "x-intelligentops-key-id", "x-intelligentops-client"]),
    st.text(alphabet=string.printable.strip(), max_size=12), max_size=3)
fuzz_bodies = st.one_of(st.binary(max_size=200), st.builds(lambda v: json.dumps(v).encode(), st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]), path=_route_paths(), headers=fuzz_headers,
       body=fuzz_bodies, key=st.sampled_from([None, "all-key", "predict-key", "nope"]))
def test_fuzz_every_route_never_gets_a_500(only_real_modules, server: Server, method, path, headers, body, key):
    sent = {**headers, **(bearer(key) if key else {})}
    try:
        r = httpx.request(method, f"{server.url}{path}", content=body, headers=sent, timeout=60)
    except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError):
        return  # a request no client can send
    assert r.status_code < 500, (method, path, headers, body[:100], r.status_code, r.text)


@pytest.fixture
def only_real_modules():
    import types

    for name in [n for n, m in sys.modules.items() if not isinstance(m, types.ModuleType)]:
        sys.modules.pop(name)


# --- where it listens, and TLS ------------------------------------------------------------------------------------


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate signed by it, and a client certificate of
    another CA, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    out: dict[str, Path] = {}

    def write(name: str, cert, key) -> None:
        out[f"{name}_cert"] = folder / f"{name}.crt"
        out[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{name}_key"] = folder / f"{name}.key"
        out[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))

    def issue(name: str, issuer_name, issuer_key, ca: bool, server: bool = False):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        write(name, cert, key)
        return cert, key

    ca, ca_key = issue("ca", None, None, ca=True)
    issue("server", ca.subject, ca_key, ca=False, server=True)
    issue("client", ca.subject, ca_key, ca=False)
    rogue, rogue_key = issue("rogue-ca", None, None, ca=True)
    issue("rogue", rogue.subject, rogue_key, ca=False)
    return out


def test_mutual_tls_https_works_plain_http_gets_no_answer_and_bad_client_certificates_are_refused(registered,
                                                                                                tmp_path):
    files = _certificates(tmp_path)
    tls = {"cert_file": str(files["server_cert"]), "key_file": str(files["server_key"]),
           "client_ca_file": str(files["ca_cert"]), "ca_file": str(files["ca_cert"]),
           "client_cert_file": str(files["client_cert"]), "client_key_file": str(files["client_key"])}
    # An open server (no keys: loopback only) with a small rate limit: it holds without keys too. Two workers
    # (deployment.workers): each serves TLS on the socket its supervisor bound, and the limit is shared by both.
    s = Server(registered, tmp_path, "tls", tls=tls, rate_limit_per_minute=20, workers=2).start()
    try:
        assert s.url.startswith("https://")
        ok = httpx.post(f"{s.url}/v1/models/{SPEC}:predict", json={"instances": [ROW]}, **s.client_kwargs())
        assert ok.status_code == 200, ok.text
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port: no HTTP answer at all
            httpx.get(f"http://127.0.0.1:{s.config.port}/v2/health/live", timeout=5)
        no_cert = ssl.create_default_context(cafile=str(files["ca_cert"]))
        rogue = ssl.create_default_context(cafile=str(files["ca_cert"]))
        rogue.load_cert_chain(str(files["rogue_cert"]), str(files["rogue_key"]))
        for context in (no_cert, rogue):
            with pytest.raises((httpx.HTTPError, ssl.SSLError)):
                httpx.get(f"{s.url}/v2/health/live", verify=context, timeout=5).raise_for_status()
        untrusted = ssl.create_default_context()  # a client that does not trust our CA refuses the server too
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{s.url}/v2/health/live", verify=untrusted, timeout=5)
        # The rate limit holds on an open server: per client address.
        with httpx.Client(**s.client_kwargs()) as c:  # a new connection each time: either worker may take it
            codes = [c.post(f"{s.url}/v1/models/{SPEC}:predict", json={"instances": [ROW]},
                            headers={"Connection": "close"}).status_code for _ in range(25)]
        assert 429 in codes and codes.count(200) <= 20
    finally:
        s.stop()


def test_a_non_loopback_bind_without_keys_refuses_to_start_and_says_why(registered, tmp_path):
    s = Server(registered, tmp_path, "exposed")
    raw = json.loads(s.config_path.read_text())
    raw.update(host="0.0.0.0", api_keys_file=None)
    s.config_path.write_text(json.dumps(raw))
    done = subprocess.run([sys.executable, "-m", "workloads.serving", "--config", str(s.config_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert "host '0.0.0.0' is reachable from other machines, but no API keys are configured" in done.stderr
    assert "gateway_authenticates" in done.stderr
