"""The takeover in chunks and the janitor on the leader, on the virtual clock with
a `FakeStore` (exact counts and times; a hang guard per test). The SQL of both
is held to a real PostgreSQL in test_livestate_chunks.py."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from notip_trio.errors import DatabaseError
from notip_trio.janitor import run_janitor
from notip_trio.lanes import Key
from notip_trio.livestate import LoadChunk, LoadPosition
from tests.liveness_fakes import FakeStore, sample, wall_at
from tests.test_liveness import Rig

GUARD_S = 3 * 3600
KEYS: list[Key] = [("t1", f"gw-{i:02d}") for i in range(10)]


class FailingChunk(FakeStore):
    """Fails the `fail_at`-th load_chunk call (1-based) once."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.chunks = 0

    async def load_chunk(self, after: LoadPosition | None) -> LoadChunk:
        self.chunks += 1
        if self.chunks == self.fail_at:
            raise DatabaseError("OperationalError: the database is down (fake)")
        return await super().load_chunk(after)


def _fill(store: FakeStore) -> None:
    """KEYS[0:6] online, KEYS[6:8] offline (not heard since), KEYS[8:] new."""
    for i, key in enumerate(KEYS):
        store.record(key, wall_at(i))
    for key in KEYS[:8]:
        store.rows[key].update(status="online", status_last_seen=wall_at(0))
    for key in KEYS[6:8]:
        store.rows[key].update(status="offline", status_last_seen=store.rows[key]["last_seen"])


async def test_a_takeover_reads_the_state_in_chunks(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        store = FakeStore()
        store.load_chunk_size = 3
        _fill(store)
        rig = Rig(store=store)
        await rig.tracker.take_over()
        assert store.calls["load_chunk"] == 4  # 3 + 3 + 3 + 1
        assert len(rig.tracker) == 10
        assert [rig.tracker.status(*key) for key in KEYS] == ["online"] * 6 + ["offline"] * 2 + [
            "online"
        ] * 2
        assert store.calls["mark_online"] == 1  # the two new ones, together


async def test_a_takeover_that_fails_midway_tracks_nothing_and_is_tried_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        store = FailingChunk(fail_at=3)
        store.load_chunk_size = 3
        _fill(store)
        rig = Rig(store=store)
        with pytest.raises(DatabaseError):  # itself, not inside an ExceptionGroup
            await rig.tracker.take_over()
        assert len(rig.tracker) == 0
        assert "mark_online" not in store.calls
        await rig.tracker.take_over()
        assert len(rig.tracker) == 10
        assert store.chunks == 3 + 4


async def test_the_janitor_purges_on_the_leader_and_the_tracker_forgets(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Run at 60 s, then every hour: the purged offline gateway is forgotten; when
    it sends again it is first seen (reported online, as a new gateway)."""
    with trio.fail_after(GUARD_S):
        store = FakeStore()
        _fill(store)
        rig = Rig(store=store)
        await rig.tracker.take_over()
        store.retired = {KEYS[6]}
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_janitor(
                    store,
                    rig.metrics,
                    liveness_retention_s=86400,
                    rejected_retention_s=86400,
                    forget=rig.tracker.forget_retired,
                    task_status=task_status,
                )
            )
            await trio.sleep_until(59)
            assert rig.tracker.status(*KEYS[6]) == "offline"
            await trio.sleep_until(61)
            assert rig.tracker.status(*KEYS[6]) is None
            assert rig.tracker.status(*KEYS[7]) == "offline"
            assert len(rig.tracker) == 9
            assert sample(rig.metrics, "purged_rows_total", table="gateway_liveness") == 1
            assert (store.calls["purge_retired"], store.calls["purge_rejected"]) == (1, 1)
            # An outage during the next run: counted, and the one after starts over.
            store.down = True
            await trio.sleep_until(60 + 3600 + 1)
            assert sample(rig.metrics, "janitor_errors_total") == 1
            store.down = False
            store.retired = {KEYS[7]}
            await trio.sleep_until(60 + 2 * 3600 + 1)
            assert rig.tracker.status(*KEYS[7]) is None
            assert sample(rig.metrics, "purged_rows_total", table="gateway_liveness") == 2
            nursery.cancel_scope.cancel()
        # The purged gateway sends again: a new row, reported online.
        store.record(KEYS[6], wall_at(10_000))
        await rig.tracker.tick()
        assert rig.tracker.status(*KEYS[6]) == "online"
        assert ("gw-06", "online", wall_at(10_000)) in rig.sink.brief()
