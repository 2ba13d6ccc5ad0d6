"""Last-seen on its way to the state table, and the acks that wait for it: the
buffer and its flusher, on the virtual clock with a `FakeStore` (exact times; a
hang guard per test)."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping, Sequence

import pytest
import trio
import trio.testing

from notip_trio.errors import DatabaseError
from notip_trio.ingest import SeenBuffer, flush_seen, run_seen_flusher
from notip_trio.js.delivery import JsMsg
from notip_trio.lanes import Key
from notip_trio.metrics import Metrics
from tests.liveness_fakes import FakeStore, sample, wall_at

GUARD_S = 600
A, B = ("t1", "a"), ("t1", "b")


def msg(seq: int) -> JsMsg:
    return JsMsg("telemetry.data.t1.a", b"{}", f"$JS.ACK.TELEMETRY.d.1.{seq}.{seq}.0.0")


class Acks:
    """`Acker` recording (virtual time, stream sequences) per ack call."""

    def __init__(self) -> None:
        self.acked: list[tuple[float, list[int]]] = []

    async def ack(self, msgs: Sequence[JsMsg]) -> None:
        self.acked.append((trio.current_time(), [m.delivery.stream_seq for m in msgs]))  # type: ignore[union-attr]

    async def nak(self, msgs: Sequence[JsMsg], delay_s: float | None = None) -> None:
        raise AssertionError("the flusher never naks")

    async def term(self, msgs: Sequence[JsMsg]) -> None:
        raise AssertionError("the flusher never terminates")


def test_the_buffer_keeps_the_newest_time_per_gateway_and_every_message() -> None:
    buffer = SeenBuffer()
    buffer.add({A: wall_at(5), B: wall_at(1)}, [msg(1)])
    buffer.add({A: wall_at(3), B: wall_at(2)}, [msg(2)])  # an older redelivery of A: ignored
    assert (len(buffer), buffer.messages) == (2, 2)
    assert buffer.take() == ({A: wall_at(5), B: wall_at(2)}, [msg(1), msg(2)])
    assert buffer.take() == ({}, [])


async def test_a_failed_flush_acks_nothing_and_puts_it_all_back() -> None:
    store, buffer, acks = FakeStore(), SeenBuffer(), Acks()
    buffer.add({A: wall_at(5)}, [msg(1)])
    store.down = True
    with pytest.raises(DatabaseError):
        await flush_seen(buffer, store, acks)
    assert acks.acked == []
    buffer.add({A: wall_at(7), B: wall_at(1)}, [msg(2)])
    store.down = False
    assert await flush_seen(buffer, store, acks) == 2
    assert {k: r["last_seen"] for k, r in store.rows.items()} == {A: wall_at(7), B: wall_at(1)}
    assert [seqs for _, seqs in acks.acked] == [[1, 2]]
    assert await flush_seen(buffer, store, acks) == 0  # nothing left: no round trip
    assert store.calls["record_seen"] == 2
    assert len(acks.acked) == 1


class FailingAt(FakeStore):
    """Fails the `fail_at`-th record_seen call (1-based) once; records each call's keys."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.written: list[list[Key]] = []

    async def record_seen(self, seen: Mapping[Key, dt.datetime]) -> None:
        if len(self.written) + 1 == self.fail_at:
            self.fail_at = 0
            self.written.append([])
            raise DatabaseError("OperationalError: server closed the connection (fake)")
        self.written.append(list(seen))
        await super().record_seen(seen)


async def test_a_flush_in_chunks_acks_only_when_every_chunk_committed() -> None:
    """Ten gateways, three per transaction, the third transaction fails: the two
    chunks before it stay written, nothing is acked, the rest is put back and
    written (not the first six again) by the next flush, which acks everything."""
    keys = [("t1", f"gw-{i}") for i in range(10)]
    store, buffer, acks = FailingAt(3), SeenBuffer(), Acks()
    buffer.add({key: wall_at(i) for i, key in enumerate(keys)}, [msg(1), msg(2)])
    with pytest.raises(DatabaseError):
        await flush_seen(buffer, store, acks, chunk=3)
    assert store.written == [keys[0:3], keys[3:6], []]
    assert acks.acked == []
    assert sorted(store.rows) == keys[0:6]
    assert (len(buffer), buffer.messages) == (4, 2)
    buffer.add({keys[0]: wall_at(20), keys[9]: wall_at(1)}, [msg(3)])  # newer, older
    assert await flush_seen(buffer, store, acks, chunk=3) == 5
    assert store.written[3:] == [[keys[0], keys[6], keys[7]], [keys[8], keys[9]]]
    assert [seqs for _, seqs in acks.acked] == [[1, 2, 3]]
    assert {k: r["last_seen"] for k, r in store.rows.items()} == {
        **{key: wall_at(i) for i, key in enumerate(keys)},
        keys[0]: wall_at(20),
    }


async def test_the_flusher_writes_at_most_every_200_ms_and_rides_out_an_outage(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        store, buffer, acks, metrics = FakeStore(), SeenBuffer(), Acks(), Metrics()
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(run_seen_flusher, interval_s=0.2), buffer, store, acks, metrics
            )
            await trio.sleep(1)
            assert "record_seen" not in store.calls  # nothing to write: no round trip
            buffer.add({A: wall_at(1)}, [msg(1)])
            await trio.testing.wait_all_tasks_blocked()
            assert acks.acked == [(1, [1])]  # at once: the last write was long ago
            buffer.add({A: wall_at(1.05)}, [msg(2)])
            buffer.add({B: wall_at(1.1)}, [msg(3)])
            await trio.sleep(0.5)
            assert acks.acked == [(1, [1]), (pytest.approx(1.2), [2, 3])]  # one write
            store.down = True
            buffer.add({A: wall_at(2)}, [msg(4)])
            await trio.sleep(1)  # tries at 1.5, 1.7, 1.9, 2.1, 2.3 fail
            assert sample(metrics, "last_seen_flush_errors_total") == 5
            assert (len(buffer), buffer.messages) == (1, 1)  # kept, not acked
            store.down = False
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        assert acks.acked[-1] == (pytest.approx(2.5), [4])  # the first try after 2.4
        assert store.rows[A]["last_seen"] == wall_at(2)
        assert store.rows[B]["last_seen"] == wall_at(1.1)
        assert store.calls["record_seen"] == 8
