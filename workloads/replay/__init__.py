"""Replay a dataset's rows to a KServe-style inference server over HTTP, as they are or shifted.

Each row is one decision. Rows go out at a chosen rate (decisions per second), `--batch` rows per request,
with the Open Inference Protocol v2 (`POST /v2/models/{name}/infer`, KServe's pandas codec: one named tensor
per feature column, FP64 for numbers, BYTES for categories and text; a missing value is JSON null) or v1
(`POST /v1/models/{name}:predict` with {"instances": [{column: value, ...}, ...]}). The decision ids the
server returns (the v2 output tensor `decision_id`) are written to a JSON-lines file, one line per row,
with the row's true outcome when the data has a target; `outcomes` reports those outcomes later
(`POST /v2/models/{name}/outcomes`, body {"outcomes": [{"decision_id": ..., "outcome": 0|1}]}).

Normal traffic, then shifted traffic, then the outcomes of both (credit_risk's spec supplies the data,
the feature columns and the target):

    .venv/bin/python -m workloads.replay send --url http://127.0.0.1:8080 --model credit_risk \\
        --spec pipelines/credit_risk.yaml --rows 2000 --rate 50 --decisions normal.jsonl
    .venv/bin/python -m workloads.replay send --url http://127.0.0.1:8080 --model credit_risk \\
        --spec pipelines/credit_risk.yaml --rows 2000 --rate 50 --decisions shifted.jsonl \\
        --scale annual_income=1.1 --reweight emp_title:nurse=8 --match contains \\
        --replace loan_purpose:credit_card=medical --after issue_month=Feb-2018 --time-format %b-%Y
    .venv/bin/python -m workloads.replay outcomes --url http://127.0.0.1:8080 --model credit_risk \\
        --decisions shifted.jsonl --fraction 0.5 \\
        --api-key-file .intelligentops/credit_risk/deployment/operator.key

`--api-key KEY` (or $REPLAY_API_KEY, or `--api-key-file FILE`) sends `Authorization: Bearer KEY`. Reporting
outcomes always needs a key with the `outcomes` scope; locally the deployment keeps one beside the server's
config: `--api-key-file $INTELLIGENTOPS_HOME/credit_risk/deployment/operator.key`. `--data file.csv|.parquet|.jsonl`
replaces the spec's source; `--numeric/--categorical/--text` replace its feature lists.

The shifts are plain functions (`reweight`, `scale`, `replace_category`, `after_time`), applied in that
order after `--after` has cut the time slice (`workloads/replay/shifts.py`); the HTTP side is
`workloads/replay/client.py` and the command line `workloads/replay/cli.py`. It imports no Dagster and, from the
project, only core.protocol (the request bodies every client builds the same way): it is a client, run from
the repository root (or with it on PYTHONPATH) anywhere that can reach the server.
"""


class ReplayError(RuntimeError):
    """Bad arguments, data or server answers; the message names the column, file, field or URL."""
