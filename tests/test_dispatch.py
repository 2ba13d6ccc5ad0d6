"""Status-update dispatcher: order, drop-when-full, failures, bounded drain.

Rules for this file: `autojump_clock` with a fake `StatusUpdater` recording
virtual times; every test has a hang guard.
"""

from __future__ import annotations

from datetime import datetime

import trio
import trio.testing

from notip_trio.dispatch import Dispatcher, StatusUpdate
from notip_trio.errors import MgmtError
from notip_trio.metrics import Metrics
from notip_trio.mgmt import ReportedStatus
from tests.liveness_fakes import WALL0, sample

GUARD_S = 600


class FakeUpdater:
    def __init__(self, *, delay_s: float = 0.0, failing: frozenset[str] = frozenset()) -> None:
        self.delay_s = delay_s
        self.failing = failing
        self.calls: list[tuple[float, str, str]] = []  # (time, gateway, status)

    async def update_status(
        self, gateway_id: str, status: ReportedStatus, last_seen_at: datetime
    ) -> None:
        if self.delay_s:
            await trio.sleep(self.delay_s)
        if gateway_id in self.failing:
            raise MgmtError("success=false")
        self.calls.append((trio.current_time(), gateway_id, status))


def update(gateway_id: str, status: ReportedStatus = "online") -> StatusUpdate:
    return StatusUpdate("t1", gateway_id, status, WALL0)


async def test_updates_are_sent_in_order_and_close_drains(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        updater = FakeUpdater(delay_s=1)
        metrics = Metrics()
        dispatcher = Dispatcher(updater, metrics, capacity=1000, drain_s=8.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            for i, status in enumerate(["online", "offline", "online"]):
                assert dispatcher.submit(update(f"gw{i}", status))  # type: ignore[arg-type]
            # gw0 went straight to the waiting worker; two wait in the queue.
            assert sample(metrics, "dispatch_queue_length") == 2
            dispatcher.close()
        assert updater.calls == [(1, "gw0", "online"), (2, "gw1", "offline"), (3, "gw2", "online")]
        assert sample(metrics, "dispatch_queue_length") == 0
        assert sample(metrics, "status_update_dropped_total") == 0


async def test_full_queue_drops_and_counts(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        updater = FakeUpdater(delay_s=10)
        metrics = Metrics()
        dispatcher = Dispatcher(updater, metrics, capacity=2, drain_s=60.0)
        assert sample(metrics, "dispatch_queue_capacity") == 2
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            assert dispatcher.submit(update("gw0"))
            await trio.testing.wait_all_tasks_blocked()  # the worker holds gw0
            assert dispatcher.submit(update("gw1"))
            assert dispatcher.submit(update("gw2"))
            # submit never blocks: full means dropped at once.
            assert not dispatcher.submit(update("gw3"))
            assert not dispatcher.submit(update("gw4"))
            assert trio.current_time() == 0
            assert sample(metrics, "status_update_dropped_total") == 2
            assert sample(metrics, "dispatch_queue_length") == 2
            await trio.sleep(15)  # gw0 done at 10: room again
            assert dispatcher.submit(update("gw5"))
            dispatcher.close()
        assert [gw for _, gw, _ in updater.calls] == ["gw0", "gw1", "gw2", "gw5"]


async def test_failed_update_is_counted_and_the_worker_goes_on(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        updater = FakeUpdater(failing=frozenset({"bad"}))
        metrics = Metrics()
        dispatcher = Dispatcher(updater, metrics, capacity=1000, drain_s=8.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            dispatcher.submit(update("bad"))
            dispatcher.submit(update("good"))
            dispatcher.close()
        assert [gw for _, gw, _ in updater.calls] == ["good"]
        assert sample(metrics, "status_update_errors_total") == 1


async def test_drain_is_bounded_and_reports_what_was_left(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        updater = FakeUpdater(delay_s=5)
        metrics = Metrics()
        dispatcher = Dispatcher(updater, metrics, capacity=1000, drain_s=12.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            for i in range(5):
                dispatcher.submit(update(f"gw{i}"))
            await trio.sleep(3)
            dispatcher.close()  # deadline 15: gw0 at 5, gw1 at 10, gw2 at 15 is cut off
        assert trio.current_time() == 15
        assert updater.calls == [(5, "gw0", "online"), (10, "gw1", "online")]
        assert sample(metrics, "status_update_dropped_total") == 3  # gw2 in flight, gw3, gw4
        assert sample(metrics, "dispatch_queue_length") == 0


async def test_drain_ends_by_the_deadline_the_task_tree_set(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        updater = FakeUpdater(delay_s=5)
        metrics = Metrics()
        dispatcher = Dispatcher(updater, metrics, capacity=1000, drain_s=60.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            for i in range(5):
                dispatcher.submit(update(f"gw{i}"))
            dispatcher.drain_by(7.0)  # before the close: the daemon's shutdown budget
            await trio.sleep(1)
            dispatcher.close()  # its own bound (61) is later: 7 wins
        assert trio.current_time() == 7
        assert updater.calls == [(5, "gw0", "online")]
        assert sample(metrics, "status_update_dropped_total") == 4
        # Set after the close, the earlier deadline still takes effect.
        dispatcher = Dispatcher(FakeUpdater(delay_s=5), metrics, capacity=10, drain_s=60.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            dispatcher.submit(update("late"))
            dispatcher.close()
            dispatcher.drain_by(trio.current_time() + 2)
        assert trio.current_time() == 9
        assert sample(metrics, "status_update_dropped_total") == 5


async def test_submit_after_close_is_dropped(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        metrics = Metrics()
        dispatcher = Dispatcher(FakeUpdater(), metrics, capacity=1000, drain_s=8.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            dispatcher.close()
            assert not dispatcher.submit(update("late"))
        assert sample(metrics, "status_update_dropped_total") == 1
