"""The batching engine: requests are scored in bounded slices, taken from each caller in turn, and each request's
decisions are committed to the audit log (group commit) before its answer leaves.

Where the time goes (benchmarks/README.md): embedding a text the model has not seen costs about 2.5 ms plus
0.12 ms per character on one CPU thread; the network, the explanation and the commit are small beside it. So a
request's cost is counted in characters of text plus `ROW_CHARS` per row, and one batch holds at most
`batch_text_chars` of it (at least one row). A large request is cut into slices of that size and the request
with the fewest rows scored so far goes first (least attained service), so a one-row request waits for about
the one slice being scored when it arrives, never for a whole large request; how many requests one caller (a key
id, or a client address: the gateway's CLIENT_HEADER) may have waiting is bounded by the gateway
(`max_in_flight_per_client`), and how often by its rate limit.

`BatchingEngine.submit` queues a request's validated rows and waits for its records. One worker takes a batch
(round robin across callers, within the cost bound), scores it on one thread (the versions the request started
on, even if an alias moves between its slices), and holds each slice's records on its request; a request whose
last slice was scored is committed together with the others finished in that batch, in one transaction, and
only then answered. Records of a request that fails are never written: a decision is on the log exactly when
it was answered. A batch that fails is retried slice by slice, so one request's bad row fails only that request;
a commit that fails fails every request in it: nobody gets an unaudited answer.

Every row is scored by the answering version's out-of-distribution detector (core/ood.py) when it has one:
`ood_score` and `ood` (0 in distribution, 1 flagged) go on its record and its answer, and /metrics counts flagged
rows per key. Under `out_of_distribution: refuse_for_review` a request with a flagged row is refused (400 naming
the rows); its flagged rows are recorded with `ood` 2 (never answered) for a person to review.

The traffic policy is applied here: `canary` sends `canary_share` of requests to `@challenger`; `shadow` lets the
challenger score every row too, recorded as variant `shadow` and never answered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from core.audit import OOD_FLAGGED, OOD_IN, OOD_REFUSED, AuditStore, input_hash, now_iso, redact
from core.names import CHALLENGER, CHAMPION
from core.server_config import ServerConfig
from workloads.serving.decoding import InvalidRequest
from workloads.serving.metrics import Metrics
from workloads.serving.similar import SimilarCases
from workloads.serving.versions import ServedVersion, ServedVersions

CANARY, SHADOW = "canary", "shadow"
ROW_CHARS = 20  # what one row costs beside its text, in characters of text (measured: ~2.5 ms per new text)


REFUSE_FOR_REVIEW = "refuse_for_review"


class OodRefused(InvalidRequest):
    """A request refused for human review: rows unlike the data the model learned from. `records` are the flagged
    rows' records (ood 2), committed to the audit log though never answered."""

    def __init__(self, message: str, records: list[dict[str, Any]]):
        super().__init__(message)
        self.records = records


@dataclass(eq=False)
class Pending:
    """One request waiting for its decisions; its rows are scored a slice at a time."""

    rows: list[dict[str, Any]]
    variant: str  # champion | canary
    explain: int
    key_id: str | None
    caller: str
    arrived: float
    future: asyncio.Future
    costs: list[int] = field(default_factory=list)
    taken: int = 0  # rows handed to a batch so far
    scored: int = 0  # rows scored so far
    versions: dict[str, ServedVersion] | None = None  # pinned when its first slice is scored
    records: list[dict[str, Any]] = field(default_factory=list)  # answered decisions, held until committed
    shadow: list[dict[str, Any]] = field(default_factory=list)  # the challenger's, recorded, never answered
    error: BaseException | None = None
    similar: bool = False  # the caller's key has the similar_cases scope


@dataclass(frozen=True)
class Slice:
    pending: Pending
    start: int
    stop: int


def row_cost(row: dict[str, Any], text_columns: list[str]) -> int:
    return ROW_CHARS + sum(len(row[c]) for c in text_columns if isinstance(row.get(c), str))


class FairQueue:
    """The requests waiting to be scored; `take` builds one batch within a cost bound, least attained service
    first: the request that has had the fewest rows scored goes first (a new one-row request before the rest of
    a large one), each request at most one slice per batch, and a slice that does not fit the batch waits for the
    next, so a cheap request is never scored in the same batch as an expensive slice taken after it."""

    def __init__(self) -> None:
        self.pending: list[Pending] = []

    def put(self, p: Pending) -> None:
        self.pending.append(p)

    def waiting_rows(self) -> int:
        return sum(len(p.rows) - p.taken for p in self.pending)

    def take(self, budget: int, max_rows: int) -> list[Slice]:
        slices: list[Slice] = []
        used = rows = 0
        for p in sorted(self.pending, key=lambda p: (p.taken, p.arrived)):
            if used >= budget or rows >= max_rows:
                break
            start = stop = p.taken
            while stop < len(p.rows) and rows < max_rows and (not slices and stop == start
                                                              or used + p.costs[stop] <= budget):
                used += p.costs[stop]
                rows += 1
                stop += 1
            if stop == start:  # its next row does not fit this batch: it leads the next one
                break
            slices.append(Slice(p, start, stop))
            p.taken = stop
            if stop == len(p.rows):
                self.pending.remove(p)
        return slices


class BatchingEngine:
    """Scores queued requests in fair, bounded batches and commits their decisions before answering."""

    def __init__(self, cfg: ServerConfig, versions: ServedVersions, audit: AuditStore, metrics: Metrics,
                 similar: SimilarCases):
        import torch

        # A model this small is matrix-vector work: torch's intra-op thread pool costs more in hand-offs than it
        # saves (measured: 17 ms -> 3.6 ms per 16-row batch with one thread on two busy cores).
        torch.set_num_threads(int(os.environ.get("INTELLIGENTOPS_SERVE_THREADS", "1")))
        self.cfg, self.versions, self.audit, self.metrics, self.similar = cfg, versions, audit, metrics, similar
        self.rng = random.Random()
        self.queue = FairQueue()
        self.wake: asyncio.Event | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")

    def _variant(self) -> str:
        current = self.versions.current
        if (self.cfg.mode == CANARY and CHALLENGER in current
                and current[CHALLENGER].version != current[CHAMPION].version
                and self.rng.random() < self.cfg.canary_share):
            return CANARY
        return CHAMPION

    async def submit(self, rows: list[dict[str, Any]], explain: int, key_id: str | None,
                     caller: str | None = None, similar: bool = False) -> list[dict[str, Any]]:
        """The audit records of `rows`' decisions, once they are committed."""
        if self.wake is None:
            self.wake = asyncio.Event()
            asyncio.get_running_loop().create_task(self._drain())
        loop = asyncio.get_running_loop()
        pending = Pending(rows=rows, variant=self._variant(), explain=explain, key_id=key_id,
                          caller=caller or (f"key:{key_id}" if key_id else "anonymous"), arrived=time.perf_counter(),
                          future=loop.create_future(), costs=[row_cost(r, self.cfg.text) for r in rows],
                          similar=similar)
        self.queue.put(pending)
        self.metrics.scoring_queue.set(self.queue.waiting_rows())
        self.wake.set()
        return await pending.future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            slices = self.queue.take(self.cfg.batch_text_chars, self.cfg.max_batch_rows)
            self.metrics.scoring_queue.set(self.queue.waiting_rows())
            if not slices:
                self.wake.clear()
                continue
            try:
                done = await loop.run_in_executor(self.executor, self._run, slices)
                for p in done:
                    if not p.future.done():
                        p.future.set_exception(p.error) if p.error is not None else p.future.set_result(p.records)
            except BaseException as exc:  # the commit failed: nobody gets an unaudited answer
                for s in slices:
                    s.pending.error = s.pending.error or exc
                    if not s.pending.future.done():
                        s.pending.future.set_exception(exc)

    def _run(self, slices: list[Slice]) -> list[Pending]:
        """Score the slices (together; if that fails, each alone, so a failure is only its own request's), then
        commit the requests whose last row was scored. Returns those requests."""
        live = [s for s in slices if s.pending.error is None]
        try:
            self._score(live)
        except Exception:
            for s in live:
                try:
                    self._score([s])
                except Exception as exc:
                    s.pending.error = exc
        finished = []
        for s in slices:
            p = s.pending
            p.scored += s.stop - s.start
            if p.error is not None or p.scored == len(p.rows):
                finished.append(p)
        records = [r for p in finished if p.error is None for r in (*p.records, *p.shadow)]
        records += [r for p in finished if isinstance(p.error, OodRefused) for r in p.error.records]
        if records:
            self.audit.append(records)  # committed (group commit) before any answer leaves
            self.metrics.batch_rows.observe(len(records))
            for r in records:
                self.metrics.decisions.labels(model=self.cfg.spec, variant=r["variant"], version=r["model_version"],
                                              decision=str(r["decision"])).inc()
                if r.get("ood") in (OOD_FLAGGED, OOD_REFUSED) and r["variant"] != SHADOW:
                    self.metrics.ood_rows.labels(key_id=r["key_id"] or "(none)",
                                                 action="refused" if r["ood"] == OOD_REFUSED else "answered").inc()
        for p in finished:
            if p.error is not None:
                p.records, p.shadow = [], []
        return finished

    def _score(self, slices: list[Slice]) -> None:
        groups: dict[tuple[str, int, str], tuple[ServedVersion, list[Slice]]] = {}
        staged: dict[int, tuple[list, list]] = {}
        for s in slices:
            p = s.pending
            if p.versions is None:
                p.versions = self.versions.current  # its later slices finish on these even if an alias moves
            champion, challenger = p.versions[CHAMPION], p.versions.get(CHALLENGER)
            if challenger is not None and challenger.version == champion.version:
                challenger = None
            answering, label = (challenger, CANARY) if p.variant == CANARY and challenger is not None else \
                (champion, CHAMPION)
            groups.setdefault((answering.version, p.explain, label), (answering, []))[1].append(s)
            if self.cfg.mode == SHADOW and challenger is not None:
                groups.setdefault((challenger.version, p.explain, SHADOW), (challenger, []))[1].append(s)
            staged[id(s)] = ([], [])
        now = now_iso()
        for (_, explain, label), (version, items) in groups.items():
            for s, recs in self._decide(items, version, explain, label, now):
                staged[id(s)][1 if label == SHADOW else 0].extend(recs)
        for s in slices:  # only once every group scored: a failed batch leaves no half-held records
            answered, shadowed = staged[id(s)]
            s.pending.records.extend(answered)
            s.pending.shadow.extend(shadowed)

    def _decide(self, items: list[Slice], version: ServedVersion, explain: int, variant: str,
                now: str) -> list[tuple[Slice, list[dict[str, Any]]]]:
        """Score the rows of `items` on `version`; records per slice (not yet committed)."""
        import pandas as pd

        rows = [r for s in items for r in s.pending.rows[s.start:s.stop]]
        frame = pd.DataFrame(rows, columns=self.cfg.features)
        prob, factors, ood = version.score(frame, explain)
        similar = self.similar.lookup(version, rows)
        out, j = [], 0
        for s in items:
            p, n = s.pending, s.stop - s.start
            bad = [k for k in range(n) if not math.isfinite(float(prob[j + k]))]
            if bad:
                # Values inside the accepted ranges can still overflow the network: refuse this request only.
                raise InvalidRequest(f"row {s.start + bad[0]}: these feature values give no finite score; check "
                                     "the magnitude of the numeric fields")
            recs = []
            for row in p.rows[s.start:s.stop]:
                probability = float(prob[j])
                verdict = None if ood is None else (OOD_FLAGGED if ood.flagged[j] else OOD_IN)
                recs.append({
                    "decision_id": uuid.uuid4().hex, "time": now, "spec": self.cfg.spec,
                    "model_name": self.cfg.spec, "model_version": version.version, "variant": variant,
                    "input_hash": input_hash(row), "inputs": redact(row, self.cfg.redact),
                    "probability": probability, "decision": int(probability >= version.threshold),
                    "threshold": version.threshold, "top_factors": factors[j] if factors else [],
                    "similar_cases": similar[j] if p.similar else [],
                    "latency_ms": (time.perf_counter() - p.arrived) * 1000.0, "key_id": p.key_id,
                    "ood_score": None if ood is None else float(ood.scores[j]), "ood": verdict,
                })
                j += 1
            if self.cfg.out_of_distribution == REFUSE_FOR_REVIEW and variant != SHADOW:
                flagged = [k for k, r in enumerate(recs) if r["ood"] == OOD_FLAGGED]
                if flagged:
                    held = [{**recs[k], "ood": OOD_REFUSED} for k in flagged]
                    raise OodRefused(
                        f"row(s) {[s.start + k for k in flagged][:20]} are unlike the data the model learned from "
                        f"(out-of-distribution score {held[0]['ood_score']:.1f} above {ood.threshold:.1f}): refused "
                        "for human review; the rows are recorded, no decision is answered", held)
            out.append((s, recs))
        return out

    def status(self) -> dict[str, Any]:
        """What /intelligentops/status answers: the versions serving, the traffic policy, the audit log."""
        return {"spec": self.cfg.spec, "pid": os.getpid(), "mode": self.cfg.mode,
                "canary_share": self.cfg.canary_share,
                "versions": {a: {"version": v.version, "operating_threshold": v.threshold,
                                 "manifest_sha256": v.manifest_sha256, "run_id": v.run_id}
                             for a, v in self.versions.current.items()},
                "audit_url": self.audit.location(), "audit_latest_seq": self.audit.latest_seq(),
                "scoring_queue_rows": self.queue.waiting_rows(),
                "last_error": self.versions.last_error}
