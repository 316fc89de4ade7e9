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
only then answered. Commits run on a thread of their own, one at a time and in batch order, so the next batch
is scored while the last one waits for its fsync (one commit at most beside the scoring). Records of a request that fails are never written: a decision is on the log exactly when
it was answered. A batch that fails is retried slice by slice, so one request's bad row fails only that request;
a commit that fails fails every request in it: nobody gets an unaudited answer.

The traffic split is applied here (workloads/serving/split.py): a request's variant is drawn when its first slice
is scored, from the split of that moment (`canary` sends `share` of requests to the challenger; `shadow` lets the
challenger score every row too, recorded as variant `shadow` and never answered). A new split is taken up between
two batches; a request still being scored then starts again on it, so every decision committed after the server's
`applied` event is of the new split. A shadow that fails to score never fails the champion's answer; failures are
counted per variant and version and reported to the serving chain. Records carry the caller's audit-only fields
(core/server_config.py `audit_fields`), which the model never sees.

Every row is scored by the answering version's out-of-distribution detector (core/ood.py) when it has one:
`ood_score` and `ood` (0 in distribution, 1 flagged) go on its record and its answer, and /metrics counts flagged
rows per key. Under `out_of_distribution: refuse_for_review` a request with a flagged row is refused (400 naming
the rows); its flagged rows are recorded with `ood` 2 (never answered) for a person to review.
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
from workloads.serving.notices import ServedNotices
from workloads.serving.similar import SimilarCases
from workloads.serving.split import CANARY, SHADOW, ServedSplit, ServingReports
from workloads.serving.versions import ServedVersion, ServedVersions

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
    variant: str  # champion | canary: drawn when its first slice is scored
    explain: int
    key_id: str | None
    caller: str
    arrived: float
    future: asyncio.Future
    costs: list[int] = field(default_factory=list)
    taken: int = 0  # rows handed to a batch so far
    scored: int = 0  # rows scored so far
    split: ServedSplit | None = None  # pinned when its first slice is scored (its variant with it)
    audit: list[dict[str, Any]] | None = None  # per row: the caller's audit-only fields (never model inputs)
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
                 similar: SimilarCases, reports: ServingReports | None = None, worker: int = 0):
        import torch

        # A model this small is matrix-vector work: torch's intra-op thread pool costs more in hand-offs than it
        # saves (measured: 17 ms -> 3.6 ms per 16-row batch with one thread on two busy cores).
        torch.set_num_threads(cfg.scoring_threads)
        self.cfg, self.versions, self.audit, self.metrics, self.similar = cfg, versions, audit, metrics, similar
        self.rng = random.Random()
        self.worker = worker  # this process's index among the server's workers (0 for a single process)
        self.queue = FairQueue()
        self.wake: asyncio.Event | None = None
        self.reports = reports or ServingReports(cfg, audit)
        self.taken_up: ServedSplit | None = None  # the split the scoring loop serves now
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        # Commits run on their own thread, one at a time and in batch order, so the next batch is scored while
        # the last one's commit waits for its fsync (at most one commit beside the scoring).
        self.committer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
        self.notices = ServedNotices(cfg, versions) if cfg.notice_prompt else None  # refreshed with the aliases

    def _take_up(self, split: ServedSplit) -> None:
        """A new split, between two batches (on the event loop): requests already started on another split start
        again on this one, their held records dropped, so nothing of the old split is committed after it."""
        for p in self.queue.pending:
            if p.split is not None and p.split is not split:
                p.split, p.variant, p.taken, p.scored, p.records, p.shadow = None, CHAMPION, 0, 0, [], []
        self.taken_up = split

    async def submit(self, rows: list[dict[str, Any]], explain: int, key_id: str | None,
                     caller: str | None = None, audit: list[dict[str, Any]] | None = None,
                     similar: bool = False) -> list[dict[str, Any]]:
        """The audit records of `rows`' decisions, once they are committed."""
        if self.wake is None:
            self.wake = asyncio.Event()
            asyncio.get_running_loop().create_task(self._drain())
        loop = asyncio.get_running_loop()
        pending = Pending(rows=rows, variant=CHAMPION, explain=explain, key_id=key_id,
                          caller=caller or (f"key:{key_id}" if key_id else "anonymous"), arrived=time.perf_counter(),
                          future=loop.create_future(), costs=[row_cost(r, self.cfg.text) for r in rows], audit=audit,
                          similar=similar)
        self.queue.put(pending)
        self.metrics.scoring_queue.set(self.queue.waiting_rows())
        self.wake.set()
        return await pending.future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        window = self.cfg.batch_window_ms / 1000.0
        idle = True
        committing: asyncio.Task | None = None  # the previous batch's commit, running beside this batch's scoring
        while True:
            await self.wake.wait()
            if idle and window:  # the scorer was idle: let the batch fill for `batch_window_ms` first
                await asyncio.sleep(window)
            idle = False
            split = self.versions.served
            if split is not self.taken_up:
                self._take_up(split)
            slices = self.queue.take(self.cfg.batch_text_chars, self.cfg.max_batch_rows)
            self.metrics.scoring_queue.set(self.queue.waiting_rows())
            if not slices:
                self.wake.clear()
                idle = True
                continue
            try:
                finished = await loop.run_in_executor(self.executor, self._run, slices, split)
            except BaseException as exc:
                self._fail(slices, exc)
                continue
            if committing is not None:
                await committing  # in batch order, and never more than one commit waiting
            committing = loop.create_task(self._commit(slices, finished, split))

    @staticmethod
    def _fail(slices: list[Slice], exc: BaseException) -> None:
        for s in slices:
            s.pending.error = s.pending.error or exc
            if not s.pending.future.done():
                s.pending.future.set_exception(exc)

    async def _commit(self, slices: list[Slice], finished: list[Pending], split: ServedSplit) -> None:
        """Commit the finished requests' records (on the commit thread), then answer them. Which records: decided
        here, after the commit before this one ended, so a request that commit failed has none of its rows
        written by this one."""
        records = [r for p in finished if p.error is None for r in (*p.records, *p.shadow)]
        records += [r for p in finished if isinstance(p.error, OodRefused) for r in p.error.records]
        try:
            await asyncio.get_running_loop().run_in_executor(self.committer, self._write, records, split)
        except BaseException as exc:  # the commit failed: nobody gets an unaudited answer
            self._fail(slices, exc)
            return
        for p in finished:
            if p.error is not None:
                p.records, p.shadow = [], []
            if not p.future.done():
                p.future.set_exception(p.error) if p.error is not None else p.future.set_result(p.records)

    def _write(self, records: list[dict[str, Any]], split: ServedSplit) -> None:
        """The commit thread: the split's `applied` event first when it is new (so every decision committed after
        it is of this split), then the records in one transaction, before any of their answers leaves."""
        self.reports.apply(split)
        if not records:
            return
        self.audit.append(records)  # group commit: one transaction, one fsync
        self.metrics.batch_rows.observe(len(records))
        for r in records:
            self.metrics.decisions.labels(model=self.cfg.spec, variant=r["variant"], version=r["model_version"],
                                          decision=str(r["decision"])).inc()
            if r.get("ood") in (OOD_FLAGGED, OOD_REFUSED) and r["variant"] != SHADOW:
                self.metrics.ood_rows.labels(key_id=r["key_id"] or "(none)",
                                             action="refused" if r["ood"] == OOD_REFUSED else "answered").inc()

    def _run(self, slices: list[Slice], split: ServedSplit) -> list[Pending]:
        """Score the slices (together; if that fails, each alone, so a failure is only its own request's). Returns
        the requests whose last row was scored (or that failed): the ones the next commit answers."""
        live = [s for s in slices if s.pending.error is None]
        try:
            self._score(live, split)
        except Exception:
            for s in live:
                try:
                    self._score([s], split)
                except Exception as exc:
                    s.pending.error = exc
                    p = s.pending
                    self.reports.failed(p.variant, p.split.versions[CHALLENGER if p.variant == CANARY else
                                                                    CHAMPION].version if p.split else "?",
                                        "refused" if isinstance(exc, InvalidRequest) else "error", len(p.rows))
        finished = []
        for s in slices:
            p = s.pending
            p.scored += s.stop - s.start
            if p.error is not None or p.scored == len(p.rows):
                finished.append(p)
        return finished

    def _score(self, slices: list[Slice], split: ServedSplit) -> None:
        answering: dict[tuple[str, int, str], tuple[ServedVersion, list[Slice]]] = {}
        shadowing: dict[tuple[str, int], tuple[ServedVersion, list[Slice]]] = {}
        staged: dict[int, tuple[list, list]] = {}
        for s in slices:
            p = s.pending
            if p.split is None:  # its first slice: the split and the variant it is answered by, from now on
                p.split, p.variant = split, split.variant(self.rng)
            challenger = p.split.challenger
            version, label = (challenger, CANARY) if p.variant == CANARY and challenger is not None else \
                (p.split.champion, CHAMPION)
            answering.setdefault((version.version, p.explain, label), (version, []))[1].append(s)
            if p.split.shadows:
                shadowing.setdefault((challenger.version, p.explain), (challenger, []))[1].append(s)
            staged[id(s)] = ([], [])
        now, started = now_iso(), time.perf_counter()
        for (_, explain, label), (version, items) in answering.items():
            for s, recs in self._decide(items, version, explain, label, now):
                staged[id(s)][0].extend(recs)
        for (_, explain), (version, items) in shadowing.items():
            try:  # the challenger's latency as if it had answered: queueing up to now, then its own scoring
                for s, recs in self._decide(items, version, explain, SHADOW, now, alone_since=started):
                    staged[id(s)][1].extend(recs)
            except Exception as exc:  # a shadow never fails the answer; its failure is counted and reported
                self.reports.failed(SHADOW, version.version, "refused" if isinstance(exc, InvalidRequest) else
                                    "error", sum(s.stop - s.start for s in items))
        for s in slices:  # only once every answering group scored: a failed batch leaves no half-held records
            answered, shadowed = staged[id(s)]
            s.pending.records.extend(answered)
            s.pending.shadow.extend(shadowed)

    def _decide(self, items: list[Slice], version: ServedVersion, explain: int, variant: str,
                now: str, alone_since: float | None = None) -> list[tuple[Slice, list[dict[str, Any]]]]:
        """Score the rows of `items` on `version`; records per slice (not yet committed)."""
        import pandas as pd

        began = time.perf_counter()
        rows = [r for s in items for r in s.pending.rows[s.start:s.stop]]
        frame = pd.DataFrame(rows, columns=self.cfg.features)
        prob, factors, ood = version.score(frame, explain)
        similar = self.similar.lookup(version, rows)
        done = time.perf_counter()
        out, j = [], 0
        for s in items:
            p, n = s.pending, s.stop - s.start
            bad = [k for k in range(n) if not math.isfinite(float(prob[j + k]))]
            if bad:
                # Values inside the accepted ranges can still overflow the network: refuse this request only.
                raise InvalidRequest(f"row {s.start + bad[0]}: these feature values give no finite score; check "
                                     "the magnitude of the numeric fields")
            waited = (done - p.arrived) if alone_since is None else (alone_since - p.arrived) + (done - began)
            recs = []
            for i, row in enumerate(p.rows[s.start:s.stop], start=s.start):
                probability = float(prob[j])
                verdict = None if ood is None else (OOD_FLAGGED if ood.flagged[j] else OOD_IN)
                rec = {
                    "decision_id": uuid.uuid4().hex, "time": now, "spec": self.cfg.spec,
                    "model_name": self.cfg.spec, "model_version": version.version, "variant": variant,
                    "input_hash": input_hash(row), "inputs": redact(row, self.cfg.redact),
                    "probability": probability, "decision": int(probability >= version.threshold),
                    "threshold": version.threshold, "top_factors": factors[j] if factors else [],
                    "similar_cases": similar[j] if p.similar else [], "latency_ms": waited * 1000.0,
                    "key_id": p.key_id, "ood_score": None if ood is None else float(ood.scores[j]), "ood": verdict,
                }
                if p.audit and p.audit[i]:
                    rec["audit_fields"] = p.audit[i]
                if self.notices is not None and variant != SHADOW:  # an answered adverse decision gets its notice
                    self.notices.attach(rec, row, version)
                recs.append(rec)
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
        split = self.versions.served  # loaded; the scoring loop takes it up at its next batch
        summary = split.summary() if split is not None else {}
        applied = self.reports.applied_event
        return {"spec": self.cfg.spec, "pid": os.getpid(), "worker": self.worker, "mode": summary.get("mode", self.cfg.mode),
                "canary_share": summary.get("share", self.cfg.canary_share),
                "split": {**summary, "applied_event": applied.id if applied else None,
                          "applied_seq": applied.seq_at if applied else None,
                          "taken_up": split is not None and split is self.reports.applied},
                "serving_actor": self.reports.actor,
                "versions": {a: {"version": v.version, "operating_threshold": v.threshold,
                                 "manifest_sha256": v.manifest_sha256, "run_id": v.run_id, "runtime": v.runtime}
                             for a, v in self.versions.current.items()},
                "audit_url": self.audit.location(), "audit_latest_seq": self.audit.latest_seq(),
                "scoring_queue_rows": self.queue.waiting_rows(),
                "notice_template": self.notices.status() if self.notices is not None else None,
                "last_error": self.versions.last_error}
