"""Decommission listener: subject-authoritative removal, ack after removal, term of bad subjects.

Rules for this file: `autojump_clock`, a `FakeBatchSource` and a recording
tracker (or the real `LivenessTracker` on fakes); every test has a hang guard.
"""

from __future__ import annotations

import trio
import trio.testing

from notip_trio.decommission import run_decommission
from notip_trio.metrics import Metrics
from tests.liveness_fakes import FakeBatchSource, sample

GUARD_S = 60


class RecordingTracker:
    """Records removals; with `source`, also how many acks had been sent at each."""

    def __init__(
        self, tracked: set[tuple[str, str]], source: FakeBatchSource | None = None
    ) -> None:
        self.tracked = tracked
        self.source = source
        self.removed: list[tuple[str, str]] = []
        self.acked_before: list[int] = []  # len(source.acked) at each removal

    def remove(self, tenant_id: str, gateway_id: str) -> bool:
        self.removed.append((tenant_id, gateway_id))
        if self.source is not None:
            self.acked_before.append(len(self.source.acked))
        key = (tenant_id, gateway_id)
        if key in self.tracked:
            self.tracked.discard(key)
            return True
        return False


async def test_removes_and_acks(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        source = FakeBatchSource()
        tracker = RecordingTracker({("t1", "gw1")})
        metrics = Metrics()
        async with trio.open_nursery() as nursery:
            await nursery.start(run_decommission, source.batches, source, tracker, metrics)
            subjects = ["gateway.decommissioned.t1.gw1", "gateway.decommissioned.t2.gw7"]
            await source.send(subjects)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        # Untracked gateways are acked too: removal is idempotent.
        assert tracker.removed == [("t1", "gw1"), ("t2", "gw7")]
        assert source.acked == subjects
        assert source.termed == []
        assert sample(metrics, "gateways_decommissioned_total") == 2


async def test_malformed_subject_is_terminated_and_counted(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        source = FakeBatchSource()
        tracker = RecordingTracker(set())
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
        tracker = RecordingTracker(set())
        async with trio.open_nursery() as nursery:
            await nursery.start(run_decommission, source.batches, source, tracker, Metrics())
            for i in range(3):
                await source.send([f"gateway.decommissioned.t1.gw{i}"])
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert [gw for _, gw in tracker.removed] == ["gw0", "gw1", "gw2"]
        assert source.acked == [f"gateway.decommissioned.t1.gw{i}" for i in range(3)]


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
