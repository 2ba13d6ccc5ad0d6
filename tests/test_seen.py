"""Last-seen on its way to the state table: the buffer and its flusher, on the
virtual clock with a `FakeStore` (exact times; a hang guard per test)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from notip_trio.errors import DatabaseError
from notip_trio.ingest import run_seen_flusher
from notip_trio.livestate import SeenBuffer, flush_seen
from notip_trio.metrics import Metrics
from tests.liveness_fakes import FakeStore, sample, wall_at

GUARD_S = 600
A, B = ("t1", "a"), ("t1", "b")


def test_the_buffer_keeps_the_newest_time_per_gateway() -> None:
    buffer = SeenBuffer()
    buffer.add({A: wall_at(5), B: wall_at(1)})
    buffer.add({A: wall_at(3), B: wall_at(2)})  # an older redelivery of A: ignored
    assert len(buffer) == 2
    assert buffer.take() == {A: wall_at(5), B: wall_at(2)}
    assert buffer.take() == {}


async def test_a_failed_flush_puts_the_times_back_and_newer_ones_win() -> None:
    store, buffer = FakeStore(), SeenBuffer()
    buffer.add({A: wall_at(5)})
    store.down = True
    with pytest.raises(DatabaseError):
        await flush_seen(buffer, store)
    buffer.add({A: wall_at(7), B: wall_at(1)})
    store.down = False
    assert await flush_seen(buffer, store) == 2
    assert {k: r["last_seen"] for k, r in store.rows.items()} == {A: wall_at(7), B: wall_at(1)}
    assert await flush_seen(buffer, store) == 0  # nothing left: no round trip
    assert store.calls["record_seen"] == 2


async def test_the_flusher_writes_once_a_second_and_rides_out_an_outage(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        store, buffer, metrics = FakeStore(), SeenBuffer(), Metrics()
        async with trio.open_nursery() as nursery:
            await nursery.start(run_seen_flusher, buffer, store, metrics)
            buffer.add({A: wall_at(0.2)})
            await trio.sleep(0.5)
            assert store.rows == {}  # not before the second is up
            await trio.sleep(0.6)
            assert store.rows[A]["last_seen"] == wall_at(0.2)  # written at 1 s
            store.down = True
            buffer.add({A: wall_at(1.5), B: wall_at(1.6)})
            await trio.sleep(3)  # fails at 2, 3 and 4 s
            assert sample(metrics, "last_seen_flush_errors_total") == 3
            assert len(buffer) == 2  # kept
            store.down = False
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        assert trio.current_time() == 1.1 + 3 + 1
        assert store.rows[A]["last_seen"] == wall_at(1.5)
        assert store.rows[B]["last_seen"] == wall_at(1.6)
        assert store.calls["record_seen"] == 5  # at 1, 2, 3, 4 and 5 s
