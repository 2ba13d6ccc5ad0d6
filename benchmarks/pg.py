"""Benchmark children that write to PostgreSQL only (no NATS).

- `ceiling-p`: the rows of the message file, decoded beforehand (not timed),
  written with `Storage.write_batch` (binary COPY straight into `telemetry`,
  one transaction per batch, in a worker thread) in the daemon's batch size,
  one batch after another, into a freshly migrated table: the database-side
  ceiling of the daemon's own write path.
- `copy-compare` (decision benchmark a): COPY of `rows` rows in transactions
  of `batch` rows from psycopg's *sync* connection in `trio.to_thread` versus
  psycopg's *async* connection driven through trio-asyncio. Rounds alternate
  and the table is truncated between rounds; the best round of each counts.

Usage: python -m benchmarks.pg '{"mode": "ceiling-p", "file": "...", ...}'
"""

from __future__ import annotations

# trio_asyncio must be imported before psycopg (docs/pitfalls.md).
import trio_asyncio  # isort: split

import datetime as dt
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import trio

from benchmarks.common import child_main, chunks, read_messages
from notip_trio.config import load_settings
from notip_trio.db.liveness import PgStateStore
from notip_trio.db.schema import COLUMNS
from notip_trio.db.writer import Storage
from notip_trio.envelope import Row, decode

_COPY = f"COPY telemetry ({', '.join(COLUMNS)}) FROM STDIN (FORMAT BINARY)"
_TYPES = ("timestamptz", "text", "text", "text", "text", "text", "text", "text", "int4")


def load_rows(path: Path, limit: int | None = None) -> list[Row]:
    rows = []
    for subject, body in read_messages(path)[:limit]:
        row = decode(subject, body, max_body=1 << 20)
        assert isinstance(row, Row), row
        rows.append(row)
    return rows


async def _migrated_storage() -> Storage:
    settings = load_settings()
    storage = Storage.create(settings.db_conninfo(), min_size=1, max_size=2)
    await storage.open(timeout_s=30)
    await storage.migrate()
    return storage


def _seen(part: Sequence[Row]) -> dict[tuple[str, str], dt.datetime]:
    """Each gateway's newest time in the batch: what ingest records with it."""
    out: dict[tuple[str, str], dt.datetime] = {}
    for row in part:
        key = (row.tenant_id, row.gateway_id)
        if key not in out or row.time > out[key]:
            out[key] = row.time
    return out


async def _ceiling_p(spec: dict[str, Any]) -> dict[str, Any]:
    """The daemon's write path (COPY, one transaction per batch), then what the
    last-seen flusher adds: one upsert per batch's gateways (as if each batch
    were one second's worth), timed apart on the same data."""
    rows = load_rows(Path(spec["file"]))
    batch = int(spec["batch"])
    parts = list(chunks(rows, batch))
    seen = [_seen(part) for part in parts]
    storage = await _migrated_storage()
    store = PgStateStore(storage)
    try:
        t0 = time.perf_counter()
        for part in parts:
            await storage.write_batch(part, ())
        elapsed = time.perf_counter() - t0
        t0 = time.perf_counter()
        for part_seen in seen:
            await store.record_seen(part_seen)
        flush_s = time.perf_counter() - t0
    finally:
        await storage.close()
    upserts = sum(len(m) for m in seen)
    return {
        "msgs": len(rows),
        "seconds": elapsed,
        "rate": len(rows) / elapsed,
        "batch": batch,
        "last_seen_upserts_per_s": upserts / flush_s,
        "last_seen_share": flush_s / (elapsed + flush_s),
        "gateways_per_batch": statistics.mean(len(m) for m in seen),
    }


def _copy_sync(conn: psycopg.Connection[Any], rows: Sequence[Row]) -> None:
    with conn.transaction(), conn.cursor().copy(_COPY) as copy:
        copy.set_types(_TYPES)
        for row in rows:
            copy.write_row(row)


async def _copy_async(conn: psycopg.AsyncConnection[Any], rows: Sequence[Row]) -> None:
    async with conn.transaction(), conn.cursor().copy(_COPY) as copy:
        copy.set_types(_TYPES)
        for row in rows:
            await copy.write_row(row)


def _truncate(conn: psycopg.Connection[Any]) -> None:
    conn.execute("TRUNCATE telemetry")
    conn.commit()


async def _copy_compare(spec: dict[str, Any]) -> dict[str, Any]:
    rows = load_rows(Path(spec["file"]), int(spec["rows"]))
    rounds = int(spec.get("rounds", 3))
    conninfo = load_settings().db_conninfo()
    await (await _migrated_storage()).close()
    out: dict[str, Any] = {"rows": len(rows)}
    async with trio_asyncio.open_loop():
        sync_conn = await trio.to_thread.run_sync(lambda: psycopg.connect(conninfo))
        async_conn = await trio_asyncio.aio_as_trio(psycopg.AsyncConnection.connect)(conninfo)
        for batch in spec["batches"]:
            best = {"thread": float("inf"), "trio_asyncio": float("inf")}
            for _ in range(rounds):
                for how in best:
                    await trio.to_thread.run_sync(_truncate, sync_conn)
                    t0 = time.perf_counter()
                    for part in chunks(rows, batch):
                        if how == "thread":
                            await trio.to_thread.run_sync(_copy_sync, sync_conn, part)
                        else:
                            await trio_asyncio.aio_as_trio(_copy_async)(async_conn, part)
                    best[how] = min(best[how], time.perf_counter() - t0)
            out[str(batch)] = {how: len(rows) / secs for how, secs in best.items()}
        await trio_asyncio.aio_as_trio(async_conn.close)()
        sync_conn.close()
    return out


def _sync(fn: Any) -> Any:
    return lambda spec: trio.run(fn, spec)


MODES = {"ceiling-p": _sync(_ceiling_p), "copy-compare": _sync(_copy_compare)}

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:], MODES))
