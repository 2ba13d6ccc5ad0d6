"""Liveness state in PostgreSQL (docs/contract.md Behaviour 8, 9): the table and its statements.

One row per gateway in `gateway_liveness`, beside `telemetry`:

- `last_seen`: when the gateway's newest message reached the stream (the
  timestamp of its ack subject): the same on every replica and every
  redelivery. Every replica collects it from the batches it commits
  (`ingest.SeenBuffer`, newest per gateway) and writes it in upserts of its
  own (`SEEN_CHUNK` gateways each), at most every 100 ms (`run_seen_flusher`,
  `record_seen`): off the ingest path, and a gateway heard many times
  meanwhile is written once; the messages are acknowledged only after those
  upserts commit. It never moves
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

Every read and write is bounded per round trip, each under its own deadline
(`db/pool.py`), so none grows with the fleet: the takeover load reads the
table in ranges of its blocks, about `LOAD_CHUNK` rows per round trip (a row
that changes meanwhile may be missed or read twice there: its new
transaction id is at or above the load's cursor, so the first change read
after the load has it); a change
read pages by (changed_xid, key), `CHANGES_CHUNK` rows per round trip, up to
the first read's snapshot (its `xmax`): a transaction that started later has
an id at or above the new cursor, so the next read has it, and a busy table
cannot keep one read going for ever; the last-seen flush writes
`SEEN_CHUNK` gateways per transaction (`ingest.flush_seen`). Between round
trips rows may change again: such a row is read at its newer state or, its
new transaction id being above the new cursor, at the next read.

The statements and `PgStateStore`, the implementation on PostgreSQL, are in
`db/liveness.py`; this module holds the types, the protocols and the sizes.

Transitions are conditional updates (`mark_online`, `mark_offline`, and
`mark_offline_many` for a tick's many candidates, `BULK_ROWS` a statement): only the
caller whose update wins reports the transition, so an old and a new leader
cannot both report it. The report is durable with the transition: the same
statement queues it in `gateway_status_outbox` (one row per transition, in
commit order per gateway), and the leader's dispatcher (`dispatch.py`) sends
and deletes it; a leader that dies leaves it for the next. A queued report
whose gateway has made a newer transition since that is *not* queued (a
release without the outbox made and sent it), or that was decommissioned, is
`superseded`: sending it would put an older update after a newer one. It is
judged by value (the gateway's current status and status_last_seen against
the report's), not by time. Row locks are always taken in (tenant_id, gateway_id)
order under the "C" collation, Python's own string order, so the leader and
the ingest transactions of every replica never deadlock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol, TypeVar

from .db.pool import Conn
from .lanes import Key

RowStatus = Literal["new", "online", "offline", "decommissioned"]
T = TypeVar("T")

# Rows per round trip (see the module docstring). Measured on 2 cores
# (BENCHMARKS.md): a 50,000-row chunk of the load takes ~60 ms, a 10,000-gateway
# last-seen upsert ~100 ms: far inside the 15 s deadline, few enough round trips.
LOAD_CHUNK: Final = 50_000
CHANGES_CHUNK: Final = 20_000
SEEN_CHUNK: Final = 10_000
# Retired rows (offline, decommissioned) and old rejects purged per statement
# (`janitor.py`): small, so a purge never holds many row locks or a long transaction.
PURGE_BATCH: Final = 1_000
# Rows per bulk statement: a few thousand keep each round trip well inside the
# write deadline and its locks short.
BULK_ROWS: Final = 2000


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


# Where the next chunk of a takeover load starts: opaque to the tracker, each
# store its own (PostgreSQL: a block range).
LoadPosition = tuple[object, ...]


@dataclass(frozen=True, slots=True)
class LoadChunk:
    """One round trip of the takeover load."""

    # Online gateways by tenant: (tenant_id, gateway ids, their last-seen in
    # epoch seconds), so a million of them cost no Python step each.
    online: list[tuple[str, list[str], list[float]]]
    rows: list[GatewayRow]  # every other tracked one (new, offline)
    resume: LoadPosition | None  # pass as `after` for the next chunk; None: the last
    cursor: int | None  # for `changes`, from the first chunk (read before it)

    def __len__(self) -> int:
        return sum(len(gateways) for _, gateways, _ in self.online) + len(self.rows)

    def online_keys(self) -> Iterator[tuple[Key, float]]:
        """The online gateways one by one (tests, tools)."""
        for tenant, gateways, seen in self.online:
            for gateway, at in zip(gateways, seen, strict=True):
                yield (tenant, gateway), at


class Purger(Protocol):
    """What the leader's janitor deletes (`janitor.py`); errors are `DatabaseError`."""

    async def purge_retired(self, older_than_s: float, limit: int) -> list[tuple[Key, RowStatus]]:
        """Delete up to `limit` offline rows and tombstones whose transition and
        last message are older than `older_than_s`; returns them."""
        ...

    async def purge_rejected(self, older_than_s: float, limit: int) -> int:
        """Delete up to `limit` rejected messages received more than
        `older_than_s` ago; returns how many."""
        ...


class StateStore(Purger, Protocol):
    """The liveness state as every replica's ingest writes it and the leader sees
    it (and purges); errors are `DatabaseError`."""

    async def record_seen(self, seen: Mapping[Key, dt.datetime]) -> None:
        """Write gateways' last-seen (never backwards; a tombstone becomes new)."""
        ...

    async def load_chunk(self, after: LoadPosition | None) -> LoadChunk:
        """The next tracked gateways (not decommissioned), from `after` (from the
        start, with the cursor for `changes`, when None). A gateway changed
        during the load may be missing or come twice: the first `changes(cursor)`
        after the load reads it again."""
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

    async def mark_offline_many(self, alerted: Mapping[Key, dt.datetime]) -> dict[Key, dt.datetime]:
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
