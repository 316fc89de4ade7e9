"""Several server processes behind one port (`deployment.workers` > 1): a supervisor and its workers.

The supervisor binds the port once and starts `workers` copies of `python -m workloads.serving` with the same
arguments; each inherits the listening socket (the kernel hands each new connection to one of them, as with
KServe's and uvicorn's own worker models), builds its own model, engine and audit store, and serves. They append
to the one audit chain (core/audit/store.py locks its head row per commit, on SQLite and on PostgreSQL), so order,
group commit and durability are each worker's as they were the single process's: a decision is committed before
its answer leaves, and a worker killed at any moment loses only answers it never sent.

What the workers share: the listening socket; callers' rate limits and requests in flight
(workloads/serving/limits.py: a key gets its limit once, not once per worker); /metrics
(workloads/serving/metrics.py: prometheus_client's multiprocess mode); the private folder holding both (0700,
removed when the supervisor ends). What runs once: audit retention, in worker 0. SIGHUP reaches every worker;
SIGTERM or SIGINT stops them all and then the supervisor.

Worker 0 starts first and alone: a refusal (an unusable model version, say) ends it with exit status 2 and one
line before any other worker starts, and the supervisor ends with the same status instead of restarting it.
Once worker 0 has built its app, the others start. A worker that dies afterwards is started again in its place
(the same index), after a pause that grows while workers keep dying young.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from core.server_config import ServerConfig
from workloads.serving.limits import create_table
from workloads.serving.metrics import MULTIPROC_ENV

log = logging.getLogger("intelligentops.serving")

WORKER_ENV = "INTELLIGENTOPS_SERVE_WORKER"  # this process's index: it is a worker, not a supervisor
SOCKET_ENV = "INTELLIGENTOPS_SERVE_FD"  # the inherited listening socket
READY_ENV = "INTELLIGENTOPS_SERVE_READY_FD"  # where worker 0 says its app is built
LIMITS_ENV = "INTELLIGENTOPS_SERVE_LIMITS"  # the shared rate-limit table (limits.py)
YOUNG_SECONDS = 10.0  # a worker that dies younger than this counts toward a longer pause before the next start
STOP_SECONDS = 30.0


@dataclass(frozen=True)
class WorkerEnv:
    """What a worker process was handed by its supervisor (None everywhere for a single-process server)."""

    index: int
    socket_fd: int | None
    ready_fd: int | None
    limits_path: str | None


def worker_env() -> WorkerEnv | None:
    if WORKER_ENV not in os.environ:
        return None
    fd = os.environ.get(SOCKET_ENV)
    ready = os.environ.get(READY_ENV)
    return WorkerEnv(int(os.environ[WORKER_ENV]), int(fd) if fd else None, int(ready) if ready else None,
                     os.environ.get(LIMITS_ENV))


def say_ready(env: WorkerEnv | None) -> None:
    """Tell the supervisor this worker's app is built (worker 0 only; the others start after it)."""
    if env is not None and env.ready_fd is not None:
        os.write(env.ready_fd, b"1")
        os.close(env.ready_fd)


def watch_parent(stop) -> None:
    """End this worker when its supervisor is gone (a thread's target): an orphan would hold the port."""
    parent = os.getppid()
    while not stop.wait(1.0):
        if os.getppid() != parent:
            log.error("worker %d: the supervisor (pid %d) is gone; stopping", os.getpid(), parent)
            os.kill(os.getpid(), signal.SIGTERM)
            return


class Supervisor:
    def __init__(self, cfg: ServerConfig, argv: list[str], sock):
        self.cfg, self.argv, self.sock = cfg, argv, sock
        self.folder = tempfile.mkdtemp(prefix="intelligentops-serve-")  # 0700
        os.mkdir(os.path.join(self.folder, "metrics"), 0o700)
        self.limits = os.path.join(self.folder, "limits")
        create_table(self.limits)
        self.procs: dict[int, subprocess.Popen] = {}
        self.started: dict[int, float] = {}
        self.stopping = False
        self.deaths = 0  # young deaths in a row

    def _start(self, index: int, ready_fd: int | None = None) -> subprocess.Popen:
        env = {**os.environ, WORKER_ENV: str(index), SOCKET_ENV: str(self.sock.fileno()), LIMITS_ENV: self.limits,
               MULTIPROC_ENV: os.path.join(self.folder, "metrics")}
        env.pop(READY_ENV, None)
        fds = [self.sock.fileno()]
        if ready_fd is not None:
            env[READY_ENV] = str(ready_fd)
            fds.append(ready_fd)
        proc = subprocess.Popen([sys.executable, "-m", "workloads.serving", *self.argv], env=env, pass_fds=fds)
        self.procs[index], self.started[index] = proc, time.monotonic()
        return proc

    def _first(self) -> int | None:
        """Start worker 0 and wait until its app is built; its exit status if it ended first."""
        read, write = os.pipe()
        proc = self._start(0, write)
        os.close(write)
        try:
            while True:
                if self.stopping:
                    return 0
                ready, _, _ = select.select([read], [], [], 0.2)
                if ready and os.read(read, 1):
                    return None
                if proc.poll() is not None:
                    return proc.returncode
        finally:
            os.close(read)

    def _signal(self, signum: int) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def _on_stop(self, signum, _frame) -> None:
        self.stopping = True
        self._signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, lambda *_: self._signal(signal.SIGHUP))
        try:
            status = self._first()
            if status is not None:
                return 2 if status == 2 else status or 1
            for index in range(1, self.cfg.workers):
                self._start(index)
            log.info("%s: %d workers serve on port %d (supervisor pid %d)", self.cfg.spec, self.cfg.workers,
                     self.sock.getsockname()[1], os.getpid())
            self._supervise()
            return 0
        finally:
            self._stop()
            shutil.rmtree(self.folder, ignore_errors=True)

    def _supervise(self) -> None:
        from prometheus_client import multiprocess

        while not self.stopping:
            time.sleep(0.2)
            for index, proc in list(self.procs.items()):
                if self.stopping or proc.poll() is None:
                    continue
                young = time.monotonic() - self.started[index] < YOUNG_SECONDS
                self.deaths = self.deaths + 1 if young else 0
                pause = min(30.0, 0.5 * 2 ** self.deaths) if young else 0.0
                log.error("%s: worker %d (pid %d) ended with status %s; starting another%s", self.cfg.spec, index,
                          proc.pid, proc.returncode, f" in {pause:.0f} s" if pause else "")
                multiprocess.mark_process_dead(proc.pid, os.path.join(self.folder, "metrics"))
                deadline = time.monotonic() + pause
                while not self.stopping and time.monotonic() < deadline:
                    time.sleep(0.2)
                if not self.stopping:
                    self._start(index)

    def _stop(self) -> None:
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.sock.close()


def supervise(cfg: ServerConfig, argv: list[str], sock) -> int:
    """Serve with `cfg.workers` processes on the bound `sock` until stopped; the exit status."""
    return Supervisor(cfg, argv, sock).run()
