"""The server's log: one structured line per refusal, no traceback for a client's mistake, rotated by size.

`refusal_line` writes what was refused as one JSON object on one line (client address, key id, method, route,
status, reason). JSON escapes every control character, so a newline or an escape sequence in a URL path, a
header or a body value can never start a line of its own or forge one. `setup_logging` sends the server's
logging (the project's, KServe's and uvicorn's) to a size-rotated file when the config names one
(`log_file`, `log_max_bytes`, `log_backups`), and what Python code prints to stdout or stderr goes through the
same rotated file, so nothing the process writes grows without bound.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from typing import Any

from core.server_config import ServerConfig

log = logging.getLogger("intelligentops.serving")
refusals_log = logging.getLogger("intelligentops.serving.refusals")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REASON_CHARS = 300  # a refusal's reason in the log, at most


def refusal_line(client: str | None, key_id: str | None, method: str, path: str, status: int, reason: str) -> str:
    """The one line a refusal is logged as: a JSON object, every control character escaped."""
    return json.dumps({"event": "refused", "client": client, "key_id": key_id, "method": method[:16],
                       "route": path[:200], "status": status, "reason": reason[:REASON_CHARS]},
                      ensure_ascii=True, separators=(",", ":"))


def log_refusal(client: str | None, key_id: str | None, method: str, path: str, status: int, reason: str) -> None:
    refusals_log.warning("%s", refusal_line(client, key_id, method, path, status, reason))


class _LineWriter:
    """A file-like stdout/stderr that turns what is printed into log records (escaped, rotated)."""

    def __init__(self, logger: logging.Logger, level: int):
        self.logger, self.level, self.buffer = logger, level, ""

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            if line.strip():
                self.logger.log(self.level, "%s", json.dumps(line[:2000], ensure_ascii=True))
        if len(self.buffer) > 8192:  # a progress bar redrawn with \r and never a newline
            self.buffer = self.buffer[-2000:]
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def setup_logging(cfg: ServerConfig | None) -> None:
    """Logging for the server: a size-rotated file when `cfg.log_file` is set, else stderr. KServe's and uvicorn's
    loggers are routed to the same place; access logs are off (/metrics has the counts)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if cfg is not None and cfg.log_file:
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            cfg.log_file, maxBytes=cfg.log_max_bytes, backupCount=cfg.log_backups, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.__stderr__)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in ("kserve", "uvicorn", "uvicorn.error", "uvicorn.access", "kserve.trace"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # One line per request would cost more than scoring it; /metrics has the counts and latencies.
    for name in ("kserve.trace", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if cfg is not None and cfg.log_file:
        sys.stdout = _LineWriter(logging.getLogger("stdout"), logging.INFO)  # type: ignore[assignment]
        sys.stderr = _LineWriter(logging.getLogger("stderr"), logging.WARNING)  # type: ignore[assignment]


def error_payload(message: str) -> dict[str, Any]:
    return {"error": message}
