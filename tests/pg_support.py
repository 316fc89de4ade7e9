"""A real PostgreSQL 16 server for the suite, from the `pgserver` wheel (no system package, no network).

`start_postgres()` starts one in a fresh folder in about a second; it listens only on a Unix socket inside that
folder. Started as root, pgserver runs the server as its own `pgserver` user. `PostgresServer.stop()` stops it
and then checks the postmaster is really gone: a server was once seen outliving its handle's `cleanup()`, and a
leftover server would keep a port, a socket and memory for the rest of the machine's life.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PostgresServer:
    """One running server: its data folder (also the socket folder) and the postmaster's pid."""

    folder: Path
    pid: int
    handle: object

    @property
    def socket_dir(self) -> str:
        return str(self.folder)

    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg2") -> str:
        """A SQLAlchemy URL over the Unix socket (`postgresql+psycopg2://postgres:@/db?host=<folder>`)."""
        return f"{driver}://postgres:@/{database}?host={self.folder}"

    def query(self, database: str, sql: str) -> list[tuple]:
        """Rows of one statement, read straight from the server (not through the code under test)."""
        import psycopg2

        conn = psycopg2.connect(dbname=database, user="postgres", host=str(self.folder))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        self.query("postgres", f'CREATE DATABASE "{name}"')
        return self.url(name)

    def running(self) -> bool:
        import psutil

        try:
            proc = psutil.Process(self.pid)
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def stop(self) -> None:
        """Stop the server and make sure it is gone (pg_ctl immediate stop, then a kill, if cleanup() left it)."""
        import pgserver.utils as pgutils

        self.handle.cleanup()
        deadline = time.monotonic() + 10
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.running():
            try:
                pgutils.pg_ctl(["-m", "immediate", "-w", "stop"], pgdata=self.folder,
                               user=getattr(self.handle, "system_user", None))
            except subprocess.CalledProcessError:
                os.kill(self.pid, 9)
            time.sleep(0.5)
        leftover = self.running()
        shutil.rmtree(self.folder, ignore_errors=True)
        if leftover:
            raise RuntimeError(f"PostgreSQL (pid {self.pid}, data {self.folder}) is still running after stop")


def start_postgres() -> PostgresServer:
    import warnings

    with warnings.catch_warnings():
        # platformdirs falls back to /tmp when XDG_RUNTIME_DIR is unset (as in CI) and says so; that is fine here.
        warnings.simplefilter("ignore")
        import pgserver

    # /tmp rather than pytest's tmp_path: the socket path must stay under ~100 bytes, and pgserver opens the
    # folder's parents to its `pgserver` user when it runs as root.
    folder = Path(tempfile.mkdtemp(prefix="intelligentops-pg-"))
    handle = pgserver.get_server(folder, cleanup_mode="stop")
    return PostgresServer(folder=folder, pid=int(handle.get_pid()), handle=handle)
