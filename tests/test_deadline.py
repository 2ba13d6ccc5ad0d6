"""The database round-trip deadline (`db.pool.bounded`), on `autojump_clock` with fakes.

A fake "connection" is a worker thread blocked on a `threading.Event`; cutting
it (what shutting the socket down does to libpq) sets the event and makes the
blocked call fail. An autojump clock would jump whenever Trio is idle, even
while the thread is still on its way to its connection, so these tests use
pytest-trio's `mock_clock` (it never moves by itself): `_jump_once_held` waits
until the thread holds its connection (its `held` event), then jumps the clock
to each deadline in turn, once Trio has settled. The clock then stands still
while the thread finishes, so every time is exact however slow the machine.
Real sockets: tests/test_faults.py.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from notip_trio.db.pool import CUT_GRACE_S, RoundTrip, bounded, current_round_trip
from notip_trio.errors import DatabaseError, DeadlineExceeded

GUARD_S = 3600
HELD_WITHIN_S = 30  # real time: a hang guard only


class FakeConnection:
    """A call that blocks until the connection is cut (or released by the test)."""

    def __init__(self, *, obeys_cut: bool = True) -> None:
        self.obeys_cut = obeys_cut
        self.wake = threading.Event()
        self.cut_count = 0
        self.released = 0
        self.held = threading.Event()

    def _cut(self) -> None:
        self.cut_count += 1
        if self.obeys_cut:
            self.wake.set()

    def _release(self) -> None:
        self.released += 1

    def blocking_call(self) -> str:
        trip = current_round_trip()
        assert trip is not None
        trip.hold(self, self._cut, self._release)
        self.held.set()
        self.wake.wait(timeout=60)  # a safety net for the test process only
        trip.let_go(self)
        raise OSError("server closed the connection unexpectedly")


async def _jump_once_held(
    clock: trio.testing.MockClock, conn: FakeConnection, call: Awaitable[Any], *jumps: float
) -> Any:
    """Run `call`; once `conn`'s thread holds its connection, jump the clock by
    each of `jumps` in turn (each after every task is blocked again). Returns
    what `call` returned or raised."""
    outcome: list[Any] = []

    async def run() -> None:
        outcome.append(await _outcome(call))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        held = await trio.to_thread.run_sync(conn.held.wait, HELD_WITHIN_S)
        assert held, f"the fake's thread did not hold its connection within {HELD_WITHIN_S} s"
        for seconds in jumps:
            await trio.testing.wait_all_tasks_blocked()
            clock.jump(seconds)
    return outcome[0]


async def test_a_quick_call_returns_its_value_and_cuts_nothing() -> None:
    conn = FakeConnection()

    def quick() -> int:
        trip = current_round_trip()
        assert trip is not None
        trip.hold(conn, conn._cut, conn._release)
        trip.let_go(conn)
        return 42

    with trio.fail_after(30):
        assert await bounded(quick, 10.0) == 42
    assert (conn.cut_count, conn.released) == (0, 1)
    assert current_round_trip() is None


async def test_errors_before_the_deadline_pass_through() -> None:
    def failing() -> None:
        raise ValueError("refused")

    with trio.fail_after(30), pytest.raises(ValueError, match="refused"):
        await bounded(failing, 10.0)


async def test_the_deadline_cuts_the_connection_and_the_thread_returns(
    mock_clock: trio.testing.MockClock,
) -> None:
    conn = FakeConnection()
    with trio.fail_after(GUARD_S):
        error = await _jump_once_held(mock_clock, conn, bounded(conn.blocking_call, 15.0), 15.0)
        assert trio.current_time() == 15.0  # exactly at the deadline
    assert isinstance(error, DeadlineExceeded)
    assert str(error) == "no answer within 15 s; connection abandoned"
    assert error.connections_cut == 1
    assert isinstance(error, DatabaseError)  # ingest naks on DatabaseError
    assert (conn.cut_count, conn.released) == (1, 1)


async def test_a_thread_that_ignores_the_cut_is_left_behind_after_the_grace(
    mock_clock: trio.testing.MockClock,
) -> None:
    conn = FakeConnection(obeys_cut=False)
    try:
        with trio.fail_after(GUARD_S):
            error = await _jump_once_held(
                mock_clock, conn, bounded(conn.blocking_call, 5.0), 5.0, CUT_GRACE_S
            )
            assert isinstance(error, DeadlineExceeded)
            assert trio.current_time() == 5.0 + CUT_GRACE_S
        assert conn.cut_count == 1
    finally:
        conn.wake.set()  # let the thread end


async def test_a_cancelled_caller_cuts_at_once(mock_clock: trio.testing.MockClock) -> None:
    conn = FakeConnection()

    async def caller() -> bool:
        with trio.move_on_after(2.0) as scope:
            await bounded(conn.blocking_call, 15.0)
        return scope.cancelled_caught

    with trio.fail_after(GUARD_S):
        assert await _jump_once_held(mock_clock, conn, caller(), 2.0) is True
        assert trio.current_time() == 2.0
    assert conn.cut_count == 1


async def test_a_connection_asked_for_after_the_cut_is_refused(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A thread that was waiting for the pool when its deadline passed must not
    go on to use a connection nobody will cut."""
    first = FakeConnection()
    late = FakeConnection()
    refused: list[str] = []

    def two_connections() -> None:
        with contextlib.suppress(OSError):
            first.blocking_call()
        trip = current_round_trip()
        assert trip is not None
        try:
            trip.hold(late, late._cut, late._release)
        except BaseException as exc:  # the pool hands the connection back on it
            refused.append(type(exc).__name__)
            raise

    with trio.fail_after(GUARD_S):
        error = await _jump_once_held(mock_clock, first, bounded(two_connections, 3.0), 3.0)
        assert trio.current_time() == 3.0  # the thread returned at once after the cut
    assert isinstance(error, DeadlineExceeded)
    assert refused == ["_Cut"]
    assert late.released == 1  # released at once, never cut or used
    assert late.cut_count == 0


async def _outcome(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except Exception as exc:
        return exc


def test_round_trip_bookkeeping() -> None:
    trip = RoundTrip()
    calls: list[str] = []

    def make(name: str) -> tuple[Callable[[], None], Callable[[], None]]:
        return (lambda: calls.append(f"cut {name}")), (lambda: calls.append(f"release {name}"))

    a, b = object(), object()
    trip.hold(a, *make("a"))
    trip.hold(b, *make("b"))
    trip.hold(b, *make("b again"))  # held already: the new handle is released at once
    trip.let_go(a)
    trip.let_go(a)  # twice: no-op
    assert trip.cut() == 1
    assert calls == ["release b again", "release a", "cut b", "release b"]
    assert trip.cut() == 0
