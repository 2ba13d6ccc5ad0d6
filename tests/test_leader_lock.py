"""The leader's advisory lock on a real PostgreSQL, and `check`'s view of its session.

Rules for this file: the suite's throwaway PostgreSQL over TCP, a fresh
database per test and a lock key of the test's own; every wait polls the
server with a deadline and each test has an absolute hang guard. The server's
idle timeout is shortened for the test through the lock's constructor; the
time the server took is printed, never asserted.
"""

from __future__ import annotations

import random
import time

import psycopg
import pytest
import trio

from devstack.postgres import PgDatabase
from notip_trio.check import (
    LockSessionFacts,
    lock_session_facts,
    lock_session_result,
)
from notip_trio.leader import LOCK_IDLE_TIMEOUT_S, AdvisoryLock, LockNotHeld

from .fix_daemon import until

GUARD_S = 60


def _key() -> int:
    # Both halves non-zero and the high bit set: classid/objid must be split right.
    return -random.randrange(1 << 33, 1 << 62)


def _free(conninfo: str, key: int) -> bool:
    """Whether another session can take `key` now (it lets go of it at once)."""
    with psycopg.connect(conninfo, connect_timeout=5, autocommit=True) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        return bool(row and row[0])


def _setting(lock: AdvisoryLock, name: str) -> str:
    conn = lock._conn
    assert conn is not None
    row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    assert row is not None
    return str(row[0])


async def test_one_holder_its_checks_and_its_session_settings(pg_database: PgDatabase) -> None:
    key = _key()
    first = AdvisoryLock(pg_database.conninfo, key)
    second = AdvisoryLock(pg_database.conninfo, key)
    with trio.fail_after(GUARD_S):
        try:
            assert await first.try_acquire()
            assert not await second.try_acquire()
            await first.check()  # pg_locks: this backend holds it
            with pytest.raises(LockNotHeld):
                await second.check()  # connected, but not the holder
            assert _setting(first, "idle_session_timeout") == f"{LOCK_IDLE_TIMEOUT_S:g}s"
            assert _setting(first, "tcp_keepalives_idle") == "5"
            assert _setting(first, "tcp_keepalives_interval") == "2"
            assert _setting(first, "tcp_keepalives_count") == "3"
            assert _setting(first, "tcp_user_timeout") == "10000"  # ms
        finally:
            await first.release()
            await second.release()
        await until(lambda: _free(pg_database.conninfo, key), 10, "the lock free after release")


async def test_a_check_finds_the_lock_gone_from_its_session(pg_database: PgDatabase) -> None:
    """What a pooler that resets or swaps the server session looks like to the check."""
    key = _key()
    lock = AdvisoryLock(pg_database.conninfo, key)
    with trio.fail_after(GUARD_S):
        try:
            assert await lock.try_acquire()
            conn = lock._conn
            assert conn is not None
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            with pytest.raises(LockNotHeld, match="not held by this session's backend"):
                await lock.check()
        finally:
            await lock.release()


async def test_the_lock_gets_a_thread_while_the_default_limiter_is_exhausted(
    pg_database: PgDatabase,
) -> None:
    """Database writes fill Trio's default thread limiter (a pool waiting for
    connections, threads abandoned to a dead path): the lock's calls run on
    threads of their own, so its check still answers (issue: a check that
    waited 3 s for a thread dropped leadership)."""
    key = _key()
    lock = AdvisoryLock(pg_database.conninfo, key)
    default = trio.to_thread.current_default_thread_limiter()
    holders = [object() for _ in range(int(default.total_tokens))]
    with trio.fail_after(GUARD_S):
        try:
            for holder in holders:
                await default.acquire_on_behalf_of(holder)
            assert default.available_tokens == 0
            # Guard: a call on the default limiter now waits (it would be the check).
            with trio.move_on_after(0.5) as waited:
                await trio.to_thread.run_sync(lambda: None)
            assert waited.cancelled_caught
            with trio.fail_after(5):
                assert await lock.try_acquire()
                await lock.check()
                await lock.check()
        finally:
            for holder in holders:
                default.release_on_behalf_of(holder)
            await lock.release()
        await until(lambda: _free(pg_database.conninfo, key), 10, "the lock free after release")


async def test_the_server_ends_a_silent_lock_session_and_frees_the_lock(
    pg_database: PgDatabase,
) -> None:
    key = _key()
    lock = AdvisoryLock(pg_database.conninfo, key, idle_timeout_s=1.0)
    with trio.fail_after(GUARD_S):
        try:
            assert await lock.try_acquire()
            assert _setting(lock, "idle_session_timeout") == "1s"
            silent_from = time.monotonic()
            # The holder stops checking; nothing on the client side closes anything.
            await until(lambda: _free(pg_database.conninfo, key), 30, "the lock set free")
            print(f"\nlock free {time.monotonic() - silent_from:.2f} s after its last statement")
            with pytest.raises(psycopg.OperationalError):
                await lock.check()  # the session is gone
        finally:
            await lock.release()


# --- `notip-trio check`: the lock session ----------------------------------------


def _facts(pids: tuple[int, int], unavailable: tuple[str, ...] = ()) -> LockSessionFacts:
    return LockSessionFacts(pids=pids, server_version="15.4", unavailable=unavailable)


def test_lock_session_judgement() -> None:
    direct = lock_session_result(_facts((4711, 4711)))
    assert (direct.status, direct.check) == ("ok", "leader lock")
    pooled = lock_session_result(_facts((4711, 4712)))
    assert pooled.status == "FAILED"
    assert "4711 and 4712" in pooled.detail
    assert "transaction (or statement) pooler" in pooled.detail
    assert "session mode" in pooled.hint
    old = lock_session_result(_facts((4711, 4711), ("idle_session_timeout",)))
    assert old.status == "info"
    assert "lacks idle_session_timeout" in old.detail


async def test_lock_session_check_passes_on_a_direct_connection(pg_database: PgDatabase) -> None:
    with trio.fail_after(GUARD_S):
        facts = await trio.to_thread.run_sync(lock_session_facts, pg_database.conninfo)
    result = lock_session_result(facts)
    print("\n" + result.line())
    assert facts.pids[0] == facts.pids[1]
    assert result.status == "ok", result.line()
