"""JSON-lines logging: one object per line with time, level, logger, event and context.

Usage::

    log = get_logger(__name__)
    log.info("batch_written", rows=500, seconds=0.01)

Context values must never include payload blobs or secrets.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

_CTX = "notip_ctx"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        ctx = getattr(record, _CTX, None)
        if ctx:
            out.update(ctx)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class Logger:
    """A thin structured wrapper over a stdlib logger."""

    __slots__ = ("_log",)

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger(name)

    def _emit(self, level: int, event: str, exc_info: bool, ctx: dict[str, Any]) -> None:
        if self._log.isEnabledFor(level):
            self._log.log(level, event, exc_info=exc_info, extra={_CTX: ctx}, stacklevel=3)

    def debug(self, event: str, **ctx: Any) -> None:
        self._emit(logging.DEBUG, event, False, ctx)

    def info(self, event: str, **ctx: Any) -> None:
        self._emit(logging.INFO, event, False, ctx)

    def warning(self, event: str, **ctx: Any) -> None:
        self._emit(logging.WARNING, event, False, ctx)

    def error(self, event: str, *, exc_info: bool = False, **ctx: Any) -> None:
        self._emit(logging.ERROR, event, exc_info, ctx)


def get_logger(name: str) -> Logger:
    return Logger(name)


def setup_logging(level: str = "INFO") -> None:
    """Send every log record to stderr as one JSON line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # nats-py logs reconnect noise at ERROR with tracebacks; we log our own events.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
