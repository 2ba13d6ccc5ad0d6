"""The deadline-bounded round trip, the pool, and `Database` on top of them.

psycopg 3's *sync* connections run in worker threads (`trio.to_thread`): measured
faster than its asyncio connection through trio-asyncio (README: Storage), and it
keeps the database off the asyncio bridge.

Every round trip has a deadline (`bounded`). A thread cannot be interrupted and a
server that stopped answering never sends the error `statement_timeout` would
make, so when the deadline passes (or the caller is cancelled) the round trip
is cut loose: the socket of every connection it holds is shut down under the
blocked call, libpq fails at once, the worker thread returns, the pool discards
the broken connection, and the idle ones (likely behind the same dead path) are
replaced too. Statements that take connections from `Database._pool` inside
`Database._run` get this without doing anything (`_Pool` and `_check` register them).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Final, Self, TypeVar

import psycopg
import psycopg_pool
import trio
from psycopg_pool.base import AttemptWithBackoff

from ..config import DEFAULTS, Settings
from ..errors import DatabaseError, DeadlineExceeded
from ..log import get_logger

log = get_logger(__name__)
T = TypeVar("T")

Conn = psycopg.Connection[tuple[object, ...]]

# After cutting a round trip loose, wait this long for its thread to return
# before leaving it behind (it then still returns its connection when it ends).
CUT_GRACE_S: Final = 5.0
WRITE_TIMEOUT_S: Final = int(DEFAULTS["DB_WRITE_TIMEOUT_MS"]) / 1000
MIGRATE_TIMEOUT_S: Final = int(DEFAULTS["DB_MIGRATE_TIMEOUT_MS"]) / 1000


class _Cut(BaseException):
    """Raised in a worker thread that asks for a connection after its round trip
    was cut. A BaseException so the pool gives the connection back and stops
    retrying (it retries checks that fail with an Exception)."""


class RoundTrip:
    """What one round trip holds, so that its deadline can cut it loose. Thread-safe.

    The worker thread `hold`s each connection it uses (with a way to cut it and
    a way to let it go); `cut` runs every cutter once and makes later `hold`s
    raise. Pure bookkeeping: `_run` owns the timing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, tuple[Callable[[], None], Callable[[], None]]] = {}
        self.cut_done = False

    def hold(self, key: object, cut: Callable[[], None], release: Callable[[], None]) -> None:
        """Hold `key` until `let_go` (a second hold of it keeps the first).

        Raises `_Cut` (after `release()`) once the round trip has been cut."""
        with self._lock:
            fresh = not self.cut_done and id(key) not in self._held
            if fresh:
                self._held[id(key)] = (cut, release)
            refused = self.cut_done
        if not fresh:
            release()
        if refused:
            raise _Cut

    def let_go(self, key: object) -> None:
        with self._lock:
            entry = self._held.pop(id(key), None)
        if entry is not None:
            entry[1]()

    def cut(self) -> int:
        """Cut every held connection; returns how many."""
        with self._lock:
            self.cut_done = True
            held, self._held = list(self._held.values()), {}
        for cut, release in held:
            try:
                cut()
            finally:
                release()
        return len(held)


_local = threading.local()  # .trip: the RoundTrip of the worker thread's current call


def current_round_trip() -> RoundTrip | None:
    """The round trip this worker thread runs for (None outside `bounded`)."""
    trip: RoundTrip | None = getattr(_local, "trip", None)
    return trip


async def bounded(fn: Callable[[], T], timeout_s: float) -> T:
    """Run `fn` in a worker thread; cut its connections loose at the deadline or
    when the caller is cancelled.

    On the deadline raises `DeadlineExceeded` (whatever the thread then raised
    is dropped); on cancellation lets `Cancelled` through without waiting for
    the thread. Exceptions from `fn` before the deadline pass through.
    """
    trip = RoundTrip()
    token = trio.lowlevel.current_trio_token()
    returned = trio.Event()

    def in_thread() -> T:
        _local.trip = trip
        try:
            return fn()
        finally:
            _local.trip = None
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(returned.set)

    deadline = trio.current_time() + timeout_s
    try:
        with trio.move_on_at(deadline):
            return await trio.to_thread.run_sync(in_thread, abandon_on_cancel=True)
    except trio.Cancelled:
        trip.cut()  # the caller gave up: nothing must stay blocked on its behalf
        raise
    cut = trip.cut()
    log.warning("database_deadline_exceeded", timeout_s=timeout_s, connections_cut=cut)
    with trio.move_on_after(CUT_GRACE_S):
        await returned.wait()
    if not returned.is_set():
        log.error("database_thread_left_behind", grace_s=CUT_GRACE_S)
    raise DeadlineExceeded(
        f"no answer within {timeout_s:g} s; connection abandoned", connections_cut=cut
    )


def _hold_connection(conn: Conn) -> None:
    """Register `conn` with this thread's round trip (if any), by a duplicate of
    its socket: shutting that down fails libpq's blocked call, and the duplicate
    keeps the socket from being reused under us should libpq close its own fd."""
    trip = current_round_trip()
    if trip is None:
        return
    if trip.cut_done:
        raise _Cut
    try:
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except (psycopg.Error, OSError):
        return  # already broken: nothing to cut

    def cut() -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    trip.hold(conn, cut, sock.close)


def _let_go_connection(conn: Conn) -> None:
    trip = current_round_trip()
    if trip is not None:
        trip.let_go(conn)


def _check(conn: Conn) -> None:
    """The pool's check on checkout, itself inside the round trip's deadline."""
    _hold_connection(conn)
    try:
        psycopg_pool.ConnectionPool.check_connection(conn)
    except BaseException:
        _let_go_connection(conn)
        raise


# psycopg_pool retries a lost server with exponential backoff (1, 2, 4, 8, 16 s
# ... until reconnect_timeout): after a 20 s outage a slot's next attempt could
# come 16 s after the server is back, and ingest and the leader's load wait for
# it. Retry at most this far apart instead (a refused connect costs little).
RECONNECT_MAX_DELAY_S: Final = 1.0


class ReconnectAttempt(AttemptWithBackoff):
    """The pool's reconnect policy: backoff from 0.5 s, capped at RECONNECT_MAX_DELAY_S."""

    INITIAL_DELAY = 0.5

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_MAX_DELAY_S)


class _Pool(psycopg_pool.ConnectionPool[Conn]):
    """A pool whose checked-out connections belong to the current round trip, and
    that retries a lost server at most RECONNECT_MAX_DELAY_S apart (overriding
    psycopg_pool's private `_add_connection`: checked against psycopg-pool 3.3,
    pinned in constraints.txt)."""

    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        if attempt is None:
            attempt = ReconnectAttempt(timeout=self.reconnect_timeout)
        super()._add_connection(attempt, growing)

    def getconn(self, timeout: float | None = None) -> Conn:
        trip = current_round_trip()
        if trip is not None and trip.cut_done:
            raise _Cut
        conn = super().getconn(timeout)
        try:
            _hold_connection(conn)
        except _Cut:
            super().putconn(conn)  # cut while waiting for it: give it back unused
            raise
        return conn

    def putconn(self, conn: Conn) -> None:
        _let_go_connection(conn)
        super().putconn(conn)


class Database:
    """A connection pool and the round trips on it. All methods are async and run
    psycopg in a worker thread under a deadline; errors come out as `DatabaseError`."""

    def __init__(
        self,
        pool: psycopg_pool.ConnectionPool[Conn],
        *,
        write_timeout_s: float = WRITE_TIMEOUT_S,
        migrate_timeout_s: float = MIGRATE_TIMEOUT_S,
    ) -> None:
        self._pool = pool
        self._write_timeout_s = write_timeout_s
        self._migrate_timeout_s = migrate_timeout_s

    # ---- lifecycle -------------------------------------------------------

    @classmethod
    def create(
        cls,
        conninfo: str,
        *,
        min_size: int,
        max_size: int,
        write_timeout_s: float = WRITE_TIMEOUT_S,
        migrate_timeout_s: float = MIGRATE_TIMEOUT_S,
    ) -> Self:
        """`write_timeout_s` is the deadline of every round trip but migrations."""
        pool = _Pool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            open=False,
            # statement_timeout as a startup option, not a statement: a new
            # connection makes no round trip outside a deadline (README:
            # Failure handling); the server still ends a runaway statement.
            kwargs={"autocommit": False, "options": "-c statement_timeout=60s"},
            # A connection broken by a database restart is found and replaced on
            # checkout; the check runs inside the round trip's deadline.
            check=_check,
            name="notip-trio",
        )
        return cls(pool, write_timeout_s=write_timeout_s, migrate_timeout_s=migrate_timeout_s)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """`create` with the daemon's DB_* settings (pool size, deadlines)."""
        return cls.create(
            settings.db_conninfo(),
            min_size=settings.db_min_conns,
            max_size=settings.db_max_conns,
            write_timeout_s=settings.db_write_timeout_s,
            migrate_timeout_s=settings.db_migrate_timeout_s,
        )

    async def open(self, *, timeout_s: float) -> None:
        """Open the pool and wait until one connection works, or raise DatabaseError."""
        try:
            await trio.to_thread.run_sync(lambda: self._pool.open(wait=True, timeout=timeout_s))
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL: {exc}") from None

    async def close(self) -> None:
        await trio.to_thread.run_sync(lambda: self._pool.close(timeout=5.0))

    # ---- statements ------------------------------------------------------

    async def ping(self, *, timeout_s: float = 2.0, deadline_s: float | None = None) -> None:
        """`SELECT 1`, waiting at most `timeout_s` for a connection, under a
        deadline of `deadline_s` (`timeout_s` unless given)."""

        def _ping() -> None:
            with self._pool.connection(timeout=timeout_s) as conn:
                conn.execute("SELECT 1")

        await self._run(_ping, timeout_s=timeout_s if deadline_s is None else deadline_s)

    async def answers(self, *, timeout_s: float = 1.0) -> bool:
        """Whether a `SELECT 1` gets a connection within `timeout_s` and succeeds
        (ingest's probe after a failed write). The deadline is a second longer,
        so an outage ends each probe with the pool's timeout, not the deadline's
        warning."""
        try:
            await self.ping(timeout_s=timeout_s, deadline_s=timeout_s + 1.0)
        except DatabaseError:
            return False
        return True

    async def run_in_transaction(self, fn: Callable[[Conn], T]) -> T:
        """`fn(conn)` in a worker thread, inside one transaction on a pooled connection."""

        def run() -> T:
            with self._pool.connection(timeout=5.0) as conn, conn.transaction():
                return fn(conn)

        return await self._run(run)

    # ---- sync internals (worker thread) ---------------------------------

    async def _run(self, fn: Callable[[], T], *, timeout_s: float | None = None) -> T:
        """`fn()` in a worker thread under a deadline (the write timeout unless
        given); every error comes out as `DatabaseError`."""
        timeout_s = self._write_timeout_s if timeout_s is None else timeout_s
        try:
            return await bounded(fn, timeout_s)
        except DeadlineExceeded as exc:
            if exc.connections_cut:
                # The path that swallowed this round trip likely holds the idle
                # connections too: replace them all rather than time out on each.
                # (Not when it only waited for a free connection: a busy pool.)
                await trio.to_thread.run_sync(self._pool.drain, abandon_on_cancel=True)
            raise
        except (psycopg.Error, psycopg_pool.PoolTimeout, _Cut) as exc:
            raise DatabaseError(f"{type(exc).__name__}: {exc}".strip()) from None
