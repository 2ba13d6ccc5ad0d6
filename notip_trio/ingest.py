"""Telemetry ingest: pulled batches → strict decode → one COPY per batch → ack.

Two stages joined by a bounded channel, so the next batch is decoded while the
current one is written:

    pull slots ──list[JsMsg]──▶ decode ──Prepared──▶ write (thread) ──▶ ack / term

A message is acked only after its row *and* its gateway's last-seen are
committed (docs/contract.md Behaviour 8): each committed batch hands its gateways'
last-seen and its messages to a `SeenBuffer`; `run_seen_flusher` writes the
last-seen of everything in hand in upserts of its own (off the ingest path,
as soon as there is something and at most every `SEEN_FLUSH_S`; at most
`SEEN_CHUNK` gateways per transaction) and acks those messages only once
every one of them committed. So an acknowledged heartbeat can never
be lost with a replica, and the durable's ack floor tells the leader up to
which stream time the state table is complete (`horizon.py`). Last-seen is the
time each gateway's newest valid message reached the stream, read from the
delivery's ack subject, so a backlog, a redelivery or another replica cannot
move it. Only valid rows count: a message naming another gateway keeps nobody
alive. A bad message is terminated as soon as its `telemetry_rejected` record
commits (it keeps nobody alive, so it waits for no last-seen). When the write
fails, the whole batch is nak'ed with a delay (it comes back by
redelivery) and the writer backs off; nothing is acked, nothing is lost.
When the database did not answer (an outage), the writer waits for it to
answer again instead of for the back-off, so the backlog is written the
moment it returns (`probe`).
Closing the input channel means "drain and stop": what is in hand is written
and acked before `run_ingest` returns.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, NoReturn, Protocol

import trio

from .db.writer import RejectedRecord, WriteResult
from .envelope import Rejection, Row, decode
from .errors import DatabaseError
from .horizon import StreamClock
from .js.bridge import Acker
from .js.delivery import Delivery, JsMsg
from .lanes import Key
from .livestate import SEEN_CHUNK, SeenRecorder
from .log import get_logger
from .metrics import Metrics
from .progress import IngestProgress

log = get_logger(__name__)

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
# While the database does not answer, how often the writer asks again.
PROBE_S: Final = 0.5

# Whether the database answers right now (a `SELECT 1` under its own deadline).
Probe = Callable[[], Awaitable[bool]]


class Writer(Protocol):
    async def write_batch(
        self, rows: Sequence[Row], rejected: Sequence[RejectedRecord]
    ) -> WriteResult: ...


@dataclass(slots=True)
class Prepared:
    good: list[JsMsg] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    bad: list[JsMsg] = field(default_factory=list)
    rejected: list[RejectedRecord] = field(default_factory=list)
    seen: dict[Key, dt.datetime] = field(default_factory=dict)  # stream arrival, per gateway
    newest_ns: int = 0  # the newest stream timestamp of the batch (for the stream clock)


@dataclass(slots=True)
class IngestState:
    """What /readyz needs to know about ingest."""

    running: bool = False
    last_write_ok: bool = True
    last_error: str = ""
    progress: IngestProgress = field(default_factory=IngestProgress)  # what /livez needs


_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def prepare(
    msgs: Sequence[JsMsg], *, max_body: int, rejected_body_max: int, metrics: Metrics
) -> Prepared:
    """Decode a pulled batch: rows, rejects, and the gateways' last-seen."""
    out = Prepared()
    newest: dict[Key, int] = {}  # stream timestamp (ns) of each gateway's newest message
    now: dt.datetime | None = None
    good, rows = out.good, out.rows
    timestamp_of = Delivery.timestamp_of
    for msg in msgs:
        subject, data, reply = msg
        result = decode(subject, data, max_body=max_body)
        if type(result) is Row:
            good.append(msg)
            rows.append(result)
            ts = timestamp_of(reply)
            if ts is None:
                ts = _now_ns()
            key = (result.tenant_id, result.gateway_id)
            if ts > newest.get(key, 0):
                newest[key] = ts
            continue
        assert isinstance(result, Rejection)
        if now is None:
            now = dt.datetime.now(dt.UTC)
        out.bad.append(msg)
        out.rejected.append(_rejected(msg, result, now, rejected_body_max))
        metrics.message_parsing_errors.labels(result.reason).inc()
        # Logged once per delivery; no blobs: subject, reason, sizes only.
        log.warning(
            "message_rejected",
            reason=result.reason,
            detail=result.detail[:200],
            subject=msg.subject[:200],
            body_length=len(msg.data),
            stream_seq=_stream_seq(msg),
        )
    metrics.messages_received.inc(len(msgs))
    metrics.consumer_ack_pending.inc(len(msgs))
    if msgs and (last := msgs[-1].delivery) is not None:
        metrics.consumer_pending.set(last.pending)
    out.seen = {key: _EPOCH + dt.timedelta(microseconds=ns // 1000) for key, ns in newest.items()}
    out.newest_ns = max(newest.values(), default=0)
    return out


def _now_ns() -> int:
    # Only for a delivery without an ack subject, which JetStream never sends.
    return int((dt.datetime.now(dt.UTC) - _EPOCH).total_seconds() * 1e9)


def _rejected(msg: JsMsg, why: Rejection, now: dt.datetime, cap: int) -> RejectedRecord:
    return RejectedRecord(
        received_at=now,
        subject=msg.subject,
        reason=why.reason,
        detail=why.detail,
        body=bytes(msg.data[:cap]),
        body_length=len(msg.data),
        stream_seq=_stream_seq(msg),
    )


def _stream_seq(msg: JsMsg) -> int | None:
    delivery = msg.delivery
    return delivery.stream_seq if delivery is not None else None


async def run_ingest(
    pulled: trio.MemoryReceiveChannel[list[JsMsg]],
    writer: Writer,
    acker: Acker,
    metrics: Metrics,
    state: IngestState,
    seen: SeenBuffer,
    *,
    max_body: int,
    rejected_body_max: int,
    clock: StreamClock | None = None,
    wall: Callable[[], float] = time.time,
    probe: Probe | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run both stages until `pulled` is closed and drained, then return.

    `clock`, if given, learns this host's skew against the stream's clock from
    each batch's newest stream timestamp (`wall` at receipt). `probe`, if
    given, tells after a failed write whether the database answers (see
    `_back_off`)."""
    prepared_tx, prepared_rx = trio.open_memory_channel[Prepared](1)
    state.running = True
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _decode_stage,
                pulled,
                prepared_tx,
                metrics,
                state.progress,
                max_body,
                rejected_body_max,
                clock,
                wall,
            )
            nursery.start_soon(
                _write_stage, prepared_rx, writer, acker, metrics, state, seen, probe
            )
            task_status.started()
    finally:
        state.running = False


async def _decode_stage(
    pulled: trio.MemoryReceiveChannel[list[JsMsg]],
    prepared_tx: trio.MemorySendChannel[Prepared],
    metrics: Metrics,
    progress: IngestProgress,
    max_body: int,
    rejected_body_max: int,
    clock: StreamClock | None,
    wall: Callable[[], float],
) -> None:
    async with pulled, prepared_tx:
        async for msgs in pulled:
            received_at = wall()
            last = msgs[-1].delivery if msgs else None
            progress.received(
                len(msgs), last.pending if last is not None else None, trio.current_time()
            )
            batch = prepare(
                msgs, max_body=max_body, rejected_body_max=rejected_body_max, metrics=metrics
            )
            if clock is not None and batch.newest_ns:
                clock.observe(received_at, batch.newest_ns / 1e9)
                metrics.stream_clock_skew.set(clock.skew)
            await prepared_tx.send(batch)


async def _write_stage(
    prepared_rx: trio.MemoryReceiveChannel[Prepared],
    writer: Writer,
    acker: Acker,
    metrics: Metrics,
    state: IngestState,
    seen: SeenBuffer,
    probe: Probe | None,
) -> None:
    backoff = 0.0
    async with prepared_rx:
        async for batch in prepared_rx:
            started = trio.current_time()
            try:
                result = await writer.write_batch(batch.rows, batch.rejected)
            except DatabaseError as exc:
                backoff = min(max(backoff * 2, BACKOFF_INITIAL_S), BACKOFF_MAX_S)
                metrics.write_errors.inc()
                state.last_write_ok, state.last_error = False, str(exc)[:300]
                log.error(
                    "batch_write_failed",
                    error=state.last_error,
                    messages=len(batch.good) + len(batch.bad),
                    retry_in_s=backoff,
                )
                await acker.nak(batch.good + batch.bad, delay_s=backoff)
                metrics.consumer_ack_pending.dec(len(batch.good) + len(batch.bad))
                state.progress.settled(
                    len(batch.good) + len(batch.bad), committed=False, now=trio.current_time()
                )
                await _back_off(backoff, probe)
                continue
            if not state.last_write_ok:
                log.info("batch_write_recovered")
            backoff = 0.0
            state.last_write_ok, state.last_error = True, ""
            elapsed = trio.current_time() - started
            metrics.write_duration.observe(elapsed)
            log.debug(
                "batch_written",
                rows=result.inserted,
                duplicates=result.duplicates,
                rejected=len(batch.rejected),
                seconds=round(elapsed, 4),
            )
            metrics.batch_size.observe(len(batch.rows))
            # Committed: the good messages are acked once their last-seen is
            # stored too (run_seen_flusher); the bad ones keep nobody alive.
            seen.add(batch.seen, batch.good)
            await acker.term(batch.bad)
            metrics.consumer_ack_pending.dec(len(batch.bad))
            state.progress.settled(
                len(batch.good) + len(batch.bad), committed=True, now=trio.current_time()
            )
            metrics.messages_written.inc(result.inserted)
            metrics.rejected_stored.inc(len(batch.rejected))
            if result.duplicates:
                metrics.duplicates_skipped.inc(result.duplicates)
                log.info("duplicates_skipped", count=result.duplicates)


async def _back_off(backoff_s: float, probe: Probe | None) -> None:
    """The writer's wait after a failed write: `backoff_s` while the database
    answers (the write failed for another reason: do not hammer it), but while
    it does not (an outage), until it answers again, however long or short.

    Sleeping out the back-off (doubling to BACKOFF_MAX_S) left a backlog
    untouched for up to 30 s after a database came back (BENCHMARKS.md, issue
    20: the database outage). The batch was nak'ed with the delay of this
    back-off, so while the database is down it comes back within
    BACKOFF_INITIAL_S and waits in the pipeline; one failed write per outage."""
    if probe is None or await probe():
        await trio.sleep(backoff_s)
        return
    await trio.sleep(PROBE_S)
    while not await probe():  # noqa: ASYNC110 - the database, not a task, is waited for
        await trio.sleep(PROBE_S)


# How often, at most, the last-seen of committed batches is written (and their
# messages acknowledged): the ack waits up to this long after the commit, and
# the liveness horizon trails by about as much. Measured (BENCHMARKS.md, "Ack
# after last-seen"): at 100 ms the oldest unacked message's age at half load
# was 260-276 ms p99 against 442-510 ms at 200 ms, throughput within the noise.
SEEN_FLUSH_S: Final = 0.1
# Chunks of one flush written at once (a backlog after an outage drains ~1.3x
# faster with two on 2 cores; BENCHMARKS.md).
SEEN_WRITERS: Final = 2


class SeenBuffer:
    """Committed batches waiting for their last-seen to be stored, then their ack.

    Newest last-seen per gateway, and the messages to acknowledge once a write
    of it commits. `wait` returns when there is something to write.
    """

    def __init__(self) -> None:
        self._seen: dict[Key, dt.datetime] = {}
        self._msgs: list[JsMsg] = []
        self._filled = trio.Event()

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def messages(self) -> int:
        return len(self._msgs)

    def add(self, seen: Mapping[Key, dt.datetime], msgs: Sequence[JsMsg] = ()) -> None:
        mine = self._seen
        for key, at in seen.items():
            old = mine.get(key)
            if old is None or at > old:
                mine[key] = at
        self._msgs.extend(msgs)
        if mine or self._msgs:
            self._filled.set()

    def take(self) -> tuple[dict[Key, dt.datetime], list[JsMsg]]:
        taken = self._seen, self._msgs
        self._seen, self._msgs = {}, []
        self._filled = trio.Event()
        return taken

    async def wait(self) -> None:
        await self._filled.wait()


async def flush_seen(
    buffer: SeenBuffer,
    recorder: SeenRecorder,
    acker: Acker,
    *,
    chunk: int = SEEN_CHUNK,
    writers: int = SEEN_WRITERS,
) -> int:
    """Write what `buffer` holds, `chunk` gateways per transaction (in key
    order, each under its own deadline, up to `writers` at once), then ack
    its messages: only once every chunk committed. On a failed write put
    back the gateways of every chunk not committed and every message (newest
    last-seen wins) and raise DatabaseError: nothing is acked, and the chunks
    already committed are not written again. Returns how many gateways were
    written.

    Bounded chunks are what lets a backlog drain: after an outage the buffer
    holds about every gateway heard, more than one upsert could write within
    its deadline. Chunks are disjoint and each locks its rows in key order,
    so writing two at once cannot deadlock (livestate.py)."""
    seen, msgs = buffer.take()
    keys = sorted(seen)  # lock order (livestate.py), and chunks in key order
    parts = [keys[start : start + chunk] for start in range(0, len(keys), chunk)]
    committed = [False] * len(parts)
    failed: list[DatabaseError] = []
    todo = iter(range(len(parts)))

    async def write() -> None:
        for i in todo:
            if failed:
                return
            try:
                await recorder.record_seen({key: seen[key] for key in parts[i]})
            except DatabaseError as exc:
                failed.append(exc)
                return
            committed[i] = True

    def put_back() -> None:
        left = [key for i, part in enumerate(parts) if not committed[i] for key in part]
        buffer.add({key: seen[key] for key in left}, msgs)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(min(writers, len(parts))):
                nursery.start_soon(write)
    except BaseException:
        put_back()
        raise
    if failed:
        put_back()
        raise failed[0]
    if msgs:
        await acker.ack(msgs)
    return len(seen)


async def run_seen_flusher(
    buffer: SeenBuffer,
    recorder: SeenRecorder,
    acker: Acker,
    metrics: Metrics,
    *,
    interval_s: float = SEEN_FLUSH_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Write committed batches' last-seen and ack their messages, as soon as
    there is something and at most every `interval_s`; never returns.

    A failed write keeps everything for the next one (newest per gateway
    wins, nothing acked), counted and logged once per outage. The caller
    flushes once more after ingest has drained (`flush_seen`).
    """
    task_status.started()
    failing = False
    last = -math.inf
    while True:
        await buffer.wait()
        await trio.sleep_until(last + interval_s)
        last = trio.current_time()
        pending = buffer.messages
        try:
            await flush_seen(buffer, recorder, acker)
        except DatabaseError as exc:
            metrics.last_seen_flush_errors.inc()
            if not failing:
                log.warning("last_seen_flush_failed", error=str(exc)[:300], gateways=len(buffer))
            failing = True
            continue
        metrics.consumer_ack_pending.dec(pending)
        if failing:
            log.info("last_seen_flush_recovered")
            failing = False
