"""The database round-trip deadline (`db.pool.bounded`), on `autojump_clock` with fakes.

A fake "connection" is a worker thread blocked on a `threading.Event`; cutting
it (what shutting the socket down does to libpq) sets the event and makes the
blocked call fail. An autojump clock jumps whenever Trio is idle, even while a
thread is still on its way to its wait, so the clock here jumps only after
50 ms of real idleness (`autojump_clock` below): then the thread is blocked,
the clock goes straight to the next deadline, and every time is exact.
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


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """Autojump once Trio has been idle for 50 ms of real time (pytest-trio's
    jumps at once): enough for a fake's thread to reach its next wait, so the
    clock only ever jumps while the thread is blocked, and times stay exact."""
    return trio.testing.MockClock(autojump_threshold=0.05)


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
    autojump_clock: trio.abc.Clock,
) -> None:
    conn = FakeConnection()
    with trio.fail_after(GUARD_S):
        error = await _outcome(bounded(conn.blocking_call, 15.0))
        assert trio.current_time() == 15.0  # exactly at the deadline
    assert isinstance(error, DeadlineExceeded)
    assert str(error) == "no answer within 15 s; connection abandoned"
    assert error.connections_cut == 1
    assert isinstance(error, DatabaseError)  # ingest naks on DatabaseError
    assert (conn.cut_count, conn.released) == (1, 1)


async def test_a_thread_that_ignores_the_cut_is_left_behind_after_the_grace(
    autojump_clock: trio.abc.Clock,
) -> None:
    conn = FakeConnection(obeys_cut=False)
    try:
        with trio.fail_after(GUARD_S):
            error = await _outcome(bounded(conn.blocking_call, 5.0))
            assert isinstance(error, DeadlineExceeded)
            assert trio.current_time() == 5.0 + CUT_GRACE_S
        assert conn.cut_count == 1
    finally:
        conn.wake.set()  # let the thread end


async def test_a_cancelled_caller_cuts_at_once(autojump_clock: trio.abc.Clock) -> None:
    conn = FakeConnection()
    with trio.fail_after(GUARD_S):
        with trio.move_on_after(2.0) as scope:
            await bounded(conn.blocking_call, 15.0)
        assert scope.cancelled_caught
        assert trio.current_time() == 2.0
    assert conn.cut_count == 1


async def test_a_connection_asked_for_after_the_cut_is_refused(
    autojump_clock: trio.abc.Clock,
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
        error = await _outcome(bounded(two_connections, 3.0))
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
