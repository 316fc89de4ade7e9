"""The ceiling arm of serve_throughput.py: KServe's own ModelServer with a model that returns a constant.

    .venv/bin/python benchmarks/kserve_constant.py --name credit_risk --port 8085 [--workers 2]

It takes the same v1 body our server takes (`{"instances": [...]}`), does no work on it and answers one fixed
prediction per instance: what is left is KServe's request path (uvicorn, FastAPI, the data plane, JSON both
ways), which is the most one Python server process can do here. With `--workers N` KServe starts N uvicorn
processes behind one port (its own multi-process server, spawned), as our server's `deployment.workers` does.
Like ours, it writes no line per request (no access log, no latency log).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

QUIET = {"version": 1, "disable_existing_loggers": False,
         "handlers": {"err": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}},
         "root": {"level": "WARNING", "handlers": ["err"]},
         "loggers": {name: {"level": "WARNING"} for name in ("uvicorn", "uvicorn.access", "uvicorn.error", "kserve",
                                                             "kserve.trace")}}

if __name__ == "__main__":
    # kserve parses sys.argv when it is imported, in this process and in every worker it spawns (they re-run this
    # module as __mp_main__ with the same argv): give it its own flags and keep ours aside.
    _parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _parser.add_argument("--name", required=True)
    _parser.add_argument("--port", type=int, required=True)
    _parser.add_argument("--workers", type=int, default=1)
    ARGS = _parser.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as _fh:
        json.dump(QUIET, _fh)
    sys.argv = [sys.argv[0], "--enable_latency_logging", "false", "--log_config_file", _fh.name]

import kserve


class ConstantModel(kserve.Model):
    """Answers every instance with the same decision, without looking at it."""

    def __init__(self, name: str):
        super().__init__(name)
        self.ready = True

    def load(self) -> bool:
        self.ready = True
        return True

    async def predict(self, payload, headers=None, response_headers=None):
        n = len(payload.get("instances", [])) if isinstance(payload, dict) else 1
        return {"predictions": [{"probability": 0.25, "decision": 0}] * n}


if __name__ == "__main__":
    kserve.ModelServer(http_port=ARGS.port, enable_grpc=False, workers=ARGS.workers, enable_docs_url=False,
                       enable_latency_logging=False).start([ConstantModel(ARGS.name)])
