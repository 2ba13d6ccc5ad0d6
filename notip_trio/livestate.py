"""Liveness state in PostgreSQL (docs/contract.md Behaviour 8, 9): the table and its statements.

One row per gateway in `gateway_liveness`, beside `telemetry`:

- `last_seen`: when the gateway's newest message reached the stream (the
  timestamp of its ack subject): the same on every replica and every
  redelivery. Every replica collects it from the batches it commits
  (`ingest.SeenBuffer`, newest per gateway) and writes it in one upsert of
  its own, at most every 200 ms (`run_seen_flusher`, `record_seen`): off the
  ingest path, and a gateway heard many times meanwhile is written once; the
  messages are acknowledged only after that upsert commits. It never moves
  backwards. (Measured: the same upsert inside each batch's COPY transaction
  cost 62% of the write path's throughput with 1,000 gateways per batch.)
- `status`: `new` (never reported), `online`, `offline`, or `decommissioned`
  (a tombstone: the leader learns of the removal like any other change); a
  message after a decommission makes the gateway `new` again (first seen).
- `status_last_seen` / `status_at`: the last-seen the last transition was for
  (an offline alert's `lastSeen`) and when it was made.
- `changed_xid`: the transaction that last changed the row. The leader reads
  changes incrementally: every row with `changed_xid >= cursor`, the cursor
  being the oldest transaction still running when it last looked
  (`pg_snapshot_xmin`), so a change committed late is never skipped. A row may
  be read twice; applying it is idempotent. Cost: O(changed), never O(tracked).

Transitions are conditional updates (`mark_online`, `mark_offline`, and
`mark_offline_many` for a tick's many candidates, `BULK_ROWS` a statement): only the
caller whose update wins reports the transition, so an old and a new leader
cannot both report it. The report is durable with the transition: the same
statement queues it in `gateway_status_outbox` (one row per transition, in
commit order per gateway), and the leader's dispatcher (`dispatch.py`) sends
and deletes it; a leader that dies leaves it for the next. A queued report
whose gateway has made a newer transition since that is *not* queued (a
release without the outbox made and sent it) is `superseded`: sending it
would put an older update after a newer one. Row locks are always taken in (tenant_id, gateway_id)
order under the "C" collation, Python's own string order, so the leader and
the ingest transactions of every replica never deadlock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeVar

from .db.pool import Conn
from .lanes import Key

RowStatus = Literal["new", "online", "offline", "decommissioned"]
T = TypeVar("T")

_RECORD_SEEN: Final = """
INSERT INTO gateway_liveness AS g (tenant_id, gateway_id, last_seen)
SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[])
ON CONFLICT (tenant_id, gateway_id) DO UPDATE
   SET last_seen = EXCLUDED.last_seen,
       status = CASE WHEN g.status = 'decommissioned' THEN 'new' ELSE g.status END,
       changed_xid = pg_current_xact_id()
 WHERE g.last_seen < EXCLUDED.last_seen
"""
_CURSOR: Final = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text"
_COLUMNS: Final = "tenant_id, gateway_id, last_seen, status, status_last_seen"
_LOAD: Final = f"SELECT {_COLUMNS} FROM gateway_liveness WHERE status <> 'decommissioned'"
_CHANGES: Final = f"SELECT {_COLUMNS} FROM gateway_liveness WHERE changed_xid >= %s::text::xid8"
_CURRENT: Final = (
    "SELECT last_seen FROM gateway_liveness"
    " WHERE tenant_id = %s AND gateway_id = %s AND status <> 'decommissioned'"
)
_LOCK_ROWS: Final = """
SELECT 1 FROM gateway_liveness g
  JOIN unnest(%s::text[], %s::text[]) AS k(tenant_id, gateway_id) USING (tenant_id, gateway_id)
 ORDER BY g.tenant_id COLLATE "C", g.gateway_id COLLATE "C"
   FOR UPDATE OF g
"""
# A transition and its report, in one statement (so in one transaction).
_MARK_ONLINE: Final = """
WITH won AS (
    UPDATE gateway_liveness g
       SET status = 'online', status_last_seen = g.last_seen, status_at = now(),
           changed_xid = pg_current_xact_id()
      FROM unnest(%s::text[], %s::text[]) AS k(tenant_id, gateway_id)
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
  JOIN unnest(%s::text[], %s::text[]) AS k(tenant_id, gateway_id) USING (tenant_id, gateway_id)
 WHERE g.status <> 'decommissioned'
"""
_MARK_OFFLINE_MANY: Final = """
WITH won AS (
    UPDATE gateway_liveness g
       SET status = 'offline', status_last_seen = k.alerted, status_at = now(),
           changed_xid = pg_current_xact_id()
      FROM unnest(%s::text[], %s::text[], %s::timestamptz[]) AS k(tenant_id, gateway_id, alerted)
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
# Rows per bulk statement: a few thousand keep each round trip well inside the
# write deadline and its locks short.
BULK_ROWS: Final = 2000
_PENDING_REPORTS: Final = """
SELECT o.id, o.tenant_id, o.gateway_id, o.status, o.last_seen,
       coalesce(g.status_at > o.transition_at, false) AND NOT EXISTS (
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

@dataclass(frozen=True, slots=True)
class GatewayRow:
    key: Key
    last_seen: dt.datetime
    status: RowStatus
    status_last_seen: dt.datetime | None


@dataclass(frozen=True, slots=True)
class Report:
    """A transition's status update, queued in the outbox with the transition."""

    id: int
    key: Key
    status: Literal["online", "offline"]
    last_seen: dt.datetime  # the update's last_seen_at
    superseded: bool  # a newer transition of the gateway was reported without the outbox


@dataclass(frozen=True, slots=True)
class Reports:
    reports: list[Report]  # the oldest pending ones, in queue order
    pending: int  # how many are pending in all


@dataclass(frozen=True, slots=True)
class Changes:
    rows: list[GatewayRow]
    cursor: int  # pass to the next `changes` call


class StateStore(Protocol):
    """The liveness state as every replica's ingest writes it and the leader sees
    it; errors are `DatabaseError`."""

    async def record_seen(self, seen: Mapping[Key, dt.datetime]) -> None:
        """Write gateways' last-seen (never backwards; a tombstone becomes new)."""
        ...

    async def load(self) -> Changes:
        """Every tracked gateway (not decommissioned), and the cursor for `changes`."""
        ...

    async def changes(self, cursor: int) -> Changes:
        """Every row changed since `cursor` (decommissioned ones included)."""
        ...

    async def current_last_seen(self, key: Key) -> dt.datetime | None:
        """The gateway's last-seen now; None if it is gone (decommissioned)."""
        ...

    async def mark_online(self, keys: Sequence[Key]) -> list[tuple[Key, dt.datetime]]:
        """Make new gateways, and offline ones heard since, online, each with its
        report queued in the outbox; returns those this call changed (with their
        last-seen)."""
        ...

    async def mark_offline(self, key: Key, last_seen: dt.datetime) -> dt.datetime | None:
        """Online → offline for the silence that ended at `last_seen`, with its
        report queued; the gateway's current last-seen if this call made the
        change, else None."""
        ...

    async def current_last_seen_many(self, keys: Sequence[Key]) -> dict[Key, dt.datetime]:
        """`current_last_seen` for many gateways (those gone are left out)."""
        ...

    async def mark_offline_many(
        self, alerted: Mapping[Key, dt.datetime]
    ) -> dict[Key, dt.datetime]:
        """`mark_offline` for many gateways (key: the last-seen its alert was for),
        in key order; returns those this call changed, with their current last-seen.
        Each `BULK_ROWS` commit on their own: on DatabaseError the ones before stay
        changed (and their reports queued)."""
        ...

    async def pending_reports(self, limit: int) -> Reports:
        """The oldest `limit` queued reports (outbox order) and the pending count."""
        ...

    async def clear_reports(self, ids: Sequence[int]) -> None:
        """Remove delivered (or given-up) reports from the outbox."""
        ...

    async def decommission(self, key: Key, at: dt.datetime) -> bool:
        """Forget the gateway: a tombstone as of `at` (the decommission message's
        stream time); False if it was not tracked."""
        ...


class Runner(Protocol):
    async def run_in_transaction(self, fn: Callable[[Conn], T]) -> T: ...


class SeenRecorder(Protocol):
    async def record_seen(self, seen: Mapping[Key, dt.datetime]) -> None:
        """Write last-seen times (one transaction); DatabaseError on failure."""
        ...


def record_seen(conn: Conn, seen: Mapping[Key, dt.datetime]) -> None:
    """Upsert each gateway's last-seen, in the caller's transaction."""
    if not seen:
        return
    keys = sorted(seen)  # lock order: see the module docstring
    conn.execute(
        _RECORD_SEEN, ([k[0] for k in keys], [k[1] for k in keys], [seen[k] for k in keys])
    )


class PgStateStore:
    """`StateStore` on the daemon's pool (`Storage.run_in_transaction`)."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    async def load(self) -> Changes:
        def load(conn: Conn) -> Changes:
            cursor = _cursor(conn)
            return Changes(_rows(conn.execute(_LOAD).fetchall()), cursor)

        return await self._runner.run_in_transaction(load)

    async def changes(self, cursor: int) -> Changes:
        def changes(conn: Conn) -> Changes:
            new_cursor = _cursor(conn)  # before the read: a conservative cursor
            return Changes(_rows(conn.execute(_CHANGES, (str(cursor),)).fetchall()), new_cursor)

        return await self._runner.run_in_transaction(changes)

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
            conn.execute(_LOCK_ROWS, args)
            rows = conn.execute(_MARK_ONLINE, args).fetchall()
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

    async def mark_offline_many(
        self, alerted: Mapping[Key, dt.datetime]
    ) -> dict[Key, dt.datetime]:
        won: dict[Key, dt.datetime] = {}
        for chunk in _chunks(sorted(alerted)):  # lock order: see the module docstring
            keys = ([k[0] for k in chunk], [k[1] for k in chunk])
            args = (*keys, [alerted[k] for k in chunk])

            def mark(
                conn: Conn, keys: tuple[list[str], list[str]] = keys, args: tuple[Any, ...] = args
            ) -> list[Any]:
                conn.execute(_LOCK_ROWS, keys)
                return conn.execute(_MARK_OFFLINE_MANY, args).fetchall()

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


def _chunks(items: list[T]) -> Iterator[list[T]]:
    for i in range(0, len(items), BULK_ROWS):
        yield items[i : i + BULK_ROWS]


def _cursor(conn: Conn) -> int:
    row = conn.execute(_CURSOR).fetchone()
    assert row is not None
    return int(str(row[0]))


def _rows(rows: list[tuple[object, ...]]) -> list[GatewayRow]:
    return [
        GatewayRow((str(t), str(g)), seen, status, status_seen)  # type: ignore[arg-type]
        for t, g, seen, status, status_seen in rows
    ]
