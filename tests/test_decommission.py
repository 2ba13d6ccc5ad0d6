"""Decommission listener: subject-authoritative removal, ack after removal, term of bad subjects.

Rules for this file: `autojump_clock`, a `FakeBatchSource` and a `FakeStore`
(the liveness state table) that also records the order of removals; every
test has a hang guard.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from notip_trio.decommission import run_decommission
from notip_trio.metrics import Metrics
from tests.liveness_fakes import WALL0, FakeBatchSource, FakeStore, sample

GUARD_S = 60


class RecordingTracker(FakeStore):
    """The state table, recording each removal in order (with what was acked by then)."""

    def __init__(self, tracked: set[tuple[str, str]], source: FakeBatchSource) -> None:
        super().__init__()
        for key in tracked:
            self.record(key, WALL0)
        self.source = source
        self.removed: list[tuple[str, str]] = []
        self.acked_before: list[int] = []  # len(source.acked) at each removal

    async def decommission(self, key: tuple[str, str], at: Any = None) -> bool:
        self.removed.append(key)
        self.acked_before.append(len(self.source.acked))
        return await super().decommission(key, at)


async def test_removes_and_acks(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        source = FakeBatchSource()
        tracker = RecordingTracker({("t1", "gw1")}, source)
        metrics = Metrics()
        async with trio.open_nursery() as nursery:
            await nursery.start(run_decommission, source.batches, source, tracker, metrics)
            subjects = ["gateway.decommissioned.t1.gw1", "gateway.decommissioned.t2.gw7"]
            await source.send(subjects)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        # Untracked gateways are acked too: removal is idempotent.
        assert tracker.removed == [("t1", "gw1"), ("t2", "gw7")]
        assert tracker.acked_before == [0, 0]  # acked only after every removal
        assert tracker.status(("t1", "gw1")) == "decommissioned"
        assert source.acked == subjects
        assert source.termed == []
        assert sample(metrics, "gateways_decommissioned_total") == 2


async def test_malformed_subject_is_terminated_and_counted(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        source = FakeBatchSource()
        tracker = RecordingTracker(set(), source)
        metrics = Metrics()
        async with trio.open_nursery() as nursery:
            await nursery.start(run_decommission, source.batches, source, tracker, metrics)
            await source.send(
                [
                    "gateway.decommissioned.t1",
                    "gateway.decommissioned.t1.gw1",
                    "gateway.decommissioned.t1.gw1.x",
                ]
            )
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert tracker.removed == [("t1", "gw1")]
        assert source.acked == ["gateway.decommissioned.t1.gw1"]
        assert source.termed == ["gateway.decommissioned.t1", "gateway.decommissioned.t1.gw1.x"]
        assert source.naked == []
        assert sample(metrics, "decommission_rejected_total") == 2


async def test_batches_are_handled_in_turn(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        source = FakeBatchSource()
        tracker = RecordingTracker(set(), source)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_decommission, source.batches, source, tracker, Metrics())
            for i in range(3):
                await source.send([f"gateway.decommissioned.t1.gw{i}"])
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert [gw for _, gw in tracker.removed] == ["gw0", "gw1", "gw2"]
        assert source.acked == [f"gateway.decommissioned.t1.gw{i}" for i in range(3)]


async def test_database_down_naks_the_rest_of_the_batch_with_a_delay(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        source = FakeBatchSource()
        tracker = RecordingTracker({("t1", "gw0")}, source)
        tracker.down = True
        async with trio.open_nursery() as nursery:
            await nursery.start(run_decommission, source.batches, source, tracker, Metrics())
            await source.send(["gateway.decommissioned.t1.gw0", "gateway.decommissioned.t1.gw1"])
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert source.acked == []
        assert source.naked == ["gateway.decommissioned.t1.gw0", "gateway.decommissioned.t1.gw1"]
        assert tracker.status(("t1", "gw0")) == "new"  # still tracked: it comes back


async def test_a_message_is_acked_only_after_its_gateway_was_removed(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        source = FakeBatchSource()
        tracker = RecordingTracker({("t1", "gw1"), ("t1", "gw2")}, source)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_decommission, source.batches, source, tracker, Metrics())
            await source.send(["gateway.decommissioned.t1.gw1", "gateway.decommissioned.t1.gw2"])
            await trio.testing.wait_all_tasks_blocked()
            await source.send(["gateway.decommissioned.t1.gw3"])
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    # Each batch is acked after all its removals: none had been acked during the
    # first batch's, both before the second's.
    assert tracker.removed == [("t1", "gw1"), ("t1", "gw2"), ("t1", "gw3")]
    assert tracker.acked_before == [0, 0, 2]
    assert source.acked == [
        "gateway.decommissioned.t1.gw1",
        "gateway.decommissioned.t1.gw2",
        "gateway.decommissioned.t1.gw3",
    ]
