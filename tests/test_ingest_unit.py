"""Ingest on in-memory fakes and Trio's virtual clock: exact times, exact order.

Rules for this file: everything runs on `autojump_clock`. The writer and the
acker are the fakes of tests/ingest_fakes.py, which append to one shared event
log with the virtual time of each call, so a test states the whole sequence of
writes, commits, acks, naks and terms exactly. Messages carry real JetStream ack
subjects; bodies go through the real decoder. Every test has a hang guard.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from notip_trio.alertconfig import AlertConfigCache
from notip_trio.ingest import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    PROBE_S,
    IngestState,
    Probe,
    SeenBuffer,
    flush_seen,
    run_ingest,
    run_seen_flusher,
)
from notip_trio.js.delivery import JsMsg
from notip_trio.liveness import LivenessTracker
from notip_trio.metrics import Metrics
from notip_trio.mgmt import SUBJECT_GET_STATUS, MgmtClient
from notip_trio.ticking import lead_liveness
from tests.ingest_fakes import (
    Events,
    FakeAcker,
    FakeWriter,
    RecordingSeenBuffer,
    ack_subject,
    bad,
    envelope,
    good,
    spoofed,
    stream_time,
    value,
)
from tests.liveness_fakes import (
    CaughtUp,
    FakePublisher,
    FakeRequester,
    FakeStore,
    RecordingSink,
    status_handler,
    trio_wall_clock,
    wall_at,
)

GUARD_S = 3600
MAX_BODY = 16384


@dataclasses.dataclass(eq=False)
class Rig:
    writer: FakeWriter
    events: Events
    pulled: trio.MemorySendChannel[list[JsMsg]]
    metrics: Metrics
    state: IngestState
    seen: RecordingSeenBuffer
    returned_at: float | None = None

    async def send(self, *msgs: JsMsg) -> None:
        await self.pulled.send(list(msgs))
        await trio.testing.wait_all_tasks_blocked()


@asynccontextmanager
async def running_ingest(
    *,
    hold_s: float = 0.0,
    fail: int = 0,
    max_body: int = MAX_BODY,
    rejected_body_max: int = MAX_BODY,
    store: FakeStore | None = None,
    probe: Probe | None = None,
) -> AsyncIterator[Rig]:
    """`run_ingest` on fakes, with the last-seen flusher writing to `store` (a
    fresh `FakeStore` if none) and acking. On exit the input closes and the block
    waits for `run_ingest` to return (`rig.returned_at`), then flushes once more,
    as the task tree does."""
    events = Events()
    pulled_tx, pulled_rx = trio.open_memory_channel[list[JsMsg]](32)
    writer = FakeWriter(events, hold_s=hold_s, fail=fail)
    store = store if store is not None else FakeStore()
    acker = FakeAcker(events)
    rig = Rig(writer, events, pulled_tx, Metrics(), IngestState(), RecordingSeenBuffer(events))

    async def ingest(task_status: trio.TaskStatus[None]) -> None:
        await run_ingest(
            pulled_rx,
            rig.writer,
            acker,
            rig.metrics,
            rig.state,
            rig.seen,
            max_body=max_body,
            rejected_body_max=rejected_body_max,
            probe=probe,
            task_status=task_status,
        )
        rig.returned_at = trio.current_time()

    async with trio.open_nursery() as nursery:
        await nursery.start(run_seen_flusher, rig.seen, store, acker, rig.metrics)
        async with trio.open_nursery() as ingesting:
            await ingesting.start(ingest)
            yield rig
            await pulled_tx.aclose()
        await flush_seen(rig.seen, store, acker)
        nursery.cancel_scope.cancel()


# --- ack after commit, term after the rejected record's commit ------------------


async def test_a_batch_is_acked_only_after_its_commit(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        async with running_ingest(hold_s=2) as rig:
            await trio.sleep(1)
            await rig.send(good(1), good(2), good(3))
            assert rig.events.log == [(1, "write", 3, 0)]  # nothing acked while in flight
            await trio.sleep(5)
    assert rig.events.log == [
        (1, "write", 3, 0),
        (3, "commit", ["s1", "s2", "s3"], []),
        (3, "ack", [1, 2, 3]),
    ]
    assert value(rig.metrics, "messages_written_total") == 3
    assert value(rig.metrics, "consumer_ack_pending_messages") == 0
    assert (rig.state.last_write_ok, rig.state.last_error) == (True, "")


async def test_bad_messages_are_terminated_only_after_their_records_commit(
    autojump_clock: trio.abc.Clock,
) -> None:
    mismatch = spoofed(4, "gw-1", "gw-9")
    with trio.fail_after(GUARD_S):
        async with running_ingest(hold_s=2) as rig:
            await rig.send(good(1), bad(2), good(3), mismatch)
            assert rig.events.log == [(0, "write", 2, 2)]  # one transaction for both
            await trio.sleep(5)
    assert rig.events.log == [
        (0, "write", 2, 2),
        (2, "commit", ["s1", "s3"], [2, 4]),
        (2, "term", [2, 4]),
        (2, "ack", [1, 3]),  # once their last-seen is stored as well
    ]
    assert [(r.reason, r.subject, r.stream_seq) for r in rig.writer.rejected] == [
        ("malformed_json", "telemetry.data.t1.gw-1", 2),
        ("gateway_mismatch", "telemetry.data.t1.gw-1", 4),
    ]
    assert value(rig.metrics, "message_parsing_errors_total", reason="malformed_json") == 1
    assert value(rig.metrics, "message_parsing_errors_total", reason="gateway_mismatch") == 1
    assert value(rig.metrics, "rejected_messages_stored_total") == 2
    assert value(rig.metrics, "messages_written_total") == 2


async def test_a_failed_write_naks_good_and_bad_and_terminates_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        async with running_ingest(fail=1) as rig:
            await rig.send(good(1), bad(2))
            assert rig.state.last_write_ok is False
            assert rig.state.last_error == "OperationalError: the connection is lost"
            assert rig.writer.rejected == []
            await trio.sleep(10)
            # The redelivery of the same two messages.
            await rig.send(good(1), bad(2))
    assert rig.events.log == [
        (0, "write", 1, 1),
        (0, "fail"),
        (0, "nak", [1, 2], BACKOFF_INITIAL_S),
        (10, "write", 1, 1),
        (10, "commit", ["s1"], [2]),
        (10, "term", [2]),
        (10, "ack", [1]),
    ]
    assert [r.stream_seq for r in rig.writer.rejected] == [2]
    assert value(rig.metrics, "write_errors_total") == 1
    assert value(rig.metrics, "consumer_ack_pending_messages") == 0
    assert (rig.state.last_write_ok, rig.state.last_error) == (True, "")


async def test_a_message_is_acked_only_once_its_last_seen_is_stored(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The row commits at 0, but the state table is down until 7: the heartbeat is
    not acknowledged before its gateway's last-seen is stored, so a replica that
    dies meanwhile leaves it to be redelivered, never lost."""
    store = FakeStore()
    store.down = True
    with trio.fail_after(GUARD_S):
        async with running_ingest(store=store) as rig:
            await rig.send(good(1))
            await trio.sleep(7.1)
            assert rig.events.only("ack") == []
            assert store.rows == {}
            assert value(rig.metrics, "consumer_ack_pending_messages") == 1
            # Tried at 0, then every SEEN_FLUSH_S (0.1 s) up to 7.1.
            assert value(rig.metrics, "last_seen_flush_errors_total") == 72
            store.down = False
            await trio.sleep(1)
            [(at, what, seqs)] = rig.events.only("ack")
            assert (at, what, seqs) == (pytest.approx(7.2), "ack", [1])  # the next try
    assert list(store.rows) == [("t1", "gw-1")]
    assert value(rig.metrics, "last_seen_flush_errors_total") == 72
    assert value(rig.metrics, "consumer_ack_pending_messages") == 0


# --- back-off -----------------------------------------------------------------------


async def test_write_failures_back_off_from_half_a_second_doubling_to_30_s_then_reset(
    autojump_clock: trio.abc.Clock,
) -> None:
    assert (BACKOFF_INITIAL_S, BACKOFF_MAX_S) == (0.5, 30.0)
    with trio.fail_after(GUARD_S):
        # Eight failures then one success, nine batches queued at once; at 100 s
        # one more batch, whose write fails again.
        async with running_ingest(fail=8) as rig:
            for seq in range(1, 10):
                await rig.pulled.send([good(seq)])
            await trio.sleep_until(100)
            rig.writer.fail = 1
            await rig.send(good(10))
    delays = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    expected: list[tuple[Any, ...]] = []
    t = 0.0
    for seq, delay in enumerate(delays, start=1):
        # Nak'd with the delay the writer then waits itself: the batch comes back
        # by redelivery no sooner than the writer is ready for it.
        expected.append((t, "nak", [seq], delay))
        t += delay
    assert t == 91.5
    expected.append((91.5, "ack", [9]))
    expected.append((100, "nak", [10], 0.5))  # the success reset the back-off
    assert rig.events.only("ack", "nak") == expected
    # Each write was tried the moment the previous wait ended.
    assert [e[0] for e in rig.events.only("write")] == [e[0] for e in expected]
    assert value(rig.metrics, "write_errors_total") == 9
    assert rig.returned_at == 100.5  # the last back-off is served before it returns


class _Database:
    """A `Probe`: the database answers from `up_at` (virtual time) on; logs each
    question in `asked_at`."""

    def __init__(self, up_at: float) -> None:
        self.up_at = up_at
        self.asked_at: list[float] = []

    async def __call__(self) -> bool:
        self.asked_at.append(trio.current_time())
        return trio.current_time() >= self.up_at


async def test_after_an_outage_the_next_write_comes_when_the_database_answers(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The database is down from 0 to 7.2: one failed write, then the writer
    asks every PROBE_S, and writes the moment it answers (7.5), not after a
    back-off doubling with each failure."""
    database = _Database(up_at=7.2)
    with trio.fail_after(GUARD_S):
        async with running_ingest(fail=1, probe=database) as rig:
            await rig.send(good(1))
            await rig.send(good(2))
            await trio.sleep(10)
            await rig.send(good(1))  # the redelivery
    assert rig.events.log == [
        (0, "write", 1, 0),
        (0, "fail"),
        (0, "nak", [1], BACKOFF_INITIAL_S),
        (7.5, "write", 1, 0),
        (7.5, "commit", ["s2"], []),
        (7.5, "ack", [2]),
        (10, "write", 1, 0),
        (10, "commit", ["s1"], []),
        (10, "ack", [1]),
    ]
    assert PROBE_S == 0.5
    assert database.asked_at == [i * PROBE_S for i in range(16)]
    assert value(rig.metrics, "write_errors_total") == 1


async def test_a_write_failing_while_the_database_answers_still_backs_off(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The probe answers at once: the write failed for another reason, so the
    writer waits out its back-off as without a probe."""
    database = _Database(up_at=0)
    with trio.fail_after(GUARD_S):
        async with running_ingest(fail=2, probe=database) as rig:
            await rig.send(good(1))
            await rig.send(good(2))
            await rig.send(good(3))
            await trio.sleep(5)
    assert [(e[0], e[1]) for e in rig.events.only("write", "ack")] == [
        (0, "write"),
        (0.5, "write"),
        (1.5, "write"),
        (1.5, "ack"),
    ]
    assert database.asked_at == [0, 0.5]


async def test_ingest_waits_out_the_back_off_before_the_next_write(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        async with running_ingest(fail=2) as rig:
            await rig.send(good(1))
            await rig.send(good(2))
            await rig.send(good(3))
            await trio.sleep(5)
    assert rig.events.log == [
        (0, "write", 1, 0),
        (0, "fail"),
        (0, "nak", [1], 0.5),
        (0.5, "write", 1, 0),
        (0.5, "fail"),
        (0.5, "nak", [2], 1.0),
        (1.5, "write", 1, 0),
        (1.5, "commit", ["s3"], []),
        (1.5, "ack", [3]),
    ]


# --- last-seen (the liveness state) --------------------------------------------------


async def test_last_seen_comes_only_from_valid_rows(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        async with running_ingest() as rig:
            await trio.sleep(7)
            await rig.send(
                good(1, "gw-1"),
                good(2, "gw-1"),
                spoofed(3, "gw-2", "gw-9"),  # gw-2's subject, another payload
                bad(4, subject="telemetry.data.t1.gw-3"),
                bad(5, envelope("gw-4", 5), subject="telemetry.data.t1"),
                good(6, "gw-5", tenant="t2"),
            )
            await trio.sleep(3)
            # A batch with no valid row records no last-seen at all.
            await rig.send(spoofed(7, "gw-2", "gw-9"), bad(8, subject="telemetry.data.t1.gw-2"))
    # Each gateway's newest valid message, at the time it reached the stream
    # (its ack subject), recorded once its batch committed and before the ack.
    assert rig.seen.added == [
        {("t1", "gw-1"): stream_time(2), ("t2", "gw-5"): stream_time(6)},
        {},
    ]
    first = rig.seen.positions[0]
    assert [e[1] for e in rig.events.log[first - 2 : first]] == ["write", "commit"]
    assert rig.events.only("ack") == [(7, "ack", [1, 2, 6])]  # after the last-seen write
    assert rig.events.log.index(rig.events.only("ack")[0]) > first
    assert rig.events.only("term") == [(7, "term", [3, 4, 5]), (10, "term", [7, 8])]


async def test_last_seen_is_the_stream_time_not_the_processing_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A redelivery (or another replica, or a backlog) cannot move it: the same
    message gives the same last-seen whenever it is processed."""
    with trio.fail_after(GUARD_S):
        async with running_ingest(fail=1) as rig:
            await rig.send(good(1), good(2))  # the write fails: nak'ed, comes back
            await trio.sleep(100)
            redelivered = [
                JsMsg(m.subject, m.data, ack_subject(seq, delivered=2)) for seq, m in
                ((1, good(1)), (2, good(2)))
            ]  # fmt: skip
            await rig.send(*redelivered)
    assert rig.seen.added == [{("t1", "gw-1"): stream_time(2)}]  # not from the failed write


@pytest.mark.parametrize(
    ("last", "alerts"),
    [
        ("spoofed", [(31.1, "alert.t1.gw_offline", "gw-1")]),
        ("genuine", []),  # the control: a real message does keep it alive
    ],
)
async def test_a_spoofed_message_on_a_silent_gateways_subject_does_not_keep_it_alive(
    autojump_clock: trio.abc.Clock, last: str, alerts: list[tuple[float, str, str]]
) -> None:
    """gw-1 is heard at 1 s and then only spoofed messages come on its subject (a
    valid envelope of gw-2): with a 30 s timeout it is alerted at 31.1 s (an
    early tick, just after it became due), exactly as if nothing had come.
    Ingest commits into a `FakeStore` (the state table) and the leader's
    tracker reads it, as in the daemon."""
    store = FakeStore()
    cache = AlertConfigCache(30_000)
    requester = FakeRequester({SUBJECT_GET_STATUS: status_handler()})
    publisher, sink, metrics = FakePublisher(), RecordingSink(store), Metrics()
    tracker = LivenessTracker(
        store,
        cache,
        MgmtClient(requester),
        publisher,
        sink,
        metrics,
        CaughtUp(),
        grace_until=0.0,
        concurrency=32,
        wall_clock=trio_wall_clock,
    )
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lead_liveness, tracker, 10.0)
            async with running_ingest(store=store) as rig:
                await trio.sleep(1)
                await rig.send(good(1, "gw-1", at=wall_at(1)))
                for seq, t in ((2, 9), (3, 19), (4, 29)):
                    await trio.sleep_until(t)
                    if last == "genuine" and t == 29:
                        await rig.send(good(seq, "gw-1", at=wall_at(t)))
                    else:
                        await rig.send(spoofed(seq, "gw-1", "gw-2", at=wall_at(t)))
                await trio.sleep_until(45)
                published = [
                    (round(t, 3), s, body["gatewayId"]) for t, s, body, _ in publisher.published
                ]
                assert published == alerts
                assert tracker.status("t1", "gw-2") is None  # the payload's gateway: not heard
                assert tracker.status("t1", "gw-1") == ("offline" if alerts else "online")
            nursery.cancel_scope.cancel()
    # Every spoofed message was kept as rejected and terminated, none acked.
    terms = [e[2][0] for e in rig.events.only("term")]
    assert terms == ([2, 3, 4] if last == "spoofed" else [2, 3])
    assert value(rig.metrics, "message_parsing_errors_total", reason="gateway_mismatch") == len(
        terms
    )


# --- body caps --------------------------------------------------------------------


def _padded(gateway: str, seq: int, size: int) -> bytes:
    """A valid envelope padded with trailing JSON whitespace to exactly `size` bytes."""
    body = envelope(gateway, seq)
    assert len(body) <= size
    return body + b" " * (size - len(body))


@pytest.mark.parametrize(
    ("max_body", "rejected_max"), [(400, 100), (400, 0), (400, 4000), (1000, 400)]
)
async def test_body_caps_cut_where_each_says(
    autojump_clock: trio.abc.Clock, max_body: int, rejected_max: int
) -> None:
    """TELEMETRY_MAX_BODY_BYTES decides what is oversized; REJECTED_BODY_MAX_BYTES
    alone decides how much of a bad body is kept. Exact boundary on both sides."""
    at_limit = _padded("gw-1", 1, max_body)
    over_limit = _padded("gw-1", 2, max_body + 1)
    junk_at_limit = b"{" * max_body  # bad JSON, not oversized: the cap is inclusive
    with trio.fail_after(GUARD_S):
        async with running_ingest(max_body=max_body, rejected_body_max=rejected_max) as rig:
            await rig.send(
                JsMsg("telemetry.data.t1.gw-1", at_limit, ack_subject(1)),
                JsMsg("telemetry.data.t1.gw-1", over_limit, ack_subject(2)),
                bad(3, junk_at_limit),
            )
    assert rig.events.only("ack", "term") == [(0, "term", [2, 3]), (0, "ack", [1])]
    assert [r.sensor_id for r in rig.writer.rows] == ["s1"]
    kept = [(r.reason, r.body, r.body_length, r.stream_seq) for r in rig.writer.rejected]
    assert kept == [
        ("oversized", over_limit[:rejected_max], max_body + 1, 2),
        ("malformed_json", junk_at_limit[:rejected_max], max_body, 3),
    ]
    assert [len(body) for _, body, _, _ in kept] == [
        min(rejected_max, max_body + 1),
        min(rejected_max, max_body),
    ]


# --- shutdown -----------------------------------------------------------------------


async def test_closing_the_input_writes_and_acks_what_is_in_hand_then_returns(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        async with running_ingest(hold_s=3) as rig:
            assert rig.state.running
            await rig.send(good(1))
            await rig.send(good(2))
            await rig.send(good(3))
            # The block ends: the input closes at 0 with three batches in hand.
    assert rig.returned_at == 9
    assert rig.events.only("ack") == [(3, "ack", [1]), (6, "ack", [2]), (9, "ack", [3])]
    assert not rig.state.running


async def test_cancelled_ingest_acks_nothing_it_did_not_commit(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Past the shutdown deadline the write is abandoned: no ack, no nak, no term
    (the messages come back after ack_wait)."""
    events = Events()
    writer = FakeWriter(events, hold_s=100)
    pulled_tx, pulled_rx = trio.open_memory_channel[list[JsMsg]](4)
    state = IngestState()
    with trio.fail_after(GUARD_S):
        with trio.move_on_after(5) as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    functools.partial(run_ingest, max_body=MAX_BODY, rejected_body_max=MAX_BODY),
                    pulled_rx,
                    writer,
                    FakeAcker(events),
                    Metrics(),
                    state,
                    SeenBuffer(),
                )
                await pulled_tx.send([good(1), bad(2)])
    assert scope.cancelled_caught
    assert trio.current_time() == 5
    assert events.log == [(0, "write", 1, 1)]
    assert not state.running
