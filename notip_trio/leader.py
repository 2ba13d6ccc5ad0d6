"""One leader among the replicas (docs/contract.md Behaviour 9).

The leader holds a session-level PostgreSQL advisory lock on a connection of
its own, outside the pool. `run_leadership` tries for the lock every
`retry_s`; once held, it runs the leader's work (`lead`) and checks the lock
connection every `check_s`, each check with a deadline (`CHECK_DEADLINE_S`). A check
that fails or does not answer in time ends the work at once (cancellation):
a leader that lost its lock connection must not tick, since PostgreSQL
releases a dead session's lock and another replica takes over. When a leader
dies (SIGKILL, crash, lost connection), the server drops its session and a
follower gets the lock at its next try: takeover within `retry_s` plus the
time the server needs to notice (at once for a closed socket; TCP keepalive
and `tcp_user_timeout` bound it for a vanished host).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final, NoReturn, Protocol

import psycopg
import trio

from .log import get_logger
from .metrics import Metrics

log = get_logger(__name__)

LIVENESS_LOCK: Final = 0x6E6F746970_01  # "notip" + 1; the migration lock is "notip"
# How long a lock call may take before the lock counts as lost (or not had).
CHECK_DEADLINE_S: Final = 3.0


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
    connection is then closed and a fresh one made for the next try.
    """

    def __init__(self, conninfo: str, key: int = LIVENESS_LOCK) -> None:
        self._conninfo = conninfo
        self._key = key
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    async def try_acquire(self) -> bool:
        def acquire() -> bool:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5)
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
            return bool(row and row[0])

        try:
            return await trio.to_thread.run_sync(acquire, abandon_on_cancel=True)
        except psycopg.Error as exc:
            log.warning("liveness_lock_unavailable", error=str(exc)[:300])
            await self.release()
            return False

    async def check(self) -> None:
        conn = self._conn
        if conn is None:
            raise RuntimeError("liveness lock connection is gone")

        def check() -> None:
            conn.execute("SELECT 1")

        await trio.to_thread.run_sync(check, abandon_on_cancel=True)

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # Closing ends the session, which releases the lock on the server.
            trio.lowlevel.spawn_system_task(_close_quietly, conn)


async def _close_quietly(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    try:
        await trio.to_thread.run_sync(conn.close, abandon_on_cancel=True)
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
