"""Benchmark children that consume from JetStream under trio + trio-asyncio.

Each mode runs in a fresh process with the daemon's environment (its Settings,
its mTLS identity, its NatsBridge connection) against a stream that already
holds `total` messages, and reports msgs/s from the first pull request until
the consumer shows every message acked (num_pending == 0 == num_ack_pending):

- `ceiling-n`: NatsBridge.run_pull with the daemon's PullSpec, each batch acked
  in one crossing; no decoding, no database. The NATS-side ceiling.
- `baseline-g`: the Go service's write strategy on the same fast pull path:
  rows go out in transactions of 100 single-row INSERTs sent together
  (psycopg executemany = pipeline mode), a partial batch after 500 ms; ack
  after commit; one transaction at a time.
- `naive`: what a first port looks like: nats-py's pull_subscribe + fetch(100),
  then the 100 INSERTs as above, then ack each message; one step after another.

Usage: python -m benchmarks.pull '{"mode": "ceiling-n", "total": 200000}'
"""

from __future__ import annotations

# trio_asyncio must be imported before psycopg (docs/pitfalls.md).
import trio_asyncio  # isort: split

import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import nats.errors
import psycopg
import trio

from benchmarks.common import child_main
from notip_trio.config import Settings, load_settings
from notip_trio.db.schema import COLUMNS
from notip_trio.db.writer import Storage
from notip_trio.envelope import Row, decode
from notip_trio.js.bridge import NatsBridge
from notip_trio.js.delivery import JsMsg
from notip_trio.js.specs import telemetry_spec

GO_BATCH = 100
GO_FLUSH_S = 0.5
_INSERT = (
    f"INSERT INTO telemetry ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
)


async def _connect(settings: Settings) -> NatsBridge:
    return await NatsBridge.from_settings(settings, name="notip-bench")


async def _await_drained(bridge: NatsBridge, durable: str) -> None:
    """Flush our acks, then wait until the server has seen every one of them."""
    await trio_asyncio.aio_as_trio(bridge.nc.flush)(10)
    # Remote state has no Event to wait on: poll it.
    info = trio_asyncio.aio_as_trio(bridge.js.consumer_info)
    while True:
        state = await info("TELEMETRY", durable)
        if (state.num_pending, state.num_ack_pending) == (0, 0):
            return
        await trio.sleep(0.002)


def _decode_rows(msgs: Sequence[JsMsg], max_body: int) -> list[Row]:
    rows = []
    for m in msgs:
        row = decode(m.subject, m.data, max_body=max_body)
        if not isinstance(row, Row):
            raise RuntimeError(f"bench message rejected: {row}")
        rows.append(row)
    return rows


def _insert_sync(conn: psycopg.Connection[Any], rows: Sequence[Row]) -> None:
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(_INSERT, rows)


async def _migrated_connection(settings: Settings) -> psycopg.Connection[Any]:
    """The daemon's schema in place (same table, indexes, constraints), and one plain
    connection for the INSERT strategies."""
    storage = Storage.create(settings.db_conninfo(), min_size=1, max_size=1)
    await storage.open(timeout_s=30)
    await storage.migrate()
    await storage.close()
    return await trio.to_thread.run_sync(lambda: psycopg.connect(settings.db_conninfo()))


@asynccontextmanager
async def _pulling(
    settings: Settings,
) -> AsyncIterator[tuple[NatsBridge, str, trio.MemoryReceiveChannel[list[JsMsg]], float]]:
    """The daemon's pull path running: (bridge, durable, batches, start time).

    The start time is taken just before the pull slots start, as the daemon's
    own pulling would; the bridge is closed on the way out.
    """
    bridge = await _connect(settings)
    try:
        pull = telemetry_spec(settings)
        await bridge.ensure_pull_consumer(pull)
        tx, rx = trio.open_memory_channel[list[JsMsg]](settings.telemetry_pipeline_depth)
        async with trio.open_nursery() as nursery:
            t0 = time.perf_counter()
            await nursery.start(bridge.run_pull, pull, tx)
            yield bridge, pull.durable, rx, t0
            nursery.cancel_scope.cancel()
    finally:
        await bridge.close()


async def _ceiling_n(spec: dict[str, Any]) -> dict[str, Any]:
    settings = load_settings()
    total = int(spec["total"])
    async with trio_asyncio.open_loop(), _pulling(settings) as (bridge, durable, rx, t0):
        got = 0
        async with rx:
            async for batch in rx:
                await bridge.ack(batch)
                got += len(batch)
                if got >= total:
                    break
        await _await_drained(bridge, durable)
        elapsed = time.perf_counter() - t0
    return {"msgs": got, "seconds": elapsed, "rate": got / elapsed}


async def _baseline_g(spec: dict[str, Any]) -> dict[str, Any]:
    settings = load_settings()
    total = int(spec["total"])
    conn = await _migrated_connection(settings)
    async with trio_asyncio.open_loop(), _pulling(settings) as (bridge, durable, rx, t0):
        done = 0
        pending: list[JsMsg] = []
        flush_at = trio.current_time() + GO_FLUSH_S
        async with rx:
            while done < total:
                if len(pending) < GO_BATCH:
                    with trio.move_on_at(flush_at):
                        pending += await rx.receive()
                        continue
                if not pending:
                    flush_at = trio.current_time() + GO_FLUSH_S
                    continue
                batch, pending = pending[:GO_BATCH], pending[GO_BATCH:]
                rows = _decode_rows(batch, settings.telemetry_max_body_bytes)
                await trio.to_thread.run_sync(_insert_sync, conn, rows)
                await bridge.ack(batch)
                done += len(batch)
                flush_at = trio.current_time() + GO_FLUSH_S
        await _await_drained(bridge, durable)
        elapsed = time.perf_counter() - t0
    conn.close()
    return {"msgs": done, "seconds": elapsed, "rate": done / elapsed}


async def _naive(spec: dict[str, Any]) -> dict[str, Any]:
    settings = load_settings()
    total = int(spec["total"])
    durable = settings.nats_consumer_durable_name
    conn = await _migrated_connection(settings)
    aio = trio_asyncio.aio_as_trio
    async with trio_asyncio.open_loop():
        bridge = await _connect(settings)
        psub = await aio(bridge.js.pull_subscribe)(
            "telemetry.data.>", durable=durable, stream="TELEMETRY"
        )

        async def ack_each(msgs: Sequence[Any]) -> None:
            for m in msgs:
                await m.ack()

        t0 = time.perf_counter()
        done = 0
        while done < total:
            try:
                msgs = await aio(psub.fetch)(GO_BATCH, timeout=GO_FLUSH_S)
            except nats.errors.TimeoutError:
                continue
            rows = [
                row
                for m in msgs
                if isinstance(
                    row := decode(m.subject, m.data, max_body=settings.telemetry_max_body_bytes),
                    Row,
                )
            ]
            await trio.to_thread.run_sync(_insert_sync, conn, rows)
            await aio(ack_each)(msgs)
            done += len(msgs)
        await _await_drained(bridge, durable)
        elapsed = time.perf_counter() - t0
        await bridge.close()
    conn.close()
    return {"msgs": done, "seconds": elapsed, "rate": done / elapsed}


def _sync(fn: Any) -> Any:
    return lambda spec: trio.run(fn, spec)


MODES = {"ceiling-n": _sync(_ceiling_n), "baseline-g": _sync(_baseline_g), "naive": _sync(_naive)}

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:], MODES))
