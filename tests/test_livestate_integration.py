"""The liveness state table on a real PostgreSQL: what every replica writes and
the leader reads (livestate.py). The FakeStore of the unit tests mirrors these
semantics; this file is what holds them to the real SQL."""

from __future__ import annotations

import datetime as dt

import trio

from notip_trio.db.liveness import PgStateStore
from notip_trio.db.writer import Storage
from notip_trio.livestate import BULK_ROWS, Reports

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


async def test_each_transition_queues_its_report_in_order_and_superseded_is_by_value(
    pg_database,
) -> None:
    """The outbox on real SQL: only winning transitions queue a report, in commit
    order; a report whose gateway made a newer transition that was not queued (a
    release without the outbox) or was decommissioned is superseded, one with a
    newer report queued behind it is not; delivered reports are cleared."""
    with trio.fail_after(60):
        storage, store = await _store(pg_database.conninfo)
        try:
            await store.record_seen({A: at(5), B: at(1)})
            await store.mark_online([B, A])
            assert await store.mark_online([A]) == []  # lost: queues nothing
            await store.mark_offline(B, at(1))
            pending = await store.pending_reports(10)
            assert pending.pending == 3
            assert [(r.key, r.status, r.last_seen, r.superseded) for r in pending.reports] == [
                (A, "online", at(5), False),  # one statement: keys in lock order
                (B, "online", at(1), False),  # B's offline is queued behind it
                (B, "offline", at(1), False),
            ]
            assert (await store.pending_reports(1)).pending == 3  # the count is of all
            await store.clear_reports([pending.reports[0].id])
            # B comes back, reported by a release without the outbox (not queued).
            await storage.run_in_transaction(
                lambda conn: conn.execute(
                    "UPDATE gateway_liveness SET status = 'online', status_last_seen = %s,"
                    " last_seen = %s WHERE tenant_id = %s AND gateway_id = %s",
                    (at(9), at(9), *B),
                )
            )
            assert [
                (r.status, r.superseded) for r in (await store.pending_reports(10)).reports
            ] == [
                ("online", False),  # a newer report of B is queued behind it
                ("offline", True),  # B's latest queued report, not its current transition
            ]
            await store.record_seen({A: at(20)})
            assert await store.decommission(A, at(21))
            await store.mark_offline(A, at(20))  # decommissioned: loses, queues nothing
            ids = [r.id for r in (await store.pending_reports(10)).reports]
            await store.clear_reports(ids)
            assert await store.pending_reports(10) == Reports([], 0)
        finally:
            await storage.close()


async def test_bulk_re_read_and_offline_transitions(pg_database) -> None:
    """The tick's bulk statements: the re-read leaves out what is gone; the
    transition wins only for online rows not heard since the alert's last-seen,
    reports only the winners, in key order, and spans several statements."""
    c, d, e = ("t1", "c"), ("t2", "a"), ("t1", "e")
    with trio.fail_after(120):
        storage, store = await _store(pg_database.conninfo)
        try:
            await store.record_seen({A: at(1), B: at(2), c: at(3), d: at(4), e: at(5)})
            await store.mark_online([A, B, c, d])  # e stays new
            await store.decommission(c, at(6))
            assert await store.current_last_seen_many([d, A, B, c, e, ("t9", "x")]) == {
                A: at(1),
                B: at(2),
                d: at(4),
                e: at(5),
            }
            await store.record_seen({B: at(7)})  # heard during the alert: still wins
            before = await store.pending_reports(100)
            won = await store.mark_offline_many(
                {d: at(4), B: at(2), A: at(0.5), c: at(3), e: at(5)}
            )
            # A's stored last-seen (1 s) is not older than its alert's (0.5 s): it wins.
            assert won == {A: at(1), B: at(7), d: at(4)}
            assert await store.mark_offline_many({A: at(1), B: at(2), d: at(4)}) == {}
            reports = (await store.pending_reports(100)).reports[len(before.reports) :]
            assert [(r.key, r.status, r.last_seen) for r in reports] == [
                (A, "offline", at(0.5)),
                (B, "offline", at(2)),
                (d, "offline", at(4)),
            ]
            # A gateway heard after the silence the alert was for does not go offline.
            await store.record_seen({e: at(9)})
            await store.mark_online([e])
            assert await store.mark_offline_many({e: at(10)}) == {}
            # More than one statement's worth, in one call.
            many = {("t3", f"g{i:05d}"): at(20) for i in range(BULK_ROWS + 7)}
            await store.record_seen(many)
            await store.mark_online(list(many))
            assert len(await store.current_last_seen_many(list(many))) == len(many)
            assert await store.mark_offline_many(many) == many
            assert {r.status for r in (await store.changes(0)).rows if r.key in many} == {
                "offline"
            }
        finally:
            await storage.close()
