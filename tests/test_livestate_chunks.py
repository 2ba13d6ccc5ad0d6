"""The liveness table read and written in bounded chunks, on a real PostgreSQL
(livestate.py: every round trip bounded; the janitor's purge, janitor.py).

Exact counts: chunk sizes of 3 over 10 rows, a change committed late (by a
transaction that was running when the cursor was taken) read at the next
read, a change made between two pages of one read never lost."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import TypeVar

import psycopg
import trio

from devstack.postgres import PgDatabase
from notip_trio.db.liveness import PgStateStore, record_seen
from notip_trio.db.pool import Conn
from notip_trio.db.writer import Storage
from notip_trio.janitor import purge_once
from notip_trio.lanes import Key
from notip_trio.metrics import Metrics

from .fix_servers import scalar
from .liveness_fakes import sample

T = TypeVar("T")
T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
KEYS: list[Key] = [(f"t{i % 2}", f"gw-{i:02d}") for i in range(10)]
GUARD_S = 60


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


class CountingRunner:
    """`Storage.run_in_transaction`, counting round trips; `between` runs (in the
    test's thread, outside any round trip) after the `after`-th one."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.trips = 0
        self.after = -1
        self.between: Callable[[], None] = lambda: None

    async def run_in_transaction(self, fn: Callable[[Conn], T]) -> T:
        result = await self.storage.run_in_transaction(fn)
        self.trips += 1
        if self.trips == self.after:
            await trio.to_thread.run_sync(self.between)
        return result


async def _storage(conninfo: str) -> Storage:
    storage = Storage.create(conninfo, min_size=1, max_size=3)
    await storage.open(timeout_s=10)
    await storage.migrate()
    return storage


def _one(conninfo: str, sql: str, *args: object) -> object:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(sql, args).fetchone()
    assert row is not None
    return row[0]


def _analyze(conninfo: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("ANALYZE gateway_liveness")


def _record(conninfo: str, seen: dict[Key, dt.datetime]) -> None:
    with psycopg.connect(conninfo) as conn, conn.transaction():
        record_seen(conn, seen)


async def test_the_load_reads_every_gateway_once_in_chunks(pg_database: PgDatabase) -> None:
    with trio.fail_after(GUARD_S):
        storage = await _storage(pg_database.conninfo)
        try:
            runner = CountingRunner(storage)
            store = PgStateStore(runner, load_chunk=3)
            await store.record_seen({key: at(i) for i, key in enumerate(KEYS)})
            assert len(await store.mark_online(KEYS[:6])) == 6
            assert await store.mark_offline(KEYS[0], at(0)) == at(0)
            await store.decommission(KEYS[9], at(20))  # not tracked: not loaded
            runner.trips = 0
            chunks = [await store.load_chunk(None)]
            while (resume := chunks[-1].resume) is not None:
                chunks.append(await store.load_chunk(resume))
            # A never-analysed table of one block: one chunk, one round trip.
            assert runner.trips == len(chunks) == 1
            assert chunks[0].cursor is not None
            online = sorted(key for c in chunks for key, _ in c.online_keys())
            others = [(row.key, row.status) for c in chunks for row in c.rows]
            assert online == sorted(KEYS[1:6])
            assert sorted(others) == sorted(
                [(KEYS[0], "offline"), (KEYS[6], "new"), (KEYS[7], "new"), (KEYS[8], "new")]
            )
            seen = {key: s for c in chunks for key, s in c.online_keys()}
            assert seen[KEYS[3]] == at(3).timestamp()
        finally:
            await storage.close()


async def test_a_load_in_block_ranges_and_the_next_change_read_see_every_gateway(
    pg_database: PgDatabase,
) -> None:
    """3,000 gateways over many blocks, about 400 rows per chunk; between two
    chunks a third of them are heard again (each new row version lands in some
    block, read already or not). Every gateway comes in the load at most twice,
    and the load plus the first change read from its cursor give each one's
    latest last-seen."""
    keys = [(f"t{i % 7}", f"gw-{i:05d}") for i in range(3000)]
    with trio.fail_after(GUARD_S):
        storage = await _storage(pg_database.conninfo)
        try:
            store = PgStateStore(storage, load_chunk=400)
            await store.record_seen({key: at(1) for key in keys})
            assert len(await store.mark_online(keys)) == len(keys)
            await trio.to_thread.run_sync(_analyze, pg_database.conninfo)
            first = await store.load_chunk(None)
            heard = keys[::3]
            await store.record_seen({key: at(2) for key in heard})
            chunks = [first]
            while (resume := chunks[-1].resume) is not None:
                chunks.append(await store.load_chunk(resume))
            assert len(chunks) >= 5
            loaded = [key for c in chunks for key, _ in c.online_keys()]
            assert set(loaded) <= set(keys)
            assert max(loaded.count(key) for key in heard) <= 2
            state = {key: s for c in chunks for key, s in c.online_keys()}
            assert first.cursor is not None
            changes = await store.changes(first.cursor)
            state.update({row.key: row.last_seen.timestamp() for row in changes.rows})
            again = set(heard)
            assert state == {key: (at(2) if key in again else at(1)).timestamp() for key in keys}
        finally:
            await storage.close()


async def test_changes_are_read_in_pages_and_none_is_skipped(pg_database: PgDatabase) -> None:
    with trio.fail_after(GUARD_S):
        storage = await _storage(pg_database.conninfo)
        try:
            runner = CountingRunner(storage)
            store = PgStateStore(runner, changes_chunk=3)
            start = (await store.load()).cursor
            # Ten changes in four transactions.
            for part in (KEYS[0:2], KEYS[2:5], KEYS[5:9], KEYS[9:]):
                await store.record_seen(dict.fromkeys(part, at(1)))
            runner.trips = 0
            changed = await store.changes(start)
            assert sorted(row.key for row in changed.rows) == sorted(KEYS)  # each once
            assert runner.trips == 4  # 3 + 3 + 3 + 1 rows
            assert (await store.changes(changed.cursor)).rows == []

            # A transaction running while the cursor is taken commits late: the
            # read after its commit has it, though others committed meanwhile.
            late = psycopg.connect(pg_database.conninfo)
            try:
                record_seen(late, {KEYS[4]: at(5)})  # its transaction stays open
                await store.record_seen(dict.fromkeys(KEYS[6:], at(5)))
                first = await store.changes(changed.cursor)
                assert sorted(row.key for row in first.rows) == sorted(KEYS[6:])
                late.commit()
            finally:
                late.close()
            second = await store.changes(first.cursor)
            assert KEYS[4] in {row.key for row in second.rows}
            assert {row.key: row.last_seen for row in second.rows}[KEYS[4]] == at(5)

            # Changed between two pages of one read, after its page was read:
            # the next read has it at its new state.
            await store.record_seen(dict.fromkeys(KEYS, at(7)))
            runner.trips, runner.after = 0, 1
            runner.between = lambda: _record(pg_database.conninfo, {min(KEYS): at(8)})
            third = await store.changes(second.cursor)
            assert sorted({row.key for row in third.rows}) == sorted(KEYS)
            fourth = await store.changes(third.cursor)
            assert [(row.key, row.last_seen) for row in fourth.rows] == [(min(KEYS), at(8))]
        finally:
            await storage.close()


async def test_changes_page_in_xid_order_across_a_digit_boundary(pg_database: PgDatabase) -> None:
    """Rows changed by transactions 99 and 100 (set by hand): as text '100'
    sorts before '99', and a page ordered so ended on 100 and the next page
    began after it, skipping every 99. Read in xid order, each comes once."""
    with trio.fail_after(GUARD_S):
        storage = await _storage(pg_database.conninfo)
        try:
            store = PgStateStore(storage, changes_chunk=3)
            await store.record_seen({key: at(i) for i, key in enumerate(KEYS[:7])})
            with psycopg.connect(pg_database.conninfo) as conn:
                conn.execute(
                    "UPDATE gateway_liveness SET changed_xid ="
                    " CASE WHEN gateway_id = ANY(%s) THEN '99'::xid8 ELSE '100'::xid8 END",
                    ([g for _, g in KEYS[:2]],),
                )
            changed = await store.changes(1)
            assert sorted(row.key for row in changed.rows) == sorted(KEYS[:7])
            assert len(changed.rows) == 7
        finally:
            await storage.close()


async def test_the_purge_deletes_only_old_retired_rows_in_batches(pg_database: PgDatabase) -> None:
    conninfo = pg_database.conninfo
    with trio.fail_after(GUARD_S):
        storage = await _storage(conninfo)
        try:
            store = PgStateStore(storage)
            now = dt.datetime.now(dt.UTC)
            old, recent = now - dt.timedelta(days=40), now - dt.timedelta(days=1)
            await store.record_seen({key: old for key in KEYS})
            await store.mark_online(KEYS)
            for key in KEYS[:7]:
                assert await store.mark_offline(key, old) == old
            await store.decommission(KEYS[7], old)
            reports = scalar(conninfo, "SELECT count(*) FROM gateway_status_outbox")
            assert reports == 17  # 10 online, 7 offline
            # KEYS[0:4] offline and KEYS[7] a tombstone for 40 days; KEYS[4] offline
            # for a day; KEYS[5] offline for 40 days but heard a day ago (a stale
            # message: still offline); KEYS[6] offline since now; KEYS[8:] online.
            with psycopg.connect(conninfo) as conn:
                conn.execute(
                    "UPDATE gateway_liveness SET status_at = %s WHERE gateway_id = ANY(%s)",
                    (old, [k[1] for k in KEYS[0:4] + KEYS[5:6] + KEYS[7:8]]),
                )
                conn.execute(
                    "UPDATE gateway_liveness SET status_at = %s WHERE gateway_id = %s",
                    (recent, KEYS[4][1]),
                )
            await store.record_seen({KEYS[5]: recent})
            await store.record_seen({key: now for key in KEYS[8:]})
            forgotten: list[Key] = []
            metrics = Metrics()
            purged = await purge_once(
                store,
                metrics,
                liveness_retention_s=30 * 86400,
                rejected_retention_s=30 * 86400,
                forget=forgotten.extend,
                batch=2,
                pause_s=0,
            )
            assert purged.retired == 5
            assert sorted(forgotten) == sorted(KEYS[0:4] + KEYS[7:8])
            left = _one(
                conninfo, "SELECT array_agg(gateway_id ORDER BY gateway_id) FROM gateway_liveness"
            )
            assert left == [k[1] for k in sorted(KEYS[4:7] + KEYS[8:], key=lambda k: k[1])]
            # The outbox is not touched.
            assert scalar(conninfo, "SELECT count(*) FROM gateway_status_outbox") == reports
            assert sample(metrics, "purged_rows_total", table="gateway_liveness") == 5
            # Nothing older is left: the next run deletes nothing.
            again = await purge_once(
                store, metrics, liveness_retention_s=30 * 86400, rejected_retention_s=0,
                forget=forgotten.extend, batch=2, pause_s=0,
            )  # fmt: skip
            assert again.retired == 0
            # A purged gateway that sends again is first seen: a new row.
            await store.record_seen({KEYS[0]: now})
            status = _one(
                conninfo,
                "SELECT status FROM gateway_liveness WHERE tenant_id = %s AND gateway_id = %s",
                *KEYS[0],
            )
            assert status == "new"
        finally:
            await storage.close()


async def test_the_purge_of_rejected_messages_goes_in_batches(pg_database: PgDatabase) -> None:
    conninfo = pg_database.conninfo
    with trio.fail_after(GUARD_S):
        storage = await _storage(conninfo)
        try:
            with psycopg.connect(conninfo) as conn:
                conn.execute(
                    "INSERT INTO telemetry_rejected (received_at, subject, reason, detail, body,"
                    " body_length, stream_seq)"
                    " SELECT now() - make_interval(days => CASE WHEN i <= 7 THEN 31 ELSE 29 END),"
                    " 's', 'r', 'd', '', 0, i FROM generate_series(1, 10) i"
                )
            runner = CountingRunner(storage)
            store = PgStateStore(runner)
            metrics = Metrics()
            purged = await purge_once(
                store, metrics, liveness_retention_s=0, rejected_retention_s=30 * 86400,
                forget=lambda keys: None, batch=3, pause_s=0,
            )  # fmt: skip
            assert (purged.retired, purged.rejected) == (0, 7)
            assert runner.trips == 3  # 3 + 3 + 1: the short batch ends the run
            left = _one(
                conninfo, "SELECT array_agg(stream_seq ORDER BY stream_seq) FROM telemetry_rejected"
            )
            assert left == [8, 9, 10]
            assert sample(metrics, "purged_rows_total", table="telemetry_rejected") == 7
        finally:
            await storage.close()
