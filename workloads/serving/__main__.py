"""Run the inference server: `python -m workloads.serving --config server.json [--port N] [--audit-url URL]`.

Run it from the repository root with the config the deployment asset writes (core/server_config.py). It builds
the model and its parts, adds the gateway middleware and the project's routes to KServe's app, starts the alias
watch and audit retention threads, and runs `kserve.ModelServer` in the foreground. A config, keys file or model
version the server cannot use ends it with exit status 2 and one line that says why.
"""

import os

# Refuse pickle before mlflow is imported anywhere in this process.
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from core.server_config import DEFAULT_PORT, ServerConfig, ServerConfigError, read_server_config  # noqa: E402
from workloads.serving.gateway import ApiKeysError  # noqa: E402
from workloads.serving.versions import ServingRefused  # noqa: E402

log = logging.getLogger("intelligentops.serving")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workloads.serving",
                                     description="Serve a spec's champion behind KServe's model server.")
    parser.add_argument("--config", required=True, help="server.json written by the deployment asset")
    parser.add_argument("--port", type=int, default=None, help="overrides the config's port")
    parser.add_argument("--audit-url", default=None, help="overrides the config's audit_url")
    ns, _ = parser.parse_known_args(argv)
    return ns


def serve(cfg: ServerConfig) -> None:
    """Build everything from `cfg` and serve until the process is stopped; refusals raise before it listens."""
    import kserve
    import mlflow
    from fastapi.responses import JSONResponse
    from kserve.model_server import app

    from core.audit import AuditKeys, AuditStore
    from workloads.serving.batching import BatchingEngine
    from workloads.serving.gateway import Gateway, load_keys
    from workloads.serving.metrics import Metrics
    from workloads.serving.model import DecisionModel
    from workloads.serving.outcomes import outcomes_endpoint
    from workloads.serving.retention import prune_daily
    from workloads.serving.similar import SimilarCases
    from workloads.serving.versions import ServedVersions

    # The process's default store too: MLflow resolves some model URIs through it, never a stray ./mlflow.db.
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.registry_uri or cfg.tracking_uri)
    metrics = Metrics()
    keys = load_keys(cfg)
    versions = ServedVersions(cfg, metrics)
    audit = AuditStore(cfg.audit_url, AuditKeys.load(cfg.keys_dir) if cfg.keys_dir else None)
    engine = BatchingEngine(cfg, versions, audit, metrics, SimilarCases(cfg))
    model = DecisionModel(cfg, versions, engine)
    model.load()
    threading.Thread(target=versions.watch, name="alias-watch", daemon=True).start()
    threading.Thread(target=prune_daily, args=(audit, cfg.retention_days, versions.stop), name="audit-retention",
                     daemon=True).start()
    signal.signal(signal.SIGHUP, lambda *_: versions.poll_now.set())

    async def status():
        return JSONResponse(engine.status())

    app.add_api_route("/intelligentops/status", status, methods=["GET"])
    app.add_route("/v2/models/{name}/outcomes", outcomes_endpoint(audit, cfg.spec), methods=["POST"])
    app.add_middleware(Gateway, cfg=cfg, keys=keys, metrics=metrics)
    port = cfg.port or DEFAULT_PORT
    log.info("%s: serving versions %s on port %d (%s policy), audit log %s", cfg.spec, versions.alias_versions,
             port, cfg.mode, audit.location())
    # One line per request would cost more than scoring it; /metrics has the counts and latencies.
    for name in ("kserve.trace", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    kserve.ModelServer(http_port=port, enable_grpc=False, workers=1, enable_latency_logging=False).start([model])


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = read_server_config(ns.config, port=ns.port, audit_url=ns.audit_url)
    except ServerConfigError as exc:
        print(f"serving: {exc}", file=sys.stderr)
        return 2
    # kserve parses sys.argv when it is imported (and `--config` would pass for one of its flags): hand it none.
    sys.argv = sys.argv[:1]
    try:
        serve(cfg)
    except (ServingRefused, ApiKeysError) as exc:
        log.error("%s", exc)
        print(f"serving: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
