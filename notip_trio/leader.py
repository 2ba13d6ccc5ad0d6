"""One leader among the replicas (docs/contract.md Behaviour 9).

The leader holds a session-level PostgreSQL advisory lock on a connection of
its own, outside the pool. `run_leadership` tries for the lock every
`retry_s`; once held, it runs the leader's work (`lead`) and checks the lock
connection every `check_s`, each check with a deadline (`CHECK_DEADLINE_S`). A check
that fails or does not answer in time ends the work at once (cancellation):
a leader that lost its lock connection must not tick, since PostgreSQL
releases a dead session's lock and another replica takes over. A check asks
`pg_locks` whether this very backend still holds the lock, so a pooler that
moved the session elsewhere ends leadership too.

The server lets go of the lock by itself (docs/leader-lock.md): the lock
session is set up so PostgreSQL ends it when its holder stops checking, at
once for a closed socket, within `LOCK_IDLE_TIMEOUT_S` otherwise, whether the
holder's host vanished or it hangs behind a path that still answers TCP
keepalives. A follower then gets the lock at its next try (`retry_s`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final, NoReturn, Protocol

import psycopg
import trio
from psycopg.rows import TupleRow

from .log import get_logger
from .metrics import Metrics

log = get_logger(__name__)

LIVENESS_LOCK: Final = 0x6E6F746970_01  # "notip" + 1; the migration lock is "notip"
# How long a lock call may take before the lock counts as lost (or not had).
CHECK_DEADLINE_S: Final = 3.0

# What the server does with the lock session of a holder that stopped checking.
# A live holder (leader or follower) sends a statement at least every second
# (check_s and retry_s are at most 1 s, each call bounded by CHECK_DEADLINE_S),
# so its session is never idle for more than ~4 s: a session idle for 20 s
# belongs to a replica that is dead, hung, or cut off behind a path whose
# kernel still answers keepalives (a hung proxy, a frozen relay), which no TCP
# setting can tell from a quiet client. PostgreSQL 14+ (idle_session_timeout).
LOCK_IDLE_TIMEOUT_S: Final = 20.0
# A vanished host is found sooner by the server's own TCP settings: keepalives
# give up after idle + interval x count = 5 + 2 x 3 = 11 s of silence, and data
# the server sent that stays unacknowledged fails the socket after 10 s. Both
# stay below the idle timeout, so the whole bound is LOCK_IDLE_TIMEOUT_S from
# the last check, plus a follower's retry_s: about 21 s to a takeover.
LOCK_TCP_KEEPALIVES_IDLE_S: Final = 5
LOCK_TCP_KEEPALIVES_INTERVAL_S: Final = 2
LOCK_TCP_KEEPALIVES_COUNT: Final = 3
LOCK_TCP_USER_TIMEOUT_MS: Final = 10_000
# Worker threads of the lock's own: its calls never wait for a thread behind
# the database writes on Trio's default limiter (a check that waits 3 s for a
# thread drops leadership). Two: a call abandoned to a hung thread still holds
# its token until the socket fails, and the next call, or the close that ends
# the hang, must still get one.
LOCK_THREADS: Final = 2


def lock_session_settings(idle_timeout_s: float = LOCK_IDLE_TIMEOUT_S) -> dict[str, str]:
    """The server settings of the lock session (set with `set_config` after connect)."""
    return {
        "idle_session_timeout": f"{round(idle_timeout_s * 1000)}ms",
        "tcp_keepalives_idle": str(LOCK_TCP_KEEPALIVES_IDLE_S),
        "tcp_keepalives_interval": str(LOCK_TCP_KEEPALIVES_INTERVAL_S),
        "tcp_keepalives_count": str(LOCK_TCP_KEEPALIVES_COUNT),
        "tcp_user_timeout": str(LOCK_TCP_USER_TIMEOUT_MS),
    }


# Only the settings this server knows (idle_session_timeout: 14+); returns them.
_SET_SESSION: Final = (
    "SELECT s.name, set_config(s.name, s.value, false)"
    " FROM unnest(%s::text[], %s::text[]) AS s(name, value)"
    " WHERE s.name IN (SELECT name FROM pg_settings)"
)
# A bigint advisory lock shows in pg_locks as classid = high 32 bits,
# objid = low 32 bits, objsubid = 1.
_HELD: Final = (
    "SELECT pg_backend_pid(), EXISTS (SELECT FROM pg_locks"
    " WHERE locktype = 'advisory' AND classid = %s::bigint::oid AND objid = %s::bigint::oid"
    " AND objsubid = 1 AND pid = pg_backend_pid() AND granted)"
)


class LockNotHeld(Exception):
    """The lock session answers, but its backend does not hold the lock."""


class Lock(Protocol):
    async def try_acquire(self) -> bool:
        """True once this replica holds the lock; False if another does or on error."""
        ...

    async def check(self) -> None:
        """Return while the lock is held; raise (any Exception) when it may not be."""
        ...

    async def release(self) -> None:
        """Give the lock up (close its connection); never raises."""
        ...


class AdvisoryLock:
    """`Lock` on a dedicated psycopg connection (sync, in worker threads).

    A call that hangs is abandoned to its thread (`abandon_on_cancel`); the
    connection is then closed and a fresh one made for the next try. Its calls
    run on threads of their own (`LOCK_THREADS`), never behind the database
    writes on Trio's default thread limiter.
    """

    def __init__(
        self,
        conninfo: str,
        key: int = LIVENESS_LOCK,
        *,
        idle_timeout_s: float = LOCK_IDLE_TIMEOUT_S,
    ) -> None:
        self._conninfo = conninfo
        self._key = key
        self._settings = lock_session_settings(idle_timeout_s)
        self._warned_unavailable = False
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._threads = trio.CapacityLimiter(LOCK_THREADS)

    async def try_acquire(self) -> bool:
        def acquire() -> bool:
            if self._conn is None or self._conn.closed:
                conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5)
                try:
                    self._set_up(conn)
                except BaseException:
                    conn.close()
                    raise
                self._conn = conn
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
            return bool(row and row[0])

        try:
            return await trio.to_thread.run_sync(
                acquire, abandon_on_cancel=True, limiter=self._threads
            )
        except psycopg.Error as exc:
            log.warning("liveness_lock_unavailable", error=str(exc)[:300])
            await self.release()
            return False

    async def check(self) -> None:
        conn = self._conn
        if conn is None:
            raise RuntimeError("liveness lock connection is gone")

        classid, objid = (self._key >> 32) & 0xFFFFFFFF, self._key & 0xFFFFFFFF

        def check() -> None:
            row = conn.execute(_HELD, (classid, objid)).fetchone()
            if row is None or not row[1]:
                pid = None if row is None else row[0]
                raise LockNotHeld(
                    f"pg_locks shows advisory lock {self._key:#x} not held by this session's "
                    f"backend (pid {pid}): a pooler in transaction mode between this replica "
                    "and PostgreSQL, or the lock was released"
                )

        await trio.to_thread.run_sync(check, abandon_on_cancel=True, limiter=self._threads)

    def _set_up(self, conn: psycopg.Connection[TupleRow]) -> None:
        """Blocking: give the new session its server settings (LOCK_IDLE_TIMEOUT_S)."""
        names, values = list(self._settings), list(self._settings.values())
        applied = {str(row[0]) for row in conn.execute(_SET_SESSION, (names, values))}
        unavailable = [name for name in names if name not in applied]
        if unavailable and not self._warned_unavailable:
            self._warned_unavailable = True
            log.warning(
                "liveness_lock_settings_unavailable",
                settings=unavailable,
                server_version=conn.info.server_version,
                consequence="a leader hung behind a path that still answers TCP keepalives "
                "keeps the lock until its connection closes (PostgreSQL 14+ ends it)",
            )

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # Closing ends the session, which releases the lock on the server.
            trio.lowlevel.spawn_system_task(_close_quietly, conn, self._threads)


async def _close_quietly(conn: psycopg.Connection[TupleRow], limiter: trio.CapacityLimiter) -> None:
    try:
        await trio.to_thread.run_sync(conn.close, abandon_on_cancel=True, limiter=limiter)
    except Exception as exc:  # best effort: the session ends with the socket anyway
        log.debug("liveness_lock_close_failed", error=str(exc)[:200])


async def run_leadership(
    lock: Lock,
    lead: Callable[[], Awaitable[None]],
    metrics: Metrics,
    *,
    retry_s: float,
    check_s: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Follow, lead while the lock is held, follow again; never returns.

    Ready at once. `lead` runs only while the lock is held and is cancelled the
    moment a check fails; it must not return by itself (if it does, leadership
    is given up and taken again on the next try).
    """
    metrics.liveness_leader.set(0)
    task_status.started()
    try:
        while True:
            acquired = False
            with trio.move_on_after(CHECK_DEADLINE_S) as trying:
                acquired = await lock.try_acquire()
            if trying.cancelled_caught:
                # No answer: start over on a fresh connection next time, never
                # behind a call still stuck on this one.
                await lock.release()
            if acquired:
                await _lead_while_held(lock, lead, metrics, check_s)
            else:
                await trio.sleep(retry_s)
    finally:
        metrics.liveness_leader.set(0)
        with trio.CancelScope(shield=True):
            await lock.release()


async def _lead_while_held(
    lock: Lock, lead: Callable[[], Awaitable[None]], metrics: Metrics, check_s: float
) -> None:
    metrics.liveness_leader.set(1)
    metrics.liveness_takeovers.inc()
    log.info("liveness_leader_acquired")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lead)
            while True:
                await trio.sleep(check_s)
                reason = ""
                with trio.move_on_after(CHECK_DEADLINE_S) as checking:
                    try:
                        await lock.check()
                    except Exception as exc:
                        reason = f"{type(exc).__name__}: {exc}"[:300]
                if checking.cancelled_caught:
                    reason = f"no answer within {CHECK_DEADLINE_S:g} s"
                if reason:
                    log.error("liveness_leadership_lost", reason=reason)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        metrics.liveness_leader.set(0)
        with trio.CancelScope(shield=True):
            await lock.release()
