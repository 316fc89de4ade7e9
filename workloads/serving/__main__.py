"""Run the inference server: `python -m workloads.serving --config server.json [--port N] [--audit-url URL]`.

Run it from the repository root with the config the deployment asset writes (core/server_config.py). It builds
the model and its parts, lets KServe's REST server register its routes on KServe's app, adds the project's
routes, decides every route (workloads/serving/routes.py), puts the gateway in front, starts the alias watch and
audit retention threads, and serves the app with uvicorn on the config's host and port, with TLS when the config
has it. With `workers` > 1 this process is the supervisor instead: it checks what it can without the model, binds
the port and starts the workers (workloads/serving/workers.py), each of which runs this program as a worker. A
config, keys file, route table or model version the server cannot use ends it with exit status 2 and one line
that says why.
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
from workloads.serving.logs import setup_logging  # noqa: E402
from workloads.serving.routes import RouteTableError  # noqa: E402
from workloads.serving.versions import ServingRefused  # noqa: E402
from workloads.serving.workers import supervise, worker_env  # noqa: E402

log = logging.getLogger("intelligentops.serving")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workloads.serving",
                                     description="Serve a spec's champion behind KServe's model server.")
    parser.add_argument("--config", required=True, help="server.json written by the deployment asset")
    parser.add_argument("--port", type=int, default=None, help="overrides the config's port")
    parser.add_argument("--audit-url", default=None, help="overrides the config's audit_url")
    ns, _ = parser.parse_known_args(argv)
    return ns


def build_app(cfg: ServerConfig, model, metrics, keys, status, outcomes, limits=None, worker: int = 0):
    """KServe's app with every route decided (routes.py), our routes added, errors that echo nothing, and the
    gateway in front. KServe's REST server registers its routes; we serve the app with our own uvicorn (where it
    listens and TLS are ours to choose: KServe 0.20 always binds 0.0.0.0 without TLS)."""
    import kserve
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.model_server import app
    from kserve.protocol.rest.server import RESTServer

    from workloads.serving.errors import install_error_handlers
    from workloads.serving.gateway import Gateway
    from workloads.serving.metrics import metrics_handler, multiprocess
    from workloads.serving.routes import disable_docs, live_routes

    server = kserve.ModelServer(http_port=cfg.port or DEFAULT_PORT, enable_grpc=False, workers=1,
                                enable_docs_url=False, enable_latency_logging=False)
    server.register_model(model)
    model.start()
    app.add_api_route("/intelligentops/status", status, methods=["GET"])
    app.add_route("/v2/models/{name}/outcomes", outcomes, methods=["POST"])
    RESTServer(FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension,
               cfg.port or DEFAULT_PORT).create_application()
    # KServe's timing middleware reads the process's CPU time twice per request for a trace line we never log
    # (6% of the server's CPU at saturation); /metrics has each request's latency.
    app.user_middleware[:] = [m for m in app.user_middleware if m.cls.__name__ != "TimingMiddleware"]
    if multiprocess():  # /metrics sums every worker's files, not only this process's
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/metrics"]
        app.add_api_route("/metrics", metrics_handler, methods=["GET"])
    routes = live_routes(app)  # refuses to start on a route without a decision
    disable_docs(app)
    install_error_handlers(app)
    app.add_middleware(Gateway, cfg=cfg, keys=keys, metrics=metrics, routes=routes, limits=limits, worker=worker)
    return app


def uvicorn_config(cfg: ServerConfig, app):
    """Where the server listens and how: `host` and `port`, TLS when configured (a client certificate signed by
    `client_ca_file` required when it is set)."""
    import ssl

    import uvicorn

    tls = cfg.tls
    return uvicorn.Config(
        app, host=cfg.host, port=cfg.port or DEFAULT_PORT, log_config=None, access_log=False,
        ssl_certfile=tls.cert_file if tls else None, ssl_keyfile=tls.key_file if tls else None,
        ssl_ca_certs=tls.client_ca_file if tls else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca_file else ssl.CERT_NONE,
        timeout_keep_alive=65, limit_concurrency=1024, server_header=False, date_header=False)


def check_startup(cfg: ServerConfig) -> dict:
    """What can be refused without the model: the keys document, TLS files, a reachable bind without keys.
    Returns the keys."""
    from core.server_config import is_loopback
    from workloads.serving.gateway import load_keys

    keys = load_keys(cfg)
    missing = [f"tls.{k} {v}" for k, v in (cfg.tls.model_dump() if cfg.tls else {}).items()
               if v and k in ("cert_file", "key_file", "client_ca_file") and not os.path.isfile(v)]
    if missing:
        raise ServingRefused(f"{', '.join(missing)}: no such file; fix deployment.tls in the spec (paths are "
                             "relative to the spec's folder)")
    if not keys and not is_loopback(cfg.host) and not cfg.gateway_authenticates:
        raise ApiKeysError(f"host {cfg.host!r} is reachable from other machines but the keys document has no key: "
                           "add keys, bind 127.0.0.1, or set gateway_authenticates")
    return keys


def serve(cfg: ServerConfig) -> None:
    """Build everything from `cfg` and serve until the process is stopped; refusals raise before it listens.
    As a worker of a supervisor (workers.py), on the socket it was handed and with the tables it shares."""
    import socket

    import mlflow
    import uvicorn
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    from core.audit import AuditKeys, AuditStore
    from core.onnx_runtime import THREADS_ENV
    from workloads.serving.batching import BatchingEngine
    from workloads.serving.limits import CallerLimits
    from workloads.serving.metrics import Metrics
    from workloads.serving.model import DecisionModel
    from workloads.serving.outcomes import outcomes_endpoint
    from workloads.serving.retention import prune_daily
    from workloads.serving.similar import SimilarCases
    from workloads.serving.split import ServingReports, split_source
    from workloads.serving.versions import ServedVersions
    from workloads.serving.workers import say_ready, watch_parent, worker_env

    keys = check_startup(cfg)
    # A version's ONNX Runtime sessions (its own model code, which reads no config) take the scoring threads from
    # here, as torch does in the batching engine.
    os.environ[THREADS_ENV] = str(cfg.scoring_threads)
    env = worker_env()
    index = env.index if env else 0
    limits = CallerLimits(env.limits_path, index) if env and env.limits_path else None
    # The process's default store too: MLflow resolves some model URIs through it, never a stray ./mlflow.db.
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.registry_uri or cfg.tracking_uri)
    metrics = Metrics()
    audit = AuditStore(cfg.audit_url, AuditKeys.load(cfg.keys_dir) if cfg.keys_dir else None)
    # The split in force is the newest control event on the audit store's serving chain (workloads/serving/split.py).
    versions = ServedVersions(cfg, metrics, split_source(cfg, audit))
    reports = ServingReports(cfg, audit)
    engine = BatchingEngine(cfg, versions, audit, metrics, SimilarCases(cfg), reports, worker=index)
    model = DecisionModel(cfg, versions, engine)
    model.load()
    threading.Thread(target=versions.watch, name="alias-watch", daemon=True).start()
    threading.Thread(target=reports.watch, args=(versions.stop,), name="serving-reports", daemon=True).start()
    if index == 0:  # once per server, not once per worker
        threading.Thread(target=prune_daily, args=(audit, cfg.retention_days, versions.stop),
                         name="audit-retention", daemon=True).start()
    if env is not None:
        threading.Thread(target=watch_parent, args=(versions.stop,), name="parent-watch", daemon=True).start()
    signal.signal(signal.SIGHUP, lambda *_: versions.poll_now.set())

    async def status():
        return JSONResponse(await run_in_threadpool(engine.status))

    app = build_app(cfg, model, metrics, keys, status,
                    outcomes_endpoint(audit, cfg.spec, cfg.max_outcomes_per_request), limits, index)
    scheme = "https" if cfg.tls else "http"
    log.info("%s: %s serving versions %s on %s://%s:%d (%s, %s), audit log %s", cfg.spec,
             f"worker {index} (pid {os.getpid()})" if env else "the server", versions.alias_versions, scheme,
             cfg.host, cfg.port or DEFAULT_PORT, versions.served.describe(),
             "API keys" if keys else "open for predict and explain on loopback", audit.location())
    say_ready(env)
    sockets = [socket.socket(fileno=env.socket_fd)] if env and env.socket_fd is not None else None
    try:
        uvicorn.Server(uvicorn_config(cfg, app)).run(sockets=sockets)
    finally:
        reports.flush()  # failures counted since the last report
        audit.flush_checkpoints()  # the last head of a burst goes to the checkpoint file before the process ends


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    setup_logging(None)
    try:
        cfg = read_server_config(ns.config, port=ns.port, audit_url=ns.audit_url)
    except ServerConfigError as exc:
        print(f"serving: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg)
    args = sys.argv[1:] if argv is None else list(argv)
    # kserve parses sys.argv when it is imported (and `--config` would pass for one of its flags): hand it none.
    sys.argv = sys.argv[:1]
    try:
        if cfg.workers > 1 and worker_env() is None:
            check_startup(cfg)  # refused here, once, before any worker starts
            return supervise(cfg, args, uvicorn_config(cfg, None).bind_socket())
        serve(cfg)
    except (ServingRefused, ApiKeysError, RouteTableError) as exc:
        log.error("%s", exc)
        print(f"serving: {exc}", file=sys.__stderr__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
