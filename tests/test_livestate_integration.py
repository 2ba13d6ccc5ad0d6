"""The liveness state table on a real PostgreSQL: what every replica writes and
the leader reads (livestate.py). The FakeStore of the unit tests mirrors these
semantics; this file is what holds them to the real SQL."""

from __future__ import annotations

import datetime as dt

import trio

from notip_trio.db.writer import Storage
from notip_trio.livestate import PgStateStore

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
A, B = ("t1", "a"), ("t1", "b")


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


async def _store(conninfo: str) -> tuple[Storage, PgStateStore]:
    storage = Storage.create(conninfo, min_size=1, max_size=3)
    await storage.open(timeout_s=10)
    await storage.migrate()
    return storage, PgStateStore(storage)


async def test_last_seen_never_moves_back_and_changes_are_read_incrementally(
    pg_database,
) -> None:
    with trio.fail_after(60):
        storage, store = await _store(pg_database.conninfo)
        try:
            start = await store.load()
            assert start.rows == []
            await store.record_seen({A: at(5), B: at(1)})
            await store.record_seen({A: at(3)})  # older (a redelivery): ignored
            changed = await store.changes(start.cursor)
            assert {(r.key, r.last_seen, r.status) for r in changed.rows} == {
                (A, at(5), "new"),
                (B, at(1), "new"),
            }
            # Nothing changed since: nothing read (the cursor moved on).
            assert (await store.changes(changed.cursor)).rows == []
            await store.record_seen({B: at(2)})
            assert [(r.key, r.last_seen) for r in (await store.changes(changed.cursor)).rows] == [
                (B, at(2))
            ]
        finally:
            await storage.close()


async def test_transitions_are_conditional_and_a_tombstone_keeps_its_time(pg_database) -> None:
    with trio.fail_after(60):
        storage, store = await _store(pg_database.conninfo)
        try:
            await store.record_seen({A: at(5), B: at(1)})
            assert sorted(await store.mark_online([A, B])) == [(A, at(5)), (B, at(1))]
            assert await store.mark_online([A, B]) == []  # already online: nobody reports it
            # Offline for the silence that ended at 1 s; a second attempt loses.
            assert await store.mark_offline(B, at(1)) == at(1)
            assert await store.mark_offline(B, at(1)) is None
            assert await store.mark_online([B]) == []  # not heard since
            await store.record_seen({B: at(9)})
            assert await store.mark_online([B]) == [(B, at(9))]  # back
            # Heard during the alert: the transition still wins, with the newer time.
            await store.record_seen({A: at(8)})
            assert await store.mark_offline(A, at(5)) == at(8)
            # Decommissioned at 10 s: a last-seen from before it (buffered on a
            # replica) does not bring it back; one from after it does, as new.
            assert await store.decommission(B, at(10))
            assert await store.current_last_seen(B) is None
            await store.record_seen({B: at(9.5)})
            assert await store.current_last_seen(B) is None
            assert not await store.decommission(B, at(10))  # idempotent
            await store.record_seen({B: at(11)})
            assert await store.current_last_seen(B) == at(11)
            assert [r.status for r in (await store.load()).rows if r.key == B] == ["new"]
            # A gateway decommissioned before its first last-seen was written.
            assert not await store.decommission(("t1", "c"), at(20))
            await store.record_seen({("t1", "c"): at(19)})
            assert await store.current_last_seen(("t1", "c")) is None
        finally:
            await storage.close()
