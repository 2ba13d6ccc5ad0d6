"""`notip-trio rejects` and `notip-trio rejects redrive` (docs/operations.md, Recovery).

`rejects` prints how many messages `telemetry_rejected` keeps, by day
(received_at, UTC) and reason. It only reads.

`rejects redrive [--reason R] [--since T]` decodes the kept messages again
with this release's decoder (`envelope.decode`, the daemon's limits). A kept
body that was cut (`body_length` > its length: REJECTED_BODY_MAX_BYTES) is read
again from the TELEMETRY stream by its sequence, if the stream still holds it
(same subject, same length). Those valid now are stored through the daemon's
writer (`Storage.write_batch`: a row already there is skipped by the unique
key) and then removed from `telemetry_rejected`; the others stay, with the
reason this release gives them. Row writes commit before the removal, so a
redrive cut short is simply run again. Liveness state is never written.
Prints a JSON summary on stdout; exit 0, or 1 with one line naming the
dependency that failed.
"""

from __future__ import annotations

# trio_asyncio must be imported before psycopg (docs/pitfalls.md).
import trio_asyncio  # isort: split

import datetime as dt
import json
import sys
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from typing import Any, Final, TextIO

import nats.errors
import trio

from . import wire
from .config import Settings
from .db.pool import Conn
from .db.writer import Storage
from .envelope import Row, decode
from .errors import DatabaseError
from .js.bridge import NatsBridge
from .js.window import stream_message
from .offline import Failed, first_failure, open_bridge, open_storage, quiet_logs, write_batch

#: Kept messages decoded (and written) per round trip.
CHUNK: Final = 5_000

_COUNTS: Final = """
SELECT (received_at AT TIME ZONE 'UTC')::date AS day, reason, count(*)
  FROM telemetry_rejected GROUP BY 1, 2 ORDER BY 1, 2
"""
_CHUNK: Final = """
SELECT id, subject, reason, detail, body, body_length, stream_seq
  FROM telemetry_rejected
 WHERE id > %(after)s
   AND (%(reason)s::text IS NULL OR reason = %(reason)s::text)
   AND (%(since)s::timestamptz IS NULL OR received_at >= %(since)s::timestamptz)
 ORDER BY id LIMIT %(limit)s
"""
_DELETE: Final = "DELETE FROM telemetry_rejected WHERE id = ANY(%s)"
_UPDATE: Final = "UPDATE telemetry_rejected SET reason = %s, detail = %s WHERE id = %s"


# --- counts --------------------------------------------------------------------


def run_counts(settings: Settings, *, out: TextIO | None = None) -> int:
    """Print the counts by day and reason; return the exit code."""
    out = out if out is not None else sys.stdout
    err = sys.stderr
    rows: list[tuple[dt.date, str, int]] | None = None
    with quiet_logs():
        try:
            rows = trio.run(_counts, settings)
        except* Failed as group:
            print(first_failure(group).line("rejects"), file=err, flush=True)
    if rows is None:
        return 1
    print(format_counts(rows), file=out, flush=True)
    return 0


async def _counts(settings: Settings) -> list[tuple[dt.date, str, int]]:
    def read(conn: Conn) -> list[tuple[dt.date, str, int]]:
        return [(r[0], str(r[1]), int(r[2])) for r in conn.execute(_COUNTS)]  # type: ignore[misc,call-overload]

    async with trio_asyncio.open_loop(), open_storage(settings, migrate=False) as storage:
        try:
            return await storage.run_in_transaction(read)
        except DatabaseError as exc:
            raise Failed("postgres", f"reading telemetry_rejected: {exc}") from None


def format_counts(rows: list[tuple[dt.date, str, int]]) -> str:
    """`day  reason  count` lines, then the totals by reason and in all."""
    width = max([len("reason"), *(len(r[1]) for r in rows)])
    lines = [f"{'day':<10}  {'reason':<{width}}  {'count':>9}"]
    lines += [f"{day.isoformat():<10}  {reason:<{width}}  {n:>9}" for day, reason, n in rows]
    totals: dict[str, int] = {}
    for _, reason, n in rows:
        totals[reason] = totals.get(reason, 0) + n
    lines += [
        f"{'all days':<10}  {reason:<{width}}  {n:>9}" for reason, n in sorted(totals.items())
    ]
    lines.append(f"{'total':<10}  {'':<{width}}  {sum(totals.values()):>9}")
    return "\n".join(lines)


# --- redrive ---------------------------------------------------------------------


@dataclass(slots=True)
class RedriveTally:
    examined: int = 0
    stored: int = 0  # rows new in telemetry
    already_stored: int = 0  # valid now, and their row was there already
    removed: int = 0  # records removed from telemetry_rejected
    still_rejected: int = 0
    reason_changed: int = 0  # still rejected, for another reason than before
    read_from_stream: int = 0  # cut bodies read again from the stream
    cut_and_gone: int = 0  # cut bodies no longer in the stream: left as they are


@dataclass(frozen=True, slots=True)
class _Kept:
    id: int
    subject: str
    reason: str
    detail: str
    body: bytes
    body_length: int
    stream_seq: int | None


def run_redrive(
    settings: Settings,
    *,
    reason: str | None = None,
    since: dt.datetime | None = None,
    out: TextIO | None = None,
) -> int:
    """Redrive the kept messages that match; print the JSON summary; return the exit code."""
    out = out if out is not None else sys.stdout
    tally = RedriveTally()
    code, complete = 0, False
    with quiet_logs():
        try:
            trio.run(redrive, settings, reason, since, tally)
            complete = True
        except* Failed as group:
            print(first_failure(group).line("rejects redrive"), file=sys.stderr, flush=True)
            code = 1
    summary: dict[str, Any] = {
        "complete": complete,
        "reason": reason,
        "since": None if since is None else wire.format_rfc3339(since),
        **asdict(tally),
    }
    print(json.dumps(summary), file=out, flush=True)
    return code


async def redrive(
    settings: Settings, reason: str | None, since: dt.datetime | None, tally: RedriveTally
) -> None:
    async with (
        trio_asyncio.open_loop(),
        open_storage(settings) as storage,
        AsyncExitStack() as stack,
    ):
        bridge: NatsBridge | None = None
        after = 0
        while chunk := await _chunk(storage, after, reason, since):
            after = chunk[-1].id
            rows: list[Row] = []
            valid: list[int] = []
            changed: list[tuple[str, str, int]] = []
            for kept in chunk:
                tally.examined += 1
                body = kept.body
                if kept.body_length > len(body):
                    if bridge is None:
                        bridge = await stack.enter_async_context(
                            open_bridge(settings, "notip-trio-redrive")
                        )
                    whole = await _from_stream(bridge, kept)
                    if whole is None:
                        tally.cut_and_gone += 1
                        tally.still_rejected += 1
                        continue
                    body = whole
                    tally.read_from_stream += 1
                result = decode(kept.subject, body, max_body=settings.telemetry_max_body_bytes)
                if isinstance(result, Row):
                    rows.append(result)
                    valid.append(kept.id)
                    continue
                tally.still_rejected += 1
                if (result.reason, result.detail) != (kept.reason, kept.detail):
                    changed.append((result.reason, result.detail, kept.id))
                    tally.reason_changed += result.reason != kept.reason
            if rows:
                written = await write_batch(storage, rows, [])
                tally.stored += written.inserted
                tally.already_stored += written.duplicates
            tally.removed += await _settle(storage, valid, changed)


async def _chunk(
    storage: Storage, after: int, reason: str | None, since: dt.datetime | None
) -> list[_Kept]:
    params = {"after": after, "reason": reason, "since": since, "limit": CHUNK}

    def read(conn: Conn) -> list[_Kept]:
        return [
            _Kept(
                int(r[0]),  # type: ignore[call-overload]
                str(r[1]),
                str(r[2]),
                str(r[3]),
                bytes(r[4]),  # type: ignore[call-overload]
                int(r[5]),  # type: ignore[call-overload]
                None if r[6] is None else int(r[6]),  # type: ignore[call-overload]
            )
            for r in conn.execute(_CHUNK, params)
        ]

    try:
        return await storage.run_in_transaction(read)
    except DatabaseError as exc:
        raise Failed("postgres", f"reading telemetry_rejected: {exc}") from None


async def _settle(storage: Storage, valid: list[int], changed: list[tuple[str, str, int]]) -> int:
    """Remove the records now stored; give the others their new reason. Returns removed."""
    if not valid and not changed:
        return 0

    def apply(conn: Conn) -> int:
        removed = 0
        if valid:
            removed = max(conn.execute(_DELETE, (valid,)).rowcount, 0)
        if changed:
            conn.cursor().executemany(_UPDATE, changed)
        return removed

    try:
        return await storage.run_in_transaction(apply)
    except DatabaseError as exc:
        raise Failed("postgres", f"updating telemetry_rejected: {exc}") from None


async def _from_stream(bridge: NatsBridge, kept: _Kept) -> bytes | None:
    """The whole body of a cut record, if the stream still holds that very message."""
    if kept.stream_seq is None:
        return None
    try:
        with trio.fail_after(30):
            got = await stream_message(bridge, wire.TELEMETRY_STREAM, kept.stream_seq)
    except trio.TooSlowError:
        raise Failed("nats", "reading a message from the stream: no answer within 30 s") from None
    except (nats.errors.Error, OSError) as exc:
        raise Failed("nats", f"reading a message from the stream: {exc}") from None
    if got is None or got[0] != kept.subject or len(got[1]) != kept.body_length:
        return None
    return got[1]
