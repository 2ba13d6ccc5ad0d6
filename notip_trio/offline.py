"""What the one-shot commands (`replay`, `rejects`) share.

- `parse_when`: a time argument, absolute (ISO 8601 with a zone) or relative
  to now (`90m`, `2h`, `1d`); `parse_subject_filter`: a subject under
  `telemetry.data.`. Both raise ValueError with the reason (argparse exit 2).
- `Failed`: a dependency error; `__main__` prints `failure_line` (one line on
  stderr, the same words and hints as `notip-trio check`) and exits 1.
- `open_storage` / `open_bridge`: PostgreSQL (pool, then the daemon's own
  start-up migration, so the dedup index is known) and NATS, each connected as
  the daemon connects, turned into `Failed` when they cannot be had.
- `write_batch`: the daemon's writer, a few attempts before `Failed`.
- `quiet_logs`: the summary is the report; the daemon's log events stay silent.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Final

import trio

from .config import Settings
from .db.facts import pg_hint
from .db.writer import RejectedRecord, Storage, WriteResult
from .envelope import Row
from .errors import DatabaseError, StartupError
from .js.bridge import NatsBridge
from .wire import is_valid_token

_RELATIVE: Final = re.compile(r"^(\d+)([smhd])$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PREFIX: Final = "telemetry.data."
DB_OPEN_TIMEOUT_S: Final = 15.0
#: A batch whose write fails (a deadlock with a replica writing the same keys,
#: a dropped connection) is tried this many times in all, backing off.
WRITE_ATTEMPTS: Final = 4


def parse_when(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """`2026-05-01T12:00:00Z`, `2026-05-01T14:00+02:00`, or `90m` / `2h` / `1d` before now."""
    now = now if now is not None else dt.datetime.now(dt.UTC)
    if m := _RELATIVE.match(text.strip()):
        return now - dt.timedelta(seconds=int(m[1]) * _UNITS[m[2]])
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (ISO 8601 with a zone, e.g. 2026-05-01T12:00:00Z, "
            "or a span before now: 90m, 2h, 1d)"
        ) from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{text!r} has no time zone: add Z or an offset such as +02:00")
    return when.astimezone(dt.UTC)


def parse_subject_filter(text: str) -> str:
    """`telemetry.data.<tenant>.>` and the like: a subject under telemetry.data (wildcards too)."""
    tokens = text.split(".")
    ok = text.startswith(_PREFIX) and len(tokens) in (3, 4)
    for i, token in enumerate(tokens[2:], start=2):
        last = i == len(tokens) - 1
        ok = ok and (token == "*" or (token == ">" and last) or is_valid_token(token))
    if not ok:
        raise ValueError(
            f"not a telemetry subject filter: {text!r} (e.g. telemetry.data.<tenant>.> or "
            "telemetry.data.*.<gateway>)"
        )
    return text


class Failed(Exception):
    """A dependency the command needs is wrong: one line names it."""

    def __init__(self, check: str, reason: str, hint: str = "") -> None:
        super().__init__(f"{check}: {reason}")
        self.check, self.reason, self.hint = check, reason, hint

    def line(self, command: str) -> str:
        text = f"notip-trio {command}: FAILED {self.check}: {' '.join(self.reason.split())}"
        return f"{text} (hint: {self.hint})" if self.hint else text


def first_failure(group: BaseExceptionGroup[Failed]) -> Failed:
    """The first `Failed` of a group (nurseries wrap what their children raise)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, Failed)
    return exc


@contextmanager
def quiet_logs() -> Iterator[None]:
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


async def write_batch(
    storage: Storage, rows: Sequence[Row], rejected: Sequence[RejectedRecord]
) -> WriteResult:
    """`Storage.write_batch`, tried WRITE_ATTEMPTS times in all, backing off; then `Failed`."""
    delay = 0.5
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            return await storage.write_batch(rows, rejected)
        except DatabaseError as exc:
            if attempt == WRITE_ATTEMPTS:
                raise Failed("postgres", f"writing a batch: {exc}") from None
            await trio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


@asynccontextmanager
async def open_storage(settings: Settings, *, migrate: bool = True) -> AsyncIterator[Storage]:
    """The daemon's `Storage` (two connections), migrated as at start-up unless
    `migrate` is False (a command that only reads)."""
    storage = Storage.create(
        settings.db_conninfo(),
        min_size=1,
        max_size=2,
        write_timeout_s=settings.db_write_timeout_s,
        migrate_timeout_s=settings.db_migrate_timeout_s,
    )
    where = f"{settings.db_host}:{settings.db_port}/{settings.db_name} as {settings.db_user}"
    try:
        try:
            await storage.open(timeout_s=DB_OPEN_TIMEOUT_S)
        except DatabaseError as exc:
            raise Failed("postgres", f"{where}: {exc}", pg_hint(str(exc))) from None
        try:
            if migrate:
                await storage.migrate()
        except DatabaseError as exc:
            raise Failed(
                "schema", f"the start-up migration failed: {exc}", "run notip-trio check"
            ) from None
        yield storage
    finally:
        with trio.CancelScope(shield=True):
            await storage.close()


@asynccontextmanager
async def open_bridge(settings: Settings, name: str) -> AsyncIterator[NatsBridge]:
    """A NATS connection as the daemon's (mTLS); the first TLS error is final."""
    from .check import nats_hint

    try:
        with trio.fail_after(settings.nats_connect_timeout_s + 2):
            bridge = await NatsBridge.from_settings(settings, name=name, retry=False)
    except (StartupError, trio.TooSlowError) as exc:
        reason = str(exc).removeprefix("NATS: ") or "no connection"
        raise Failed("nats", reason, nats_hint(reason)) from None
    try:
        yield bridge
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await bridge.close()
