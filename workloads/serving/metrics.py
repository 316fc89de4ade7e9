"""The server's own Prometheus metrics, beside KServe's per-stage histograms on the same /metrics page:
requests and latency per protocol and refusals per route scope and status (counted by the gateway), decisions per variant and version, rows per batch,
out-of-distribution rows per key, the version each alias serves, and alias moves that could not be loaded.

With several worker processes (deployment.workers) prometheus_client's multiprocess mode is on: the supervisor
gives the workers one private folder in PROMETHEUS_MULTIPROC_DIR, each worker's counters and histograms go to
files there, and /metrics (any worker) answers their sums, so a Prometheus scrape sees one server, as it would
a single process. A dead worker's counts stay in the sums (counters never go down); gauges count live workers
only (the queue summed, the version per alias the most recent)."""

from __future__ import annotations

import os

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


async def metrics_handler(request):
    """/metrics over every worker's files (the route KServe registers, answered from the shared folder)."""
    from prometheus_client import CollectorRegistry, exposition, multiprocess as mp
    from starlette.responses import Response

    registry = CollectorRegistry()
    mp.MultiProcessCollector(registry)
    encoder, content_type = exposition.choose_encoder(request.headers.get("accept"))
    return Response(content=encoder(registry), headers={"content-type": content_type})



class Metrics:
    """The counters and histograms, registered once per process in prometheus_client's default registry."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("intelligentops_requests_total", "Inference requests by protocol and HTTP status",
                                ["protocol", "code"])
        self.latency = Histogram("intelligentops_request_latency_seconds", "Inference request latency",
                                 ["protocol"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.decisions = Counter("intelligentops_decisions_total", "Audited decisions",
                                 ["model", "variant", "version", "decision"])
        self.batch_rows = Histogram("intelligentops_batch_rows", "Rows scored and committed together",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.serving = Gauge("intelligentops_serving_version", "Model version serving per alias", ["alias"],
                             multiprocess_mode="livemostrecent")
        self.refusals = Counter("intelligentops_refusals_total", "Requests refused (4xx) by route scope and status",
                                ["route", "code"])
        self.scoring_queue = Gauge("intelligentops_scoring_queue_rows", "Rows waiting to be scored",
                                   multiprocess_mode="livesum")
        self.ood_rows = Counter("intelligentops_ood_rows_total", "Rows the out-of-distribution detector flagged, "
                                "per key and what they got (answered, refused)", ["key_id", "action"])
        self.swap_failures = Counter("intelligentops_swap_failures_total", "Alias moves that could not be loaded")
