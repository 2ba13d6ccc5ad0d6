"""The liveness state's statements on PostgreSQL, and `PgStateStore`.

What the rows mean, the cursor and the lock order: `livestate.py` (the types
and protocols this implements).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from sys import intern
from typing import Any, Final, TypeVar

from ..lanes import Key
from ..livestate import (
    BULK_ROWS,
    CHANGES_CHUNK,
    LOAD_CHUNK,
    Changes,
    GatewayRow,
    LoadChunk,
    LoadPosition,
    Report,
    Reports,
    RowStatus,
    Runner,
)
from .pool import Conn

T = TypeVar("T")

# Binary parameters: measured 25% faster for 10,000 gateways than text.
_RECORD_SEEN: Final = """
INSERT INTO gateway_liveness AS g (tenant_id, gateway_id, last_seen)
SELECT * FROM unnest(%b::text[], %b::text[], %b::timestamptz[])
ON CONFLICT (tenant_id, gateway_id) DO UPDATE
   SET last_seen = EXCLUDED.last_seen,
       status = CASE WHEN g.status = 'decommissioned' THEN 'new' ELSE g.status END,
       changed_xid = pg_current_xact_id()
 WHERE g.last_seen < EXCLUDED.last_seen
"""
# The cursor for the next change read, and the bound of this one.
_SNAPSHOT: Final = (
    "SELECT pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text FROM pg_current_snapshot() s"
)
_COLUMNS: Final = "tenant_id, gateway_id, last_seen, status, status_last_seen"
# One row per tenant in the chunk (a range of the table's blocks, read by a TID
# range scan: in the table's own order, ~3x cheaper than the key index's one heap
# fetch per row): its online gateways as two arrays, ids and last-seen in epoch
# seconds (no Python object per gateway but its id and its float, which is most
# of a takeover's cost), the others as arrays of their columns. An aggregate node
# advances every aggregate on each input row in turn (and combines parallel
# partial states a group at a time), so arrays under the same FILTER pair up.
# date_part: float8 at once (extract's numeric cast doubled the server's time).
_LOAD_CHUNK: Final = """
SELECT tenant_id,
       array_agg(gateway_id) FILTER (WHERE status = 'online'),
       array_agg(date_part('epoch', last_seen)) FILTER (WHERE status = 'online'),
       array_agg(gateway_id) FILTER (WHERE status <> 'online'),
       array_agg(status) FILTER (WHERE status <> 'online'),
       array_agg(last_seen) FILTER (WHERE status <> 'online'),
       array_agg(status_last_seen) FILTER (WHERE status <> 'online')
  FROM gateway_liveness
 WHERE ctid >= %s::text::tid AND ctid < %s::text::tid AND status <> 'decommissioned'
 GROUP BY tenant_id
"""
# The table's size in blocks now (every row committed before the load's snapshot
# lies below it), and its rows per block as last analysed (0: never).
_LOAD_EXTENT: Final = """
SELECT pg_relation_size(c.oid) / current_setting('block_size')::int8,
       CASE WHEN c.relpages > 0 AND c.reltuples > 0 THEN c.reltuples / c.relpages ELSE 0 END
  FROM pg_class c WHERE c.oid = 'gateway_liveness'::regclass
"""
# Rows per block assumed for a table never analysed (short rows: ~60 fit).
_ROWS_PER_BLOCK_GUESS: Final = 40.0
# The xid goes out as text under another name: named `changed_xid`, the output
# column would be what ORDER BY sorts by, as text ('100' < '99'), so a page
# could end on a row the next page's (xid8) bound skips rows before, and every
# page sorted the whole window (no index order).
_CHANGES: Final = f"""
SELECT {_COLUMNS}, changed_xid::text AS xid FROM gateway_liveness
 WHERE changed_xid >= %(from)s::text::xid8 AND changed_xid < %(upto)s::text::xid8
   AND (changed_xid, tenant_id, gateway_id) > (%(from)s::text::xid8, %(tenant)s, %(gateway)s)
 ORDER BY changed_xid, tenant_id, gateway_id
 LIMIT %(limit)s
"""
# The first page and the snapshot it was read under, in one round trip: xmin is
# the next read's cursor, xmax this read's bound (and the next pages'). One row
# with NULL columns when nothing changed.
_CHANGES_FIRST: Final = f"""
SELECT pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text, c.*
  FROM pg_current_snapshot() s
  LEFT JOIN LATERAL (
    SELECT {_COLUMNS}, changed_xid::text AS xid FROM gateway_liveness
     WHERE changed_xid >= %(from)s::text::xid8 AND changed_xid < pg_snapshot_xmax(s)
     ORDER BY changed_xid, tenant_id, gateway_id
     LIMIT %(limit)s
  ) c ON true
"""
_CURRENT: Final = (
    "SELECT last_seen FROM gateway_liveness"
    " WHERE tenant_id = %s AND gateway_id = %s AND status <> 'decommissioned'"
)
_LOCK_ROWS: Final = """
SELECT 1 FROM gateway_liveness g
  JOIN unnest(%b::text[], %b::text[]) AS k(tenant_id, gateway_id) USING (tenant_id, gateway_id)
 ORDER BY g.tenant_id COLLATE "C", g.gateway_id COLLATE "C"
   FOR UPDATE OF g
"""
# A transition and its report, in one statement (so in one transaction).
_MARK_ONLINE: Final = """
WITH won AS (
    UPDATE gateway_liveness g
       SET status = 'online', status_last_seen = g.last_seen, status_at = now(),
           changed_xid = pg_current_xact_id()
      FROM unnest(%b::text[], %b::text[]) AS k(tenant_id, gateway_id)
     WHERE g.tenant_id = k.tenant_id AND g.gateway_id = k.gateway_id
       AND (g.status = 'new' OR (g.status = 'offline' AND g.last_seen > g.status_last_seen))
    RETURNING g.tenant_id, g.gateway_id, g.last_seen
), queued AS (
    INSERT INTO gateway_status_outbox (tenant_id, gateway_id, status, last_seen)
    SELECT tenant_id, gateway_id, 'online', last_seen FROM won
     ORDER BY tenant_id COLLATE "C", gateway_id COLLATE "C"
)
SELECT tenant_id, gateway_id, last_seen FROM won
"""
_MARK_OFFLINE: Final = """
WITH won AS (
    UPDATE gateway_liveness
       SET status = 'offline', status_last_seen = %(alerted)s, status_at = now(),
           changed_xid = pg_current_xact_id()
     WHERE tenant_id = %(tenant)s AND gateway_id = %(gateway)s
       AND status = 'online' AND last_seen >= %(alerted)s
    RETURNING tenant_id, gateway_id, last_seen
), queued AS (
    INSERT INTO gateway_status_outbox (tenant_id, gateway_id, status, last_seen)
    SELECT tenant_id, gateway_id, 'offline', %(alerted)s FROM won
)
SELECT last_seen FROM won
"""
# The same for many gateways at once (`BULK_ROWS` a statement): the re-read of
# last-seen (no locks) and the transitions, after their rows are locked in
# order (`_LOCK_ROWS`); only the rows that change report, queued in key order.
_CURRENT_MANY: Final = """
SELECT g.tenant_id, g.gateway_id, g.last_seen FROM gateway_liveness g
  JOIN unnest(%b::text[], %b::text[]) AS k(tenant_id, gateway_id) USING (tenant_id, gateway_id)
 WHERE g.status <> 'decommissioned'
"""
_MARK_OFFLINE_MANY: Final = """
WITH won AS (
    UPDATE gateway_liveness g
       SET status = 'offline', status_last_seen = k.alerted, status_at = now(),
           changed_xid = pg_current_xact_id()
      FROM unnest(%b::text[], %b::text[], %b::timestamptz[]) AS k(tenant_id, gateway_id, alerted)
     WHERE g.tenant_id = k.tenant_id AND g.gateway_id = k.gateway_id
       AND g.status = 'online' AND g.last_seen >= k.alerted
    RETURNING g.tenant_id, g.gateway_id, g.last_seen, k.alerted
), queued AS (
    INSERT INTO gateway_status_outbox (tenant_id, gateway_id, status, last_seen)
    SELECT tenant_id, gateway_id, 'offline', alerted FROM won
     ORDER BY tenant_id COLLATE "C", gateway_id COLLATE "C"
)
SELECT tenant_id, gateway_id, last_seen FROM won
"""
# Superseded: the gateway's current transition is not this report's, and no
# newer report of it is queued, so a newer transition was reported without the
# outbox (by a release before it). Compared by value, not by time: no clock.
_PENDING_REPORTS: Final = """
SELECT o.id, o.tenant_id, o.gateway_id, o.status, o.last_seen,
       g.tenant_id IS NOT NULL
       AND (g.status, g.status_last_seen) IS DISTINCT FROM (o.status, o.last_seen)
       AND NOT EXISTS (
           SELECT 1 FROM gateway_status_outbox n
            WHERE n.tenant_id = o.tenant_id AND n.gateway_id = o.gateway_id AND n.id > o.id
       ) AS superseded,
       count(*) OVER () AS pending
  FROM gateway_status_outbox o
  LEFT JOIN gateway_liveness g USING (tenant_id, gateway_id)
 ORDER BY o.id
 LIMIT %s
"""
_CLEAR_REPORTS: Final = "DELETE FROM gateway_status_outbox WHERE id = ANY(%s::bigint[])"
# A tombstone as of the decommission message's stream time: a last-seen from
# before it (still buffered on some replica, or redelivered) cannot bring the
# gateway back; one from after it makes it first seen again.
_DECOMMISSION: Final = """
INSERT INTO gateway_liveness AS g (tenant_id, gateway_id, last_seen, status, status_at)
VALUES (%s, %s, %s, 'decommissioned', now())
ON CONFLICT (tenant_id, gateway_id) DO UPDATE
   SET status = 'decommissioned', status_at = now(),
       last_seen = greatest(g.last_seen, EXCLUDED.last_seen),
       changed_xid = pg_current_xact_id()
"""
# Retired rows whose last transition (and last message) is older than the
# retention: offline ones and tombstones. The re-check in the DELETE sees a row
# that changed meanwhile (a message made it new again); SKIP LOCKED never waits
# for ingest's row locks. The outbox keeps its reports: the dispatcher sends a
# report without its row as it is.
_PURGE_RETIRED: Final = """
WITH old AS (
    SELECT tenant_id, gateway_id FROM gateway_liveness
     WHERE status IN ('offline', 'decommissioned')
       AND status_at < now() - make_interval(secs => %(age)s)
       AND last_seen < now() - make_interval(secs => %(age)s)
     ORDER BY tenant_id COLLATE "C", gateway_id COLLATE "C"
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
DELETE FROM gateway_liveness g USING old
 WHERE g.tenant_id = old.tenant_id AND g.gateway_id = old.gateway_id
   AND g.status IN ('offline', 'decommissioned')
   AND g.status_at < now() - make_interval(secs => %(age)s)
   AND g.last_seen < now() - make_interval(secs => %(age)s)
RETURNING g.tenant_id, g.gateway_id, g.status
"""
_PURGE_REJECTED: Final = """
DELETE FROM telemetry_rejected WHERE id IN (
    SELECT id FROM telemetry_rejected
     WHERE received_at < now() - make_interval(secs => %(age)s)
     ORDER BY received_at
     LIMIT %(limit)s
)
"""


def record_seen(conn: Conn, seen: Mapping[Key, dt.datetime]) -> None:
    """Upsert each gateway's last-seen, in the caller's transaction."""
    if not seen:
        return
    keys = sorted(seen)  # lock order: see the module docstring
    conn.execute(
        _RECORD_SEEN, ([k[0] for k in keys], [k[1] for k in keys], [seen[k] for k in keys])
    )


class PgStateStore:
    """`StateStore` and `Purger` on the daemon's pool (`Storage.run_in_transaction`).

    `load_chunk`, `changes` and `purge_*` take at most `load_chunk`,
    `changes_chunk` and the given limit rows per round trip."""

    def __init__(
        self, runner: Runner, *, load_chunk: int = LOAD_CHUNK, changes_chunk: int = CHANGES_CHUNK
    ) -> None:
        self._runner = runner
        self._load_chunk = load_chunk
        self._changes_chunk = changes_chunk

    async def load_chunk(self, after: LoadPosition | None) -> LoadChunk:
        """Blocks of the table, about `load_chunk` rows' worth each. A row that
        changes during the load may move to a block already read (missed) or
        not yet read (read twice): its new version has a `changed_xid` at or
        above the cursor, so the first change read after the load has it."""

        def load(conn: Conn) -> LoadChunk:
            cursor = None
            if after is None:
                cursor = _snapshot(conn)[0]  # before the read: a conservative cursor
                extent = conn.execute(_LOAD_EXTENT).fetchone()
                assert extent is not None
                per_block = float(extent[1]) or _ROWS_PER_BLOCK_GUESS  # type: ignore[arg-type]
                step = max(1, int(self._load_chunk / per_block))
                start, end = 0, int(extent[0])  # type: ignore[call-overload]
            else:
                start, step, end = (int(x) for x in after)  # type: ignore[call-overload]
            # Binary: arrays of float8 and text parse faster (measured for a million
            # gateways: 0.33 s of CPU against 0.65 s in text; 1.2 s as a row each).
            rows = (
                conn.cursor(binary=True)
                .execute(_LOAD_CHUNK, (f"({start},0)", f"({start + step},0)"))
                .fetchall()
            )
            nxt = start + step
            return _load_chunk(rows, (nxt, step, end) if nxt < end else None, cursor)

        return await self._runner.run_in_transaction(load)

    async def load(self) -> Changes:
        """The whole state at once, as `GatewayRow`s (tests, tools; the leader
        uses `load_chunk`)."""
        first = chunk = await self.load_chunk(None)
        rows: list[GatewayRow] = []
        while True:
            rows += [
                GatewayRow(key, dt.datetime.fromtimestamp(seen, dt.UTC), "online", None)
                for key, seen in chunk.online_keys()
            ]
            rows += chunk.rows
            if chunk.resume is None:
                break
            chunk = await self.load_chunk(chunk.resume)
        assert first.cursor is not None
        return Changes(sorted(rows, key=lambda row: row.key), first.cursor)

    async def changes(self, cursor: int) -> Changes:
        limit = self._changes_chunk
        params: dict[str, object] = {"from": str(cursor), "limit": limit}

        def first(conn: Conn) -> tuple[int, list[tuple[object, ...]]]:
            rows = conn.execute(_CHANGES_FIRST, params).fetchall()
            params["upto"] = str(rows[0][1])
            return int(str(rows[0][0])), [r[2:] for r in rows if r[2] is not None]

        def more(conn: Conn) -> list[tuple[object, ...]]:
            return conn.execute(_CHANGES, params).fetchall()

        new_cursor, page = await self._runner.run_in_transaction(first)
        rows = _rows([r[:5] for r in page])
        while len(page) >= limit:
            t, g, *_, xid = page[-1]
            params.update({"from": xid, "tenant": t, "gateway": g})
            page = await self._runner.run_in_transaction(more)
            rows += _rows([r[:5] for r in page])
        return Changes(rows, new_cursor)

    async def current_last_seen(self, key: Key) -> dt.datetime | None:
        def current(conn: Conn) -> dt.datetime | None:
            row = conn.execute(_CURRENT, key).fetchone()
            return row[0] if row else None  # type: ignore[return-value]

        return await self._runner.run_in_transaction(current)

    async def mark_online(self, keys: Sequence[Key]) -> list[tuple[Key, dt.datetime]]:
        if not keys:
            return []
        ordered = sorted(set(keys))
        args = ([k[0] for k in ordered], [k[1] for k in ordered])

        def mark(conn: Conn) -> list[tuple[Key, dt.datetime]]:
            with conn.pipeline():  # one round trip for both
                conn.execute(_LOCK_ROWS, args)
                cur = conn.execute(_MARK_ONLINE, args)
            rows = cur.fetchall()
            return [((str(t), str(g)), seen) for t, g, seen in rows]  # type: ignore[misc]

        return await self._runner.run_in_transaction(mark)

    async def mark_offline(self, key: Key, last_seen: dt.datetime) -> dt.datetime | None:
        params = {"alerted": last_seen, "tenant": key[0], "gateway": key[1]}

        def mark(conn: Conn) -> dt.datetime | None:
            row = conn.execute(_MARK_OFFLINE, params).fetchone()
            return row[0] if row else None  # type: ignore[return-value]

        return await self._runner.run_in_transaction(mark)

    async def current_last_seen_many(self, keys: Sequence[Key]) -> dict[Key, dt.datetime]:
        out: dict[Key, dt.datetime] = {}
        for chunk in _chunks(sorted(set(keys))):
            args = ([k[0] for k in chunk], [k[1] for k in chunk])

            def current(conn: Conn, args: tuple[list[str], list[str]] = args) -> list[Any]:
                return conn.execute(_CURRENT_MANY, args).fetchall()

            for t, g, seen in await self._runner.run_in_transaction(current):
                out[(str(t), str(g))] = seen
        return out

    async def mark_offline_many(self, alerted: Mapping[Key, dt.datetime]) -> dict[Key, dt.datetime]:
        won: dict[Key, dt.datetime] = {}
        for chunk in _chunks(sorted(alerted)):  # lock order: see the module docstring
            keys = ([k[0] for k in chunk], [k[1] for k in chunk])
            args = (*keys, [alerted[k] for k in chunk])

            def mark(
                conn: Conn, keys: tuple[list[str], list[str]] = keys, args: tuple[Any, ...] = args
            ) -> list[Any]:
                with conn.pipeline():  # one round trip for both
                    conn.execute(_LOCK_ROWS, keys)
                    cur = conn.execute(_MARK_OFFLINE_MANY, args)
                return cur.fetchall()

            for t, g, seen in await self._runner.run_in_transaction(mark):
                won[(str(t), str(g))] = seen
        return won

    async def pending_reports(self, limit: int) -> Reports:
        def pending(conn: Conn) -> Reports:
            rows = conn.execute(_PENDING_REPORTS, (limit,)).fetchall()
            reports = [
                Report(int(i), (str(t), str(g)), status, seen, bool(sup))  # type: ignore[arg-type, call-overload]
                for i, t, g, status, seen, sup, _ in rows
            ]
            return Reports(reports, int(rows[0][6]) if rows else 0)  # type: ignore[call-overload]

        return await self._runner.run_in_transaction(pending)

    async def clear_reports(self, ids: Sequence[int]) -> None:
        if ids:
            await self._runner.run_in_transaction(
                lambda conn: conn.execute(_CLEAR_REPORTS, (list(ids),))
            )

    async def record_seen(self, seen: Mapping[Key, dt.datetime]) -> None:
        await self._runner.run_in_transaction(lambda conn: record_seen(conn, seen))

    async def decommission(self, key: Key, at: dt.datetime) -> bool:
        def forget(conn: Conn) -> bool:
            tracked = conn.execute(_CURRENT, key).fetchone() is not None
            conn.execute(_DECOMMISSION, (*key, at))
            return tracked

        return await self._runner.run_in_transaction(forget)

    async def purge_retired(self, older_than_s: float, limit: int) -> list[tuple[Key, RowStatus]]:
        params = {"age": older_than_s, "limit": limit}

        def purge(conn: Conn) -> list[tuple[Key, RowStatus]]:
            rows = conn.execute(_PURGE_RETIRED, params).fetchall()
            return [((str(t), str(g)), status) for t, g, status in rows]  # type: ignore[misc]

        return await self._runner.run_in_transaction(purge)

    async def purge_rejected(self, older_than_s: float, limit: int) -> int:
        params = {"age": older_than_s, "limit": limit}
        return await self._runner.run_in_transaction(
            lambda conn: conn.execute(_PURGE_REJECTED, params).rowcount
        )


def _chunks(items: list[T]) -> Iterator[list[T]]:
    for i in range(0, len(items), BULK_ROWS):
        yield items[i : i + BULK_ROWS]


def _snapshot(conn: Conn) -> tuple[int, str]:
    """(xmin as the next change read's cursor, xmax as this read's bound)."""
    row = conn.execute(_SNAPSHOT).fetchone()
    assert row is not None
    return int(str(row[0])), str(row[1])


def _load_chunk(
    rows: list[tuple[Any, ...]], resume: LoadPosition | None, cursor: int | None
) -> LoadChunk:
    online: list[tuple[str, list[str], list[float]]] = []
    others: list[GatewayRow] = []
    for tenant, gateways, seen, other_ids, statuses, last_seen, status_seen in rows:
        # One str object per tenant (interned), not one per row: the leader keeps these keys.
        tenant = intern(tenant)
        if gateways:
            online.append((tenant, gateways, seen))
        if other_ids:
            others += [
                GatewayRow((tenant, g), at, status, since)
                for g, status, at, since in zip(
                    other_ids, statuses, last_seen, status_seen, strict=True
                )
            ]
    return LoadChunk(online, others, resume, cursor)


def _rows(rows: list[tuple[object, ...]]) -> list[GatewayRow]:
    return [
        GatewayRow((str(t), str(g)), seen, status, status_seen)  # type: ignore[arg-type]
        for t, g, seen, status, status_seen in rows
    ]
