"""Leadership on the virtual clock: who ticks, when it stops, takeovers.

Rules for this file: `autojump_clock`, a `FakeLock` standing for the advisory
lock and its connection; every test has a hang guard.
"""

from __future__ import annotations

import functools
import logging

import pytest
import trio
import trio.testing

from notip_trio.leader import CHECK_DEADLINE_S, LockNotHeld, run_leadership
from notip_trio.metrics import Metrics
from tests.liveness_fakes import sample

GUARD_S = 3600


class FakeLock:
    """Free while `holder` is None; `broken` fails checks; `hang` makes them never answer."""

    def __init__(self) -> None:
        self.holder: str | None = None
        self.broken = False
        self.hang = False
        self.released: list[float] = []

    def for_replica(self, name: str) -> ReplicaLock:
        return ReplicaLock(self, name)


class ReplicaLock:
    def __init__(self, shared: FakeLock, name: str) -> None:
        self.shared, self.name = shared, name

    async def try_acquire(self) -> bool:
        if self.shared.broken:
            return False  # no connection, no lock
        if self.shared.holder in (None, self.name):
            self.shared.holder = self.name
            return True
        return False

    async def check(self) -> None:
        if self.shared.hang:
            await trio.sleep_forever()
        if self.shared.broken:
            raise ConnectionError("server closed the connection unexpectedly")
        if self.shared.holder != self.name:  # what pg_locks says of this session
            raise LockNotHeld(f"held by {self.shared.holder}, not {self.name}")

    async def release(self) -> None:
        if self.shared.holder == self.name:
            self.shared.holder = None
        self.shared.released.append(trio.current_time())


class Work:
    """Leader work that records when it ran and when it was stopped."""

    def __init__(self) -> None:
        self.started: list[float] = []
        self.stopped: list[float] = []

    async def __call__(self) -> None:
        self.started.append(trio.current_time())
        try:
            await trio.sleep_forever()
        finally:
            self.stopped.append(trio.current_time())


def _leadership(lock: ReplicaLock, work: Work, metrics: Metrics):  # type: ignore[no-untyped-def]
    return functools.partial(run_leadership, lock, work, metrics, retry_s=1.0, check_s=1.0)


async def _replica(
    lock: ReplicaLock,
    work: Work,
    metrics: Metrics,
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One replica's leadership task; started() hands out the scope that kills it."""
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await _leadership(lock, work, metrics)()


async def test_one_leader_and_a_takeover_when_it_dies(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        shared = FakeLock()
        work_a, work_b = Work(), Work()
        metrics_a, metrics_b = Metrics(), Metrics()
        async with trio.open_nursery() as nursery:
            replica_a = await nursery.start(_replica, shared.for_replica("a"), work_a, metrics_a)
            await nursery.start(_replica, shared.for_replica("b"), work_b, metrics_b)
            await trio.sleep(10)
            assert (work_a.started, work_b.started) == ([0], [])  # only a leads
            assert sample(metrics_a, "liveness_leader") == 1
            assert sample(metrics_b, "liveness_leader") == 0
            replica_a.cancel()  # a dies at 10; its session (and lock) go with it
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
        assert work_a.stopped == [10]
        assert work_b.started == [11]  # b's next try, within retry_s
        assert sample(metrics_b, "liveness_takeovers_total") == 1


async def test_a_leader_whose_lock_connection_fails_stops_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        shared = FakeLock()
        work, metrics = Work(), Metrics()
        async with trio.open_nursery() as nursery:
            await nursery.start(_leadership(shared.for_replica("a"), work, metrics))
            await trio.sleep(5.5)
            shared.broken = True  # the connection dies at 5.5
            await trio.sleep(0.6)
            assert work.stopped == [6]  # the check at 6 ends the work
            assert sample(metrics, "liveness_leader") == 0
            assert shared.released == [6]
            shared.broken = False
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
        assert work.started == [0, 7]  # leads again after its next try
        assert sample(metrics, "liveness_takeovers_total") == 2


async def test_a_check_that_never_answers_counts_as_lost(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        shared = FakeLock()
        work, metrics = Work(), Metrics()
        async with trio.open_nursery() as nursery:
            await nursery.start(_leadership(shared.for_replica("a"), work, metrics))
            await trio.sleep(2.5)
            shared.hang = True  # a frozen connection: no error, no answer
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
        assert work.stopped[0] == 3 + CHECK_DEADLINE_S


async def test_leader_work_errors_travel_up(autojump_clock: trio.abc.Clock) -> None:
    async def broken() -> None:
        await trio.sleep(2)
        raise ValueError("a bug in the leader's work")

    with trio.fail_after(GUARD_S), pytest.RaisesGroup(ValueError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    run_leadership,
                    FakeLock().for_replica("a"),
                    broken,
                    Metrics(),
                    retry_s=1.0,
                    check_s=1.0,
                )
            )


async def test_a_try_that_never_answers_is_abandoned_with_its_connection(
    autojump_clock: trio.abc.Clock,
) -> None:
    class HangingOnce(ReplicaLock):
        calls = 0

        async def try_acquire(self) -> bool:
            HangingOnce.calls += 1
            if HangingOnce.calls == 1:
                await trio.sleep_forever()  # a frozen connection
            return await super().try_acquire()

    with trio.fail_after(GUARD_S):
        shared = FakeLock()
        work, metrics = Work(), Metrics()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _leadership(HangingOnce(shared, "a"), work, metrics)  # type: ignore[arg-type]
            )
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
        # Given up after the deadline, the connection dropped, tried again 1 s later.
        assert shared.released[0] == CHECK_DEADLINE_S
        assert work.started == [CHECK_DEADLINE_S + 1]


def _lost_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        str(getattr(r, "notip_ctx", {}).get("reason"))
        for r in caplog.records
        if r.getMessage() == "liveness_leadership_lost"
    ]


async def test_a_leader_whose_session_no_longer_holds_the_lock_stops(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A pooler hands the session that holds the lock to b: a's next check sees
    it is not the holder and stops, so the two never lead side by side."""
    caplog.set_level(logging.INFO)
    with trio.fail_after(GUARD_S):
        shared = FakeLock()
        work_a, work_b = Work(), Work()
        metrics_a, metrics_b = Metrics(), Metrics()
        async with trio.open_nursery() as nursery:
            await nursery.start(_replica, shared.for_replica("a"), work_a, metrics_a)
            await nursery.start(_replica, shared.for_replica("b"), work_b, metrics_b)
            await trio.sleep(5.5)
            assert (work_a.started, work_b.started) == ([0], [])
            shared.holder = "b"  # b's next try (at 6) finds the lock its own
            await trio.sleep(10)
            assert sample(metrics_a, "liveness_leader") == 0
            assert sample(metrics_b, "liveness_leader") == 1
            nursery.cancel_scope.cancel()
        assert work_a.stopped == [6]  # a's check at 6 ends its work
        assert work_b.started == [6]
        assert work_a.started == [0]  # a follows from then on: b holds the lock
        assert _lost_reasons(caplog) == ["LockNotHeld: held by b, not a"]


async def test_a_lock_gone_from_the_session_ends_leadership_until_taken_again(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(GUARD_S):
        shared = FakeLock()
        work, metrics = Work(), Metrics()
        async with trio.open_nursery() as nursery:
            await nursery.start(_leadership(shared.for_replica("a"), work, metrics))
            await trio.sleep(3.5)
            shared.holder = None  # the session answers, but no longer holds the lock
            await trio.sleep(3)
            nursery.cancel_scope.cancel()
        # The check at 4 stops the work and lets the connection go; the next
        # try takes the lock again on a fresh session at once.
        assert work.stopped == [4, 6.5]
        assert work.started == [0, 4]
        assert shared.released[0] == 4
        assert sample(metrics, "liveness_takeovers_total") == 2
        assert _lost_reasons(caplog) == ["LockNotHeld: held by None, not a"]
