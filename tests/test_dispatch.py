"""Status updates from the outbox: order, at least once across leaders, failures
that keep an update, refusals and superseded reports that give it up, a bounded
drain.

Rules for this file: `autojump_clock` with a `FakeStore` (its outbox has the
table's semantics) and a fake `StatusUpdater` recording virtual times; every
test has a hang guard.
"""

from __future__ import annotations

from datetime import datetime

import trio
import trio.testing

from notip_trio.dispatch import Dispatcher
from notip_trio.errors import MgmtError
from notip_trio.metrics import Metrics
from notip_trio.mgmt import ReportedStatus
from tests.liveness_fakes import FakeStore, sample, wall_at

GUARD_S = 600
POLL_S = 10.0


class FakeUpdater:
    """update-status: `delay_s` per call; gateways in `refusing` are answered
    success=false; while `down`, every call fails without an answer."""

    def __init__(self, *, delay_s: float = 0.0, refusing: frozenset[str] = frozenset()) -> None:
        self.delay_s = delay_s
        self.refusing = refusing
        self.down = False
        self.calls: list[tuple[float, str, str]] = []  # delivered: (time, gateway, status)
        self.tries = 0

    async def update_status(
        self, gateway_id: str, status: ReportedStatus, last_seen_at: datetime
    ) -> None:
        self.tries += 1
        if self.delay_s:
            await trio.sleep(self.delay_s)
        if self.down:
            raise MgmtError("update-status: 4 attempts failed, last: no responders")
        if gateway_id in self.refusing:
            raise MgmtError("update-status: success=false", refused=True)
        self.calls.append((trio.current_time(), gateway_id, status))

    def brief(self) -> list[tuple[str, str]]:
        return [(g, s) for _, g, s in self.calls]


def transitions(store: FakeStore, *steps: tuple[str, str]) -> None:
    """Commit transitions (with their reports) as the leader does."""
    for gateway, status in steps:
        key = ("t1", gateway)
        if status == "online":
            store.record(key, wall_at(len(store.queued) + 1))
            store_mark_online(store, key)
        else:
            store.record(key, wall_at(len(store.queued) + 1))
            store_mark_offline(store, key)


def store_mark_online(store: FakeStore, key: tuple[str, str]) -> None:
    row = store.rows[key]
    row.update(status="online", status_last_seen=row["last_seen"])
    store._queue(key, "online", row["last_seen"])


def store_mark_offline(store: FakeStore, key: tuple[str, str]) -> None:
    row = store.rows[key]
    row.update(status="offline", status_last_seen=row["last_seen"])
    store._queue(key, "offline", row["last_seen"])


def dispatcher(
    store: FakeStore, updater: FakeUpdater, metrics: Metrics, batch: int = 1000
) -> Dispatcher:
    return Dispatcher(store, updater, metrics, batch=batch, poll_s=POLL_S)


async def test_reports_are_sent_in_order_and_cleared(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        store, updater, metrics = FakeStore(), FakeUpdater(delay_s=0.1), Metrics()
        transitions(store, ("a", "online"), ("b", "online"), ("a", "offline"))
        d = dispatcher(store, updater, metrics)
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            await trio.sleep(0.5)
            assert sample(metrics, "dispatch_queue_length") == 0
            transitions(store, ("a", "online"))
            d.wake()
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    assert [(round(t, 1), g, s) for t, g, s in updater.calls] == [
        (0.1, "a", "online"),
        (0.2, "b", "online"),
        (0.3, "a", "offline"),
        (0.6, "a", "online"),  # woken at 0.5
    ]
    assert store.outbox == {}
    assert sample(metrics, "status_updates_sent_total") == 4


async def test_a_full_read_only_delays_nothing_is_dropped(autojump_clock: trio.abc.Clock) -> None:
    """5,000 transitions at once (a cold start) with 1,000 read at a time: every
    report is delivered, none dropped."""
    with trio.fail_after(GUARD_S):
        store, updater, metrics = FakeStore(), FakeUpdater(delay_s=0.001), Metrics()
        transitions(store, *((f"gw{i}", "online") for i in range(5000)))
        d = dispatcher(store, updater, metrics, batch=1000)
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            await trio.sleep(5.5)  # 1 ms each
            assert len(updater.calls) == 5000
            nursery.cancel_scope.cancel()
    assert updater.brief() == [(f"gw{i}", "online") for i in range(5000)]
    assert sample(metrics, "status_update_dropped_total") == 0
    assert store.calls["pending_reports"] == 6  # five full reads and an empty one


async def test_a_failing_api_keeps_the_update_and_nothing_overtakes_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        store, updater, metrics = FakeStore(), FakeUpdater(), Metrics()
        updater.down = True
        transitions(store, ("a", "offline"), ("b", "online"), ("a", "online"))
        d = dispatcher(store, updater, metrics)
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            await trio.sleep(20)  # tries at 0, 1, 3, 7, 15: back-off 1, 2, 4, 8, 16
            assert updater.tries == 5
            assert len(store.outbox) == 3
            assert sample(metrics, "dispatch_queue_length") == 3
            updater.down = False
            await trio.sleep(20)
            nursery.cancel_scope.cancel()
    assert [(t, g, s) for t, g, s in updater.calls] == [
        (31, "a", "offline"),
        (31, "b", "online"),
        (31, "a", "online"),
    ]
    assert sample(metrics, "status_update_errors_total") == 5
    assert sample(metrics, "status_update_dropped_total") == 0


async def test_a_refused_update_is_given_up_and_the_rest_go_on(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        store, updater, metrics = FakeStore(), FakeUpdater(refusing=frozenset({"b"})), Metrics()
        transitions(store, ("a", "online"), ("b", "online"), ("c", "online"))
        d = dispatcher(store, updater, metrics)
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert updater.brief() == [("a", "online"), ("c", "online")]
    assert store.outbox == {}
    assert sample(metrics, "status_update_errors_total") == 1
    assert sample(metrics, "status_update_dropped_total") == 1


async def test_a_new_leader_sends_what_the_old_one_left_and_never_an_older_after_a_newer(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The old leader stops with two reports pending, one of them in flight: the
    next leader sends both in order (the one in flight again: at least once). A
    report whose gateway made a newer transition without the outbox (a release
    before it, which sent that one itself) is given up: never older after newer."""
    with trio.fail_after(GUARD_S):
        store, updater, metrics = FakeStore(), FakeUpdater(delay_s=1.0), Metrics()
        transitions(store, ("a", "offline"), ("b", "online"), ("c", "offline"))
        old = dispatcher(store, updater, metrics)
        async with trio.open_nursery() as nursery:
            await nursery.start(old.run)
            await trio.sleep(1.5)  # a's update delivered at 1, b's in flight
            nursery.cancel_scope.cancel()  # the old leader is gone
        assert updater.brief() == [("a", "offline")]
        assert store.outbox != {}
        # Meanwhile a leader of the release before the outbox made c online again.
        store.transition_unreported(("t1", "c"), "online", wall_at(50))
        new = dispatcher(store, updater, Metrics())
        async with trio.open_nursery() as nursery:
            await nursery.start(new.run)
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
    assert updater.brief() == [("a", "offline"), ("b", "online")]
    assert updater.tries == 3  # a, then b twice (cut off in flight, then delivered)
    assert store.outbox == {}


async def test_drain_waits_for_an_empty_outbox_within_its_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        store, updater, metrics = FakeStore(), FakeUpdater(delay_s=1.0), Metrics()
        d = dispatcher(store, updater, metrics)
        await d.drain(trio.current_time() + 5)  # not running (a follower): at once
        assert trio.current_time() == 0
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            transitions(store, ("a", "online"), ("b", "online"))
            await d.drain(trio.current_time() + 5)
            assert trio.current_time() == 2  # both sent, the outbox read empty
            transitions(store, *((f"gw{i}", "online") for i in range(10)))
            await d.drain(trio.current_time() + 3.5)
            assert trio.current_time() == 5.5  # the deadline: left for the next leader
            nursery.cancel_scope.cancel()
    assert len(updater.calls) == 5
    assert len(store.outbox) == 7  # gw3 was in flight: sent again by the next leader
