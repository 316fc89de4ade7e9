"""workloads/replay/ against real HTTP servers: KServe's ModelServer and an outcomes stand-in."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from replay_support import replay_frame
from support import JsonHandler

from workloads.replay import ReplayError, cli
from workloads.replay.client import Client, read_decisions, report_outcomes, send


KEY = "test-key-123"


@pytest.fixture
def frame() -> pd.DataFrame:
    return replay_frame()


# --- shifts -------------------------------------------------------------------------------------------------


_KSERVE_SERVER = r'''
import json, os, sys, uuid
import kserve
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.errors import InvalidInput

LOG, KEY = os.environ["REPLAY_TEST_LOG"], os.environ["REPLAY_TEST_KEY"]


class Trivial(Model):
    def __init__(self):
        super().__init__("credit_risk")
        self.ready = True

    def predict(self, payload, headers=None, response_headers=None):
        auth = {k.lower(): v for k, v in (headers or {}).items()}.get("authorization")
        if auth != f"Bearer {KEY}":
            raise InvalidInput(f"authorization header {auth!r} is not the bearer key")
        if isinstance(payload, InferRequest):
            frame = payload.as_dataframe()  # KServe's own pandas decoding of the request
            record = {"protocol": "v2", "columns": list(frame.columns),
                      "datatypes": {i.name: i.datatype for i in payload.inputs},
                      "dtypes": {c: str(t) for c, t in frame.dtypes.items()},
                      "rows": json.loads(frame.to_json(orient="records"))}
        else:
            record = {"protocol": "v1", "rows": payload["instances"]}
        n = len(record["rows"])
        ids = [uuid.uuid4().hex for _ in range(n)]
        with open(LOG, "a") as fh:
            fh.write(json.dumps({**record, "ids": ids}) + "\n")
        if record["protocol"] == "v1":
            return {"predictions": [{"decision_id": i, "probability": 0.5} for i in ids]}
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=[
            InferOutput(name="probability", shape=[n], datatype="FP64", data=[0.5] * n),
            InferOutput(name="decision_id", shape=[n], datatype="BYTES", data=ids)])


ModelServer(http_port=int(sys.argv[1]), enable_grpc=False, workers=1).start([Trivial()])
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def kserve_server(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("kserve")
    folder = tmp_path_factory.mktemp("kserve")
    script, log = folder / "server.py", folder / "requests.jsonl"
    script.write_text(_KSERVE_SERVER)
    port = _free_port()
    env = {**os.environ, "REPLAY_TEST_LOG": str(log), "REPLAY_TEST_KEY": KEY}
    proc = subprocess.Popen([sys.executable, str(script), str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v2/models/credit_risk/ready", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.stdout.read().decode(errors="replace")[-3000:] if proc.stdout else ""
            pytest.fail(f"the kserve test server did not become ready on {url}:\n{out}")
        time.sleep(0.3)
    try:
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _logged(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


class _OutcomesHandler(JsonHandler):
    received: list[dict] = []

    def do_POST(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self.send_json(401, {"error": "missing or wrong bearer key"})
        if self.path != "/v2/models/credit_risk/outcomes":
            return self.send_json(404, {"error": f"no route {self.path}"})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        items = body.get("outcomes")
        ok = isinstance(items, list) and all(set(i) == {"decision_id", "outcome"} and i["outcome"] in (0, 1)
                                             for i in items)
        if not ok:
            return self.send_json(422, {"error": "body must be {'outcomes': [{'decision_id', 'outcome': 0|1}]}"})
        type(self).received.append(body)
        return self.send_json(200, {"recorded": len(items)})


@pytest.fixture
def outcomes_server():
    _OutcomesHandler.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OutcomesHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _OutcomesHandler.received
    finally:
        server.shutdown()
        server.server_close()


def test_v2_replay_against_kserve(kserve_server, frame: pd.DataFrame, tmp_path: Path) -> None:
    url, log = kserve_server
    seen = len(_logged(log))
    decisions = tmp_path / "decisions.jsonl"
    http = Client(url, api_key=KEY)
    outcome = frame["grade"].isin(["D", "E", "F", "G"]).astype(int)
    started = time.monotonic()
    summary = send(http, "credit_risk", frame, ["income"], ["job", "purpose"], decisions, protocol="v2",
                   rate=40.0, batch=2, outcome=outcome, row_ids=frame["rid"])
    # 5 requests of 2 rows at 40 rows/s: the last is due 8/40 s after the first
    assert time.monotonic() - started >= 0.2
    assert summary.rows == 10 and summary.requests == 5
    requests = _logged(log)[seen:]
    assert len(requests) == 5 and all(r["protocol"] == "v2" for r in requests)
    assert requests[0]["datatypes"] == {"income": "FP64", "job": "BYTES", "purpose": "BYTES"}
    assert requests[0]["dtypes"]["income"] == "float64"
    rows = [row for r in requests for row in r["rows"]]
    assert [r["job"] for r in rows] == frame["job"].tolist()
    assert rows[2]["income"] is None and rows[0]["income"] == 50_000.0  # NaN arrived as a missing number
    lines = [json.loads(x) for x in decisions.read_text().splitlines()]
    assert [x["decision_id"] for x in lines] == [i for r in requests for i in r["ids"]]
    assert [x["row"] for x in lines] == list(range(100, 110))
    assert [x["outcome"] for x in lines] == outcome.tolist()


def test_v1_replay_and_a_wrong_key_against_kserve(kserve_server, frame: pd.DataFrame, tmp_path: Path) -> None:
    url, log = kserve_server
    seen = len(_logged(log))
    summary = send(Client(url, api_key=KEY), "credit_risk", frame.iloc[:3], ["income"], ["job"],
                   tmp_path / "v1.jsonl", protocol="v1", batch=3)
    assert summary.requests == 1
    (request,) = _logged(log)[seen:]
    assert request["protocol"] == "v1" and request["rows"][0] == {"income": 50_000.0, "job": "Registered Nurse"}
    assert len((tmp_path / "v1.jsonl").read_text().splitlines()) == 3
    with pytest.raises(ReplayError, match=r"/v2/models/credit_risk/infer: HTTP 400 .*not the bearer key"):
        send(Client(url, api_key="wrong"), "credit_risk", frame.iloc[:1], ["income"], ["job"],
             tmp_path / "bad.jsonl")


# --- HTTP: the outcomes endpoint, on a stdlib server -------------------------------------------------------


def test_outcomes_are_reported_in_batches_with_the_key(outcomes_server, tmp_path: Path) -> None:
    url, received = outcomes_server
    decisions = tmp_path / "d.jsonl"
    decisions.write_text("".join(json.dumps({"decision_id": f"id{i}", "row": i, "outcome": i % 2}) + "\n"
                                 for i in range(7)))
    n = report_outcomes(Client(url, api_key=KEY), "credit_risk", read_decisions(decisions),
                        batch=3)
    assert n == 7 and [len(b["outcomes"]) for b in received] == [3, 3, 1]
    assert received[0]["outcomes"][1] == {"decision_id": "id1", "outcome": 1}
    received.clear()
    assert report_outcomes(Client(url, api_key=KEY), "credit_risk",
                           read_decisions(decisions), fraction=0.5, seed=3) == 4
    assert len({o["decision_id"] for b in received for o in b["outcomes"]}) == 4
    with pytest.raises(ReplayError, match=r"outcomes: HTTP 401 .*--api-key"):
        report_outcomes(Client(url), "credit_risk", read_decisions(decisions))
    with pytest.raises(ReplayError, match="no decision in the file has an outcome"):
        report_outcomes(Client(url, api_key=KEY), "credit_risk", [{"decision_id": "x"}])


def test_command_line_send_then_outcomes(kserve_server, outcomes_server, frame: pd.DataFrame,
                                         tmp_path: Path) -> None:
    url, log = kserve_server
    out_url, received = outcomes_server
    data = tmp_path / "rows.csv"
    frame.to_csv(data, index=False)
    decisions = tmp_path / "d.jsonl"
    rc = cli.main(["send", "--url", url, "--model", "credit_risk", "--api-key", KEY, "--decisions",
                   str(decisions), "--data", str(data), "--numeric", "income", "--categorical", "purpose",
                   "--text", "job", "--target-column", "grade", "--positive", "D,E,F,G", "--id-column", "rid",
                   "--scale", "income=1.1", "--after", "month=Jan-2018", "--time-format", "%b-%Y", "--batch", "4"])
    assert rc == 0
    lines = [json.loads(x) for x in decisions.read_text().splitlines()]
    assert [x["row"] for x in lines] == [102, 103, 108, 104, 105, 107]  # Feb then Mar
    sent = [row for r in _logged(log)[-2:] for row in r["rows"]]
    assert sent[1]["income"] == pytest.approx(61_000 * 1.1)
    rc = cli.main(["outcomes", "--url", out_url, "--model", "credit_risk", "--api-key", KEY, "--decisions",
                   str(decisions)])
    assert rc == 0
    reported = {o["decision_id"]: o["outcome"] for b in received for o in b["outcomes"]}
    assert reported == {x["decision_id"]: int(x["row"] in (103, 104, 105)) for x in lines}  # grades D, E, F
    assert cli.main(["outcomes", "--url", out_url, "--model", "credit_risk", "--decisions",
                     str(tmp_path / "none.jsonl")]) == 2
