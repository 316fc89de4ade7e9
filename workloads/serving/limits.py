"""Each caller's rate limit and requests in flight, shared by every worker process of one server.

A key must not get `workers` times its `rate_limit_per_minute`, nor its in-flight bound once per worker, so the
state lives in one table that every worker maps: a file in the supervisor's private folder (mode 0600, under a
0700 folder), locked with flock for each read-modify-write. A single-process server keeps the same table in
anonymous memory, without the lock. Each row holds a caller (a keyed 16-byte digest of `key:<id>` or
`addr:<address>`, the salt random per server), its token bucket (tokens and when they were counted, on the
system-wide monotonic clock), and its requests in flight per worker: a worker killed mid-request leaves counts in
its own column only, and the worker started in its place clears that column, so nobody is locked out by a dead
process. A caller is found among PROBE rows from its digest's slot; a new caller takes a free row or the one
counted longest ago (the way the old in-process table forgot its oldest bucket).
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import secrets
import struct
import time

from core.server_config import MAX_WORKERS

SLOTS = 8192  # callers remembered at once
PROBE = 8
SALT = 16
ROW = struct.Struct(f"<16sdd{MAX_WORKERS}H")  # caller digest, tokens, counted at, in flight per worker
EMPTY = bytes(16)


def create_table(path: str) -> None:
    """The shared table's file, with a fresh random salt (the supervisor calls this before starting workers)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(SALT))
        os.ftruncate(fd, SALT + SLOTS * ROW.size)
    finally:
        os.close(fd)


class CallerLimits:
    """Token buckets and in-flight counts per caller; `path` None: this process's memory only."""

    def __init__(self, path: str | None = None, worker: int = 0):
        import fcntl

        self.worker = worker
        size = SALT + SLOTS * ROW.size
        if path is None:
            self._fd = None
            self.map = mmap.mmap(-1, size)
            self.map[:SALT] = secrets.token_bytes(SALT)
        else:
            self._fd = os.open(path, os.O_RDWR)
            self.map = mmap.mmap(self._fd, size)
        self._flock = fcntl.flock
        self._ex, self._un = fcntl.LOCK_EX, fcntl.LOCK_UN
        self.salt = bytes(self.map[:SALT])
        self._locked(self._clear_worker)  # a worker started in place of a dead one: its counts are gone

    def _locked(self, fn, *args):
        if self._fd is None:
            return fn(*args)
        self._flock(self._fd, self._ex)
        try:
            return fn(*args)
        finally:
            self._flock(self._fd, self._un)

    def _clear_worker(self) -> None:
        at = SALT + 32 + 2 * self.worker
        for i in range(SLOTS):
            self.map[at + i * ROW.size:at + i * ROW.size + 2] = b"\0\0"

    def _row(self, caller: str, create: bool, per_minute: int = 0) -> tuple[int, list] | None:
        digest = hashlib.blake2b(caller.encode("utf-8", "surrogateescape"), key=self.salt, digest_size=16).digest()
        start = int.from_bytes(digest[:8], "little") % SLOTS
        free = oldest = None
        for k in range(PROBE):
            offset = SALT + ((start + k) % SLOTS) * ROW.size
            row = list(ROW.unpack_from(self.map, offset))
            if row[0] == digest:
                return offset, row
            if row[0] == EMPTY:
                free = free if free is not None else offset
            elif sum(row[3:]) == 0 and (oldest is None or row[2] < oldest[1]):
                oldest = (offset, row[2])
        if not create:
            return None
        offset = free if free is not None else oldest[0] if oldest is not None else SALT + start * ROW.size
        tokens = float(per_minute) if per_minute else math.nan  # nan: a full bucket once a limit is known
        return offset, [digest, tokens, time.monotonic(), *([0] * MAX_WORKERS)]

    def _take(self, caller: str, per_minute: int) -> float:
        offset, row = self._row(caller, True, per_minute)
        now, rate = time.monotonic(), per_minute / 60.0
        tokens = float(per_minute) if math.isnan(row[1]) else min(float(per_minute),
                                                                   row[1] + max(0.0, now - row[2]) * rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / rate
        row[1], row[2] = tokens, now
        ROW.pack_into(self.map, offset, *row)
        return wait

    def take(self, caller: str, per_minute: int) -> float:
        """0 when `caller` may make a request now (a token taken), else the seconds until a token is back."""
        return self._locked(self._take, caller, per_minute)

    def _enter(self, caller: str, bound: int) -> bool:
        offset, row = self._row(caller, True)
        if sum(row[3:]) >= bound:
            return False
        row[3 + self.worker] += 1
        ROW.pack_into(self.map, offset, *row)
        return True

    def enter(self, caller: str, bound: int) -> bool:
        """Count one more request of `caller` in flight, unless `bound` are in flight already (across workers)."""
        return self._locked(self._enter, caller, bound)

    def _leave(self, caller: str) -> None:
        found = self._row(caller, False)
        if found is not None and found[1][3 + self.worker] > 0:
            offset, row = found
            row[3 + self.worker] -= 1
            ROW.pack_into(self.map, offset, *row)

    def leave(self, caller: str) -> None:
        self._locked(self._leave, caller)
