"""The inference server: a spec's champion behind KServe's model server, every decision on the audit log.

Run it from the repository root with the config file the deployment asset writes (core/server_config.py):

    python -m workloads.serving --config $INTELLIGENTOPS_HOME/credit_risk/deployment/server.json [--port 8080]

(`make serve` writes the config for the default pipeline and runs this in the foreground.) The same program is
the predictor container of a KServe InferenceService on a cluster (resources/servers.py renders it).

What it speaks (the model name is the spec's name; only health is open, the rest needs a key's scope:
docs/serving.md, docs/security.md):
    GET  /v2/health/live, /v2/health/ready, /v2/models/<spec>, /v2/models/<spec>/ready     Open Inference Protocol
    POST /v2/models/<spec>/infer        pandas-codec inputs: one named tensor per feature column, one row each
    POST /v1/models/<spec>:predict      {"instances": [{"income": 52000, "purpose": "car", ...}, ...]}
    POST /v1/models/<spec>:explain      the same, with each decision's top factors always filled in
    POST /v2/models/<spec>/outcomes     {"outcomes": [{"decision_id": ..., "outcome": 0 or 1}, ...]}
    GET  /metrics                       Prometheus: requests, latency, decisions per variant and version
    GET  /intelligentops/status         which versions serve, the traffic policy, the audit log

Every answered row carries the fields of core.names.OUTPUTS (probability, decision at the version's
`operating_threshold` tag, decision id, model version, variant, top factors, similar cases); the decision is
committed to the hash-chained audit log (core/audit/) before the response leaves.

The package is shaped like KServe's own servers (python/sklearnserver, python/custom_model):
- `__main__`: arguments, the app (gateway middleware, status and outcomes routes), threads, `kserve.ModelServer`.
- `model`: `DecisionModel`, the `kserve.Model` (preprocess decodes, predict scores, postprocess answers).
- `decoding`: v1 and v2 bodies to checked feature rows (`InvalidRequest` names the field).
- `routes`: every route's access decision (open, a scope, removed); the live route table walked at start.
- `gateway`: every request decided before a handler runs: route, key and scope, rate limit, in-flight bound,
  body limit, the binary extension turned into JSON (`binary`), strict JSON (ASGI middleware).
- `errors`, `logs`: answers that echo nothing; one JSON line per refusal; the log rotated by size.
- `batching`: fair scoring in cost-bounded slices and group commit to the audit log; the traffic policy.
- `versions`: loading by alias, verification against the manifest, alias polling (`ServingRefused`).
- `similar`: similar cases from the spec's vector index. `outcomes`: the outcomes route.
- `workers`: the supervisor of several worker processes on one port; `limits`: callers' rate limits and requests
  in flight, shared by the workers.
- `metrics`: the Prometheus metrics. `retention`: the audit log's retention.
"""
