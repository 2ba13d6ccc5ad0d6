"""Benchmark children for liveness with its state in PostgreSQL.

- `tick`: for each size, a freshly migrated database whose `gateway_liveness`
  holds that many online gateways (COPY, not timed), 1% of them last heard long
  enough ago to be due. A `LivenessTracker` on the real `PgStateStore`, with
  stand-ins that answer at once (get-status says online, the publisher acks,
  the sink drops), takes over (timed: the load of the whole state), ticks once
  with the 1% due (get-status, re-read, alert, conditional offline), then the
  median of 5 ticks with none due. Then a tick after 1% of the gateways were
  heard again (the incremental read: O(changed)).
- `outage`: issue 20's mass outage: a table of `size` online gateways, 10% of
  them silent long enough to be due at once; the leader (the real
  `MgmtClient` with its retry policy and the breaker, logging at INFO to a
  pipe like the daemon) ticks once. Twice: with a management API and
  JetStream stand-ins that answer in 1 ms, and with a management API that
  never answers. Timed: the tick (every one alerted and marked offline: counted
  in the table and the outbox afterwards), then the median of 5 ticks with none
  due. Then the same wave through the leader's real loop (`lead_liveness`,
  HEARTBEAT_TICK_MS as by default): the 10% become due together WAVE_LEAD_S
  after the table was filled, after the takeover; timed from that moment until
  the first and the last of them is alerted and marked offline.
- `rss`: the takeover's memory per tracked gateway: RSS before and after, and
  what tracemalloc counts as still allocated by it (the tracker's own objects).
- `flush`: the last-seen flush after a database outage: a `SeenBuffer` holding
  every gateway of a fleet of that size (one message each), a first flush that
  fails (the outage: everything put back), then the time until `flush_seen`
  has written all of it in `SEEN_CHUNK`-gateway transactions and acked.

Needs the daemon's DB_* variables (a database of its own).

Usage: python -m benchmarks.liveness '{"mode": "tick", "sizes": [10000]}'
"""

from __future__ import annotations

# trio_asyncio must be imported before psycopg (docs/pitfalls.md).
import contextlib
import datetime as dt
import functools
import gc
import json
import statistics
import sys
import time
import tracemalloc
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
import trio

from benchmarks.common import child_main, rss_bytes
from notip_trio.alertconfig import AlertConfigCache
from notip_trio.alerting import StatusQuery
from notip_trio.config import DEFAULTS, load_settings
from notip_trio.db.liveness import PgStateStore, record_seen
from notip_trio.db.writer import Storage
from notip_trio.errors import DatabaseError
from notip_trio.horizon import Horizon
from notip_trio.ingest import SeenBuffer, flush_seen
from notip_trio.js.bridge import AlertPublisher
from notip_trio.js.delivery import JsMsg
from notip_trio.lanes import Key
from notip_trio.liveness import LivenessTracker
from notip_trio.log import setup_logging
from notip_trio.metrics import Metrics
from notip_trio.mgmt import CallGate, GatewayState, MgmtClient
from notip_trio.ticking import lead_liveness

TIMEOUT_MS = 60_000
STANDIN_DELAY_S = 0.001
# The wave becomes due this long after the fill: past the takeover (3 s at 1M).
WAVE_LEAD_S = 12.0
# The others were last heard over this span before the fill (none due during a run).
SPREAD_S = 20.0


class _Instant:
    """StatusQuery, AlertPublisher, StatusSink and AlertHorizon, all answering at once."""

    def __init__(self) -> None:
        self.alerts = 0

    async def get_status(
        self, tenant_id: str, gateway_id: str, *, gate: CallGate | None = None
    ) -> GatewayState:
        return "online"

    async def publish(self, subject: str, payload: bytes, *, msg_id: str) -> None:
        self.alerts += 1

    def wake(self) -> None:
        pass

    async def read(self) -> Horizon:
        now = time.time()
        return Horizon(at=now, now=now, bounded=False)


class _Standins:
    """The management API (a `Requester` for the real `MgmtClient`) and JetStream
    (an `AlertPublisher`), answering 1 to 2 ms after each request (the second
    beat of a shared 1 ms clock: one timer for every request in flight, so the
    stand-ins' own cost stays small beside the leader's); `never`: get-status
    never answers. `run` drives the clock."""

    def __init__(self, delay_s: float, *, never: bool) -> None:
        self.delay_s = delay_s
        self.never = never
        self.requests = 0
        self.alerts = 0
        self.first_alert: float | None = None  # time.time()
        self._beats = [trio.Event(), trio.Event()]

    async def run(self) -> None:
        while True:
            await trio.sleep(self.delay_s)
            beat = self._beats.pop(0)
            self._beats.append(trio.Event())
            beat.set()

    async def _answer(self) -> None:
        await self._beats[1].wait()  # at least one full period from now

    async def request(self, subject: str, payload: bytes) -> bytes:
        self.requests += 1
        if self.never:
            await trio.sleep_forever()
        await self._answer()
        gateway = json.loads(payload)["gateway_id"]
        return json.dumps({"gateway_id": gateway, "state": "online"}).encode()

    async def publish(self, subject: str, payload: bytes, *, msg_id: str) -> None:
        await self._answer()
        self.alerts += 1
        if self.first_alert is None:
            self.first_alert = time.time()


def fleet_keys(count: int) -> list[Key]:
    """`count` gateway keys over 100 tenants (also the database-outage benchmark's fleet)."""
    return [(f"tenant-{i % 100:03d}", f"gw-{i // 100:06d}-{i % 100:03d}") for i in range(count)]


def fill_state(
    conninfo: str,
    keys: list[Key],
    due: int,
    *,
    due_in_s: float = -5.0,
    spread_s: float = SPREAD_S,
) -> dt.datetime:
    """`keys` online in a truncated `gateway_liveness`, seen over the last
    `spread_s` (as a live fleet's heartbeats are: the takeover sorts them); the
    first `due` of them seen so as to become due together `due_in_s` from now
    (already due by default); returns that now."""
    now = dt.datetime.now(dt.UTC)
    old = now - dt.timedelta(milliseconds=TIMEOUT_MS) + dt.timedelta(seconds=due_in_s)
    with psycopg.connect(conninfo) as conn:
        conn.execute("TRUNCATE gateway_liveness, gateway_status_outbox")
        with conn.cursor().copy(
            "COPY gateway_liveness (tenant_id, gateway_id, last_seen, status, status_last_seen)"
            " FROM STDIN"
        ) as copy:
            for i, (tenant, gateway) in enumerate(keys):
                spread = dt.timedelta(seconds=spread_s * (i * 0.6180339887 % 1))
                seen = old if i < due else now - spread
                copy.write_row((tenant, gateway, seen, "online", seen))
        conn.execute("ANALYZE gateway_liveness")
    return now


def _touch(conninfo: str, keys: list[Key]) -> None:
    """What ingest does: record last-seen for `keys` (one transaction)."""
    now = dt.datetime.now(dt.UTC)
    with psycopg.connect(conninfo) as conn, conn.transaction():
        record_seen(conn, dict.fromkeys(keys, now))


async def _storage() -> tuple[Storage, str]:
    settings = load_settings()
    storage = Storage.create(settings.db_conninfo(), min_size=1, max_size=4)
    await storage.open(timeout_s=30)
    await storage.migrate()
    return storage, settings.db_conninfo()


def _tracker(
    storage: Storage,
    fake: _Instant,
    status: StatusQuery | None = None,
    publisher: AlertPublisher | None = None,
    metrics: Metrics | None = None,
) -> LivenessTracker:
    return LivenessTracker(
        PgStateStore(storage),
        AlertConfigCache(TIMEOUT_MS),
        status or fake,
        publisher or fake,
        fake,
        metrics or Metrics(),
        fake,
        grace_until=0.0,
        concurrency=int(DEFAULTS["LIVENESS_QUERY_CONCURRENCY"]),
    )


async def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    await fn()
    return (time.perf_counter() - t0) * 1000


async def _tick_one(size: int) -> dict[str, Any]:
    storage, conninfo = await _storage()
    try:
        keys = fleet_keys(size)
        due = size // 100
        await trio.to_thread.run_sync(fill_state, conninfo, keys, due)
        fake = _Instant()
        tracker = _tracker(storage, fake)
        load_ms = await _timed(tracker.take_over)
        due_ms = await _timed(tracker.tick)
        if fake.alerts != due:
            raise RuntimeError(f"expected {due} alerts, got {fake.alerts}")
        none_due = [await _timed(tracker.tick) for _ in range(5)]
        await trio.to_thread.run_sync(_touch, conninfo, keys[due : due + size // 100])
        changed_ms = await _timed(tracker.tick)
    finally:
        await storage.close()
    return {
        "load_ms": load_ms,
        "one_pct_due_ms": due_ms,
        "none_due_ms": statistics.median(none_due),
        "none_due_all_ms": none_due,
        "one_pct_changed_ms": changed_ms,
        "due": due,
    }


def _tick(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in spec["sizes"]:
        out[str(size)] = trio.run(_tick_one, int(size))
        gc.collect()
    return out


def _offline_counts(conninfo: str) -> tuple[int, int]:
    with psycopg.connect(conninfo) as conn:
        offline = conn.execute(
            "SELECT count(*) FROM gateway_liveness WHERE status = 'offline'"
        ).fetchone()
        queued = conn.execute(
            "SELECT count(*) FROM gateway_status_outbox WHERE status = 'offline'"
        ).fetchone()
    assert offline is not None
    assert queued is not None
    return int(offline[0]), int(queued[0])


async def _outage_one(size: int, api: str) -> dict[str, Any]:
    storage, conninfo = await _storage()
    try:
        keys = fleet_keys(size)
        silent = size // 10
        await trio.to_thread.run_sync(fill_state, conninfo, keys, silent)
        standins = _Standins(STANDIN_DELAY_S, never=api == "never")
        tracker = _tracker(storage, _Instant(), MgmtClient(standins), standins)
        await tracker.take_over()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(standins.run)
            tick_ms = await _timed(tracker.tick)
            nursery.cancel_scope.cancel()
        offline, queued = await trio.to_thread.run_sync(_offline_counts, conninfo)
        if not standins.alerts == offline == queued == silent:
            raise RuntimeError(
                f"{silent} silent: {standins.alerts} alerts, {offline} offline, {queued} queued"
            )
        none_due = [await _timed(tracker.tick) for _ in range(5)]
    finally:
        await storage.close()
    return {
        "api": api,
        "silent": silent,
        "tick_ms": tick_ms,
        "get_status_requests": standins.requests,
        "none_due_ms": statistics.median(none_due),
        "none_due_all_ms": none_due,
    }


async def _wave_one(size: int, api: str) -> dict[str, Any]:
    """The wave through `lead_liveness`: see the module docstring."""
    storage, conninfo = await _storage()
    try:
        keys = fleet_keys(size)
        silent = size // 10
        due_at = time.time() + WAVE_LEAD_S
        await trio.to_thread.run_sync(
            functools.partial(fill_state, conninfo, keys, silent, due_in_s=WAVE_LEAD_S)
        )
        standins = _Standins(STANDIN_DELAY_S, never=api == "never")
        metrics = Metrics()
        tracker = _tracker(storage, _Instant(), MgmtClient(standins), standins, metrics)
        tick_s = int(DEFAULTS["HEARTBEAT_TICK_MS"]) / 1000
        with trio.fail_after(WAVE_LEAD_S + 120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(standins.run)
                nursery.start_soon(lead_liveness, tracker, tick_s)
                gauge = "notip_consumer_gateways_offline"
                # The gauge has no event to wait on: polled (20 ms, in the leader's thread).
                while metrics.registry.get_sample_value(gauge) != silent:  # noqa: ASYNC110
                    await trio.sleep(0.02)
                done = time.time()
                nursery.cancel_scope.cancel()
        offline, queued = await trio.to_thread.run_sync(_offline_counts, conninfo)
        if not standins.alerts == offline == queued == silent:
            raise RuntimeError(
                f"{silent} silent: {standins.alerts} alerts, {offline} offline, {queued} queued"
            )
        ticks = metrics.registry.get_sample_value(
            "notip_consumer_heartbeat_tick_duration_seconds_count"
        )
    finally:
        await storage.close()
    assert standins.first_alert is not None
    return {
        "api": api,
        "silent": silent,
        "tick_interval_s": tick_s,
        "first_alert_s": standins.first_alert - due_at,
        "all_offline_s": done - due_at,
        "ticks": ticks,
    }


def _outage(spec: dict[str, Any]) -> dict[str, Any]:
    # Logged like the daemon (one line per alert), into a pipe the parent drains.
    setup_logging("INFO")
    size = int(spec["size"])
    apis = spec.get("apis", ["1ms", "never"])
    out = {api: trio.run(_outage_one, size, api) for api in apis}
    for api in apis:
        gc.collect()
        out[api]["wave"] = trio.run(_wave_one, size, api)
    return {"size": size, "tick_interval_ms": int(DEFAULTS["HEARTBEAT_TICK_MS"]), **out}


async def _rss_one(count: int) -> dict[str, Any]:
    storage, conninfo = await _storage()
    try:
        await trio.to_thread.run_sync(fill_state, conninfo, fleet_keys(count), 0)
        tracker = _tracker(storage, _Instant())
        gc.collect()
        base = rss_bytes()
        await tracker.take_over()
        gc.collect()
        after = rss_bytes()
        if len(tracker) != count:
            raise RuntimeError("tracker lost gateways")
        del tracker
        gc.collect()
        tracemalloc.start()
        tracker = _tracker(storage, _Instant())
        await tracker.take_over()
        gc.collect()
        traced, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        await storage.close()
    return {
        "count": count,
        "bytes_per_gateway": (after - base) / count,
        "traced_bytes_per_gateway": traced / count,
    }


class _Outage:
    """A `SeenRecorder` down once (the outage), then the real store."""

    def __init__(self, store: PgStateStore) -> None:
        self.store = store
        self.failed = False
        self.writes = 0

    async def record_seen(self, seen: Mapping[Key, dt.datetime]) -> None:
        if not self.failed:
            self.failed = True
            raise DatabaseError("OperationalError: the database is down (benchmark)")
        self.writes += 1
        await self.store.record_seen(seen)


class _CountingAcker:
    def __init__(self) -> None:
        self.acked = 0

    async def ack(self, msgs: Sequence[JsMsg]) -> None:
        self.acked += len(msgs)

    async def nak(self, msgs: Sequence[JsMsg], delay_s: float | None = None) -> None:
        raise AssertionError("never nak'ed")

    async def term(self, msgs: Sequence[JsMsg]) -> None:
        raise AssertionError("never terminated")


async def _flush_one(count: int) -> dict[str, Any]:
    storage, conninfo = await _storage()
    try:
        keys = fleet_keys(count)
        await trio.to_thread.run_sync(fill_state, conninfo, keys, 0)
        heard = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)  # after the outage
        buffer = SeenBuffer()
        buffer.add(
            dict.fromkeys(keys, heard),
            [JsMsg(f"telemetry.data.{t}.{g}", b"", f"$JS.ACK.T.d.1.{i}.{i}.0.0")
             for i, (t, g) in enumerate(keys, 1)],
        )  # fmt: skip
        recorder, acker = _Outage(PgStateStore(storage)), _CountingAcker()
        with contextlib.suppress(DatabaseError):
            await flush_seen(buffer, recorder, acker)
        if len(buffer) != count or acker.acked:
            raise RuntimeError("the failed flush must put everything back, acking nothing")
        t0 = time.perf_counter()
        written = await flush_seen(buffer, recorder, acker)
        seconds = time.perf_counter() - t0
        stored = await trio.to_thread.run_sync(_count_seen, conninfo, heard)
        if written != count or acker.acked != count or stored != count:
            raise RuntimeError(f"flushed {written}, acked {acker.acked}, stored {stored}")
    finally:
        await storage.close()
    return {"count": count, "flush_s": seconds, "transactions": recorder.writes}


def _count_seen(conninfo: str, heard: dt.datetime) -> int:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(
            "SELECT count(*) FROM gateway_liveness WHERE last_seen = %s", (heard,)
        ).fetchone()
    return int(row[0]) if row else 0


def _flush(spec: dict[str, Any]) -> dict[str, Any]:
    return trio.run(_flush_one, int(spec["count"]))


def _rss(spec: dict[str, Any]) -> dict[str, Any]:
    return trio.run(_rss_one, int(spec["count"]))


MODES = {"tick": _tick, "rss": _rss, "flush": _flush, "outage": _outage}

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:], MODES))
