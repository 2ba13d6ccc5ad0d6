"""`notip-trio replay`: store a window of the TELEMETRY stream again (docs/operations.md, Recovery).

    pull (ephemeral ordered consumer) ──batch──▶ decode (ingest.prepare) ──▶ Storage.write_batch

The window is read by `js.window.OrderedReader` (ack policy none; the daemon's
durable is never touched) from `--from-seq` or `--since`, up to `--to-seq`,
`--until` or the stream's last message when the replay started, whichever
comes first. Every batch goes through the daemon's own decode (`ingest.prepare`)
and writer (`Storage.write_batch`): a row already stored is skipped by the
unique key, a bad message is kept in `telemetry_rejected` once (by its stream
sequence). So a window replayed twice stores nothing new, and replaying beside
running replicas is safe. Liveness state is never written: an old message
must not make a gateway look alive.

The next batch is pulled while the current one is written. On a terminal
(stderr a tty) a progress line; at the end a JSON summary on stdout. Exit 0
once the window is done; 1 on a dependency error, with one line naming it
(and the summary so far, with the sequence to resume from).
"""

from __future__ import annotations

# trio_asyncio must be imported before psycopg (docs/pitfalls.md).
import trio_asyncio  # isort: split

import datetime as dt
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TextIO, TypeVar

import nats.errors
import trio

from . import wire
from .config import Settings
from .db.writer import Storage, WriteResult
from .ingest import prepare
from .js.bridge import NatsBridge
from .js.delivery import Delivery, JsMsg
from .js.window import OrderedReader, StreamBounds, stream_bounds
from .metrics import Metrics
from .offline import (
    Failed,
    first_failure,
    open_bridge,
    open_storage,
    quiet_logs,
    write_batch,
)

T = TypeVar("T")

#: Messages per pull and per COPY: large batches amortise the transaction.
BATCH: Final = 10_000
PROGRESS_EVERY_S: Final = 0.5


@dataclass(frozen=True, slots=True)
class Window:
    """What to replay: a start (sequence or time), an optional end, a subject filter."""

    from_seq: int | None = None
    since: dt.datetime | None = None
    to_seq: int | None = None
    until: dt.datetime | None = None
    subject_filter: str | None = None

    def problem(self) -> str | None:
        """Why this window makes no sense, or None (argparse checks the rest)."""
        if (self.from_seq is None) == (self.since is None):
            return "give exactly one of --from-seq and --since"
        if self.to_seq is not None and self.until is not None:
            return "give at most one of --to-seq and --until"
        if self.from_seq is not None and self.from_seq < 1:
            return "--from-seq must be 1 or more"
        if self.to_seq is not None and self.from_seq is not None and self.to_seq < self.from_seq:
            return "--to-seq must not be below --from-seq"
        if self.until is not None and self.since is not None and self.until <= self.since:
            return "--until must be after --since"
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "from_seq": self.from_seq,
            "since": _iso(self.since),
            "to_seq": self.to_seq,
            "until": _iso(self.until),
            "subject_filter": self.subject_filter,
        }


@dataclass(slots=True)
class Tally:
    """What the replay has done so far (the summary, the progress line)."""

    messages: int = 0
    new: int = 0
    already_stored: int = 0
    rejected: int = 0
    batches: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    end_seq: int = 0  # the last stream sequence the window can reach
    started: float = field(default_factory=time.monotonic)

    def add(self, msgs: Sequence[JsMsg], rows: int, rejected: int, result: WriteResult) -> None:
        self.messages += len(msgs)
        self.new += result.inserted
        self.already_stored += result.duplicates
        self.rejected += rejected
        self.batches += 1
        first, last = Delivery.from_reply(msgs[0].reply), Delivery.from_reply(msgs[-1].reply)
        if self.first_seq is None and first is not None:
            self.first_seq = first.stream_seq
        if last is not None:
            self.last_seq = last.stream_seq

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        s = self.seconds()
        return self.messages / s if s > 0 else 0.0


def cut(msgs: Sequence[JsMsg], *, end_seq: int, until_ns: int | None) -> tuple[list[JsMsg], bool]:
    """The messages of a batch inside the window, and whether the window ends here:
    at `end_seq` (inclusive) or the first message stored at or after `until_ns`."""
    for i, msg in enumerate(msgs):
        d = Delivery.from_reply(msg.reply)
        if d is None:
            continue
        if d.stream_seq > end_seq or (until_ns is not None and d.timestamp_ns >= until_ns):
            return list(msgs[:i]), True
        if d.stream_seq == end_seq:
            return list(msgs[: i + 1]), True
    return list(msgs), False


def run_replay(
    settings: Settings, window: Window, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Replay `window`; print the summary to `out` (stdout); return the exit code."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    tally = Tally()
    complete = False
    code = 0
    with quiet_logs():
        try:
            complete = trio.run(replay, settings, window, tally, err)
        except* Failed as group:
            _clear_progress(err)
            print(first_failure(group).line("replay"), file=err, flush=True)
            code = 1
    print(json.dumps(summary(window, tally, complete)), file=out, flush=True)
    return code


def summary(window: Window, tally: Tally, complete: bool) -> dict[str, Any]:
    seconds = tally.seconds()
    out: dict[str, Any] = {
        "complete": complete,
        "window": window.describe(),
        "first_seq": tally.first_seq,
        "last_seq": tally.last_seq,
        "messages": tally.messages,
        "new": tally.new,
        "already_stored": tally.already_stored,
        "rejected": tally.rejected,
        "seconds": round(seconds, 3),
        "messages_per_s": round(tally.messages / seconds) if seconds > 0 else 0,
    }
    if not complete:
        # Everything up to last_seq is stored: resume after it.
        start = tally.last_seq + 1 if tally.last_seq is not None else window.from_seq
        out["resume_from_seq"] = start
    return out


async def replay(settings: Settings, window: Window, tally: Tally, err: TextIO) -> bool:
    """Replay the window; True once it is done. Raises `Failed`."""
    async with (
        trio_asyncio.open_loop(),
        open_storage(settings) as storage,
        open_bridge(settings, "notip-trio-replay") as bridge,
    ):
        bounds = await _bounds(bridge)
        end_seq = bounds.last_seq if window.to_seq is None else min(window.to_seq, bounds.last_seq)
        tally.end_seq = end_seq
        if bounds.messages == 0 or (window.from_seq or 0) > end_seq:
            return True
        reader = OrderedReader(
            bridge,
            wire.TELEMETRY_STREAM,
            start_seq=window.from_seq,
            start_time=window.since,
            filter_subject=_filter(window.subject_filter),
            batch=BATCH,
        )
        try:
            await _nats(reader.open, "creating the replay consumer")
            await _run(settings, window, reader, storage, tally, end_seq, err)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await reader.close()
        _clear_progress(err)
    return True


def _filter(subject_filter: str | None) -> str | None:
    # The stream's own subjects filter nothing out, and slow nats-server 2.9 down.
    return None if subject_filter in (None, wire.TELEMETRY_SUBJECTS) else subject_filter


async def _bounds(bridge: NatsBridge) -> StreamBounds:
    bounds = await _nats(
        lambda: stream_bounds(bridge, wire.TELEMETRY_STREAM), "reading the stream's state"
    )
    if bounds is None:
        raise Failed(
            f"stream {wire.TELEMETRY_STREAM}", "missing", "the platform creates the streams"
        )
    return bounds


async def _nats(fn: Callable[[], Awaitable[T]], what: str) -> T:
    try:
        with trio.fail_after(30):
            return await fn()
    except trio.TooSlowError:
        raise Failed("nats", f"{what}: no answer within 30 s") from None
    except (nats.errors.Error, OSError) as exc:
        raise Failed("nats", f"{what}: {type(exc).__name__}: {exc}") from None


async def _run(
    settings: Settings,
    window: Window,
    reader: OrderedReader,
    storage: Storage,
    tally: Tally,
    end_seq: int,
    err: TextIO,
) -> None:
    until_ns = None if window.until is None else _ns(window.until)
    show = _Progress(err) if err.isatty() else None
    pulled_tx, pulled_rx = trio.open_memory_channel[list[JsMsg]](1)

    async def pull() -> None:
        async with pulled_tx:
            while True:
                msgs = await _nats(reader.fetch, "pulling the window")
                if not msgs:
                    return  # nothing more in the stream
                msgs, done = cut(msgs, end_seq=end_seq, until_ns=until_ns)
                if msgs:
                    await pulled_tx.send(msgs)
                if done:
                    return

    metrics = Metrics()  # the daemon's decode counts into it; nobody reads it here
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pull)
        async with pulled_rx:
            async for msgs in pulled_rx:
                batch = prepare(
                    msgs,
                    max_body=settings.telemetry_max_body_bytes,
                    rejected_body_max=settings.rejected_body_max_bytes,
                    metrics=metrics,
                )
                result = await write_batch(storage, batch.rows, batch.rejected)
                tally.add(msgs, len(batch.rows), len(batch.rejected), result)
                if show is not None:
                    show.update(tally)


class _Progress:
    """One line on the terminal, rewritten in place at most every PROGRESS_EVERY_S."""

    def __init__(self, err: TextIO) -> None:
        self._err = err
        self._next = 0.0

    def update(self, tally: Tally) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + PROGRESS_EVERY_S
        self._err.write("\r" + progress_line(tally) + "\x1b[K")
        self._err.flush()


def progress_line(tally: Tally) -> str:
    rate = tally.rate()
    last = tally.last_seq or 0
    first = tally.first_seq or last
    left = max(tally.end_seq - last, 0)
    done_seqs = last - first + 1
    seconds = tally.seconds()
    # Sequences still to read, at the pace sequences went by so far (a filter skips some).
    eta = left / (done_seqs / seconds) if done_seqs > 0 and seconds > 0 else math.inf
    eta_text = "?" if math.isinf(eta) else f"{eta:.0f}s"
    return (
        f"seq {last}/{tally.end_seq}  {rate:,.0f} msg/s  new {tally.new:,}  "
        f"already stored {tally.already_stored:,}  rejected {tally.rejected:,}  "
        f"left ~{eta_text}"
    )


def _clear_progress(err: TextIO) -> None:
    if err.isatty():
        err.write("\r\x1b[K")
        err.flush()


def _ns(when: dt.datetime) -> int:
    delta = when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def _iso(when: dt.datetime | None) -> str | None:
    return None if when is None else wire.format_rfc3339(when)
