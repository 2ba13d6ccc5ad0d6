"""The progress watchdog behind /livez, on `autojump_clock` with in-memory fakes.

Times are Trio's virtual clock; the watchdog is told what happens (ingest
progress, NATS state, liveness ticks) and asked at exact instants. The tick
loop is the real `lead_liveness` on a tracker wired to fakes. Only the leader
ticks: a follower's /livez never fails for want of ticks.
"""

from __future__ import annotations

import trio
import trio.testing

from notip_trio.alertconfig import AlertConfigCache
from notip_trio.liveness import LivenessTracker
from notip_trio.metrics import Metrics
from notip_trio.mgmt import SUBJECT_GET_STATUS, MgmtClient
from notip_trio.progress import TICK_MAX_S, ProgressWatchdog
from notip_trio.ticking import lead_liveness
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

GUARD_S = 7200
STALL_S = 120.0
TICK_S = 10.0


def _watchdog() -> ProgressWatchdog:
    return ProgressWatchdog(stall_s=STALL_S, tick_s=TICK_S, started_at=trio.current_time())


def _ingest_problems(w: ProgressWatchdog) -> list[str]:
    return [p for p in w.problems(trio.current_time()) if p.startswith("ingest")]


def _ticks_alive(w: ProgressWatchdog) -> None:
    """Pretend the tick loop just ticked (tests of other checks)."""
    w.tick_started(trio.current_time())
    w.tick_finished(trio.current_time())


async def test_idle_daemon_is_live_however_long(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        w = _watchdog()
        await trio.sleep(10 * STALL_S)
        assert _ingest_problems(w) == []


async def test_work_in_hand_and_no_commit_fails_after_the_bound(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        w = _watchdog()
        await trio.sleep(1000)  # idle for long: the clock starts when work arrives
        w.ingest.received(100, 0, trio.current_time())
        await trio.sleep(STALL_S)
        assert _ingest_problems(w) == []  # exactly at the bound: still live
        await trio.sleep(0.001)
        [problem] = _ingest_problems(w)
        assert "100 deliveries in hand" in problem


async def test_commits_keep_it_live_and_failures_do_not(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        w = _watchdog()
        ing = w.ingest
        for _ in range(10):  # a steady stream, each batch committed within 30 s
            ing.received(50, 500, trio.current_time())
            await trio.sleep(30)
            ing.settled(50, committed=True, now=trio.current_time())
            assert _ingest_problems(w) == []
        t_last_commit = trio.current_time()
        # Now every write fails and the batch is nak'ed and redelivered: the
        # redeliveries are not new work, so the clock keeps running from the commit.
        while trio.current_time() - t_last_commit <= STALL_S:
            ing.received(50, 450, trio.current_time())
            await trio.sleep(15)
            ing.settled(50, committed=False, now=trio.current_time())
        assert ing.in_hand == 0  # nothing in hand, but lag says work is pending
        assert len(_ingest_problems(w)) == 1
        ing.received(50, 400, trio.current_time())
        ing.settled(50, committed=True, now=trio.current_time())
        assert _ingest_problems(w) == []


async def test_lag_alone_counts_as_pending(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        w = _watchdog()
        w.ingest.received(10, 5000, trio.current_time())
        w.ingest.settled(10, committed=True, now=trio.current_time())
        await trio.sleep(STALL_S + 1)  # pull path delivers nothing more, lag 5000
        assert len(_ingest_problems(w)) == 1
        w.ingest.received(10, 0, trio.current_time())
        w.ingest.settled(10, committed=True, now=trio.current_time())
        await trio.sleep(STALL_S + 1)
        assert _ingest_problems(w) == []  # drained: nothing pending


async def test_nats_disconnected_longer_than_the_bound(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        w = _watchdog()
        w.nats_connected(False, trio.current_time())
        await trio.sleep(STALL_S)
        _ticks_alive(w)
        w.nats_connected(False, trio.current_time())  # still down: the start is kept
        assert w.problems(trio.current_time()) == []
        await trio.sleep(1)
        _ticks_alive(w)
        assert [p.split(":")[0] for p in w.problems(trio.current_time())] == ["nats"]
        w.nats_connected(True, trio.current_time())
        assert w.problems(trio.current_time()) == []


async def test_tick_loop_that_stops_fails_after_five_intervals(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        w = _watchdog()
        await trio.sleep(100 * TICK_S)
        assert w.problems(trio.current_time()) == []  # a follower does not tick
        w.lead_started(trio.current_time())  # became the leader at 1000 s
        await trio.sleep(5 * TICK_S)
        assert w.problems(trio.current_time()) == []
        await trio.sleep(0.5)
        [problem] = w.problems(trio.current_time())
        assert problem.startswith("liveness: no tick")
        w.lead_ended()  # leadership lost: nothing to watch any more
        assert w.problems(trio.current_time()) == []


async def test_a_long_tick_is_live_until_its_own_bound(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        w = _watchdog()
        w.lead_started(trio.current_time())
        w.tick_started(trio.current_time())
        await trio.sleep(TICK_MAX_S)
        assert w.problems(trio.current_time()) == []
        await trio.sleep(1)
        [problem] = w.problems(trio.current_time())
        assert problem.startswith("liveness: one tick has run")


async def test_lead_liveness_reports_each_tick(autojump_clock: trio.abc.Clock) -> None:
    """The real tick loop keeps the watchdog content; a tick that waits on a
    slow management API is seen as running, not stuck."""
    with trio.fail_after(GUARD_S):
        store = FakeStore()
        store.record(("t1", "gw1"), wall_at(0.5))
        requester = FakeRequester({SUBJECT_GET_STATUS: status_handler({}, delay_s=4)})
        tracker = LivenessTracker(
            store,
            AlertConfigCache(30_000),
            MgmtClient(requester),
            FakePublisher(),
            RecordingSink(),
            Metrics(),
            CaughtUp(),
            grace_until=0.0,
            concurrency=32,
            wall_clock=trio_wall_clock,
        )
        w = _watchdog()
        seen: list[tuple[str, float]] = []

        class Recorder:
            def lead_started(self, now: float) -> None:
                seen.append(("lead", now))
                w.lead_started(now)

            def lead_ended(self) -> None:
                seen.append(("follow", trio.current_time()))
                w.lead_ended()

            def tick_started(self, now: float) -> None:
                seen.append(("start", now))
                w.tick_started(now)

            def tick_finished(self, now: float) -> None:
                seen.append(("end", now))
                w.tick_finished(now)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lead_liveness, tracker, TICK_S, Recorder())
            for _ in range(12):
                await trio.sleep(5)
                assert w.problems(trio.current_time()) == []
            nursery.cancel_scope.cancel()
        # The load at 0 counts as a tick; ticks at 0 (after the load), 10, 20, 30;
        # an early one at 30.6 (gw1 due at 30.5) waits 4 s on get-status.
        assert seen[:11] == [
            ("lead", 0.0),
            ("start", 0.0),
            ("end", 0.0),
            ("start", 0.0),
            ("end", 0.0),
            ("start", 10.0),
            ("end", 10.0),
            ("start", 20.0),
            ("end", 20.0),
            ("start", 30.0),
            ("end", 30.0),
        ]
        early = [(event, round(t, 3)) for event, t in seen[11:13]]
        assert early == [("start", 30.6), ("end", 34.6)]
        assert seen[-1] == ("follow", 60.0)
