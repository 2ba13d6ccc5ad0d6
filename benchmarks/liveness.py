"""Benchmark children for liveness: tick duration and memory per tracked gateway.

- `tick`: for each size, a LivenessTracker with in-memory stand-ins that answer
  at once (StatusQuery says online, AlertPublisher acks, the sink drops) is
  filled through `record()` in batches of 1,000 heartbeats; 1% of the
  gateways were last heard long enough ago to be due. The first tick handles
  that 1% (get-status, alert, mark offline); then the median of 5 ticks with
  none due.
- `rss`: in a fresh process, RSS before and after tracking `count` gateways,
  divided by `count`; once with the key strings counted (as the daemon
  allocates them while decoding) and once for the tracker alone.

Usage: python -m benchmarks.liveness '{"mode": "tick", "sizes": [10000]}'
"""

from __future__ import annotations

import datetime as dt
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

from benchmarks.common import child_main, rss_bytes
from notip_trio.alertconfig import AlertConfigCache
from notip_trio.config import Settings
from notip_trio.dispatch import StatusUpdate
from notip_trio.liveness import Heartbeats, Key, LivenessTracker
from notip_trio.metrics import Metrics
from notip_trio.mgmt import GatewayState

TIMEOUT_MS = 60_000
RECORD_BATCH = 1000


class _Instant:
    """StatusQuery, AlertPublisher and StatusSink at once, all answering at once."""

    def __init__(self) -> None:
        self.alerts = 0

    async def get_status(self, tenant_id: str, gateway_id: str) -> GatewayState:
        return "online"

    async def publish(self, subject: str, payload: bytes, *, msg_id: str) -> None:
        self.alerts += 1

    def submit(self, update: StatusUpdate) -> bool:
        return True

    def close(self) -> None:
        pass


def _settings() -> Settings:
    return Settings(
        nats_url="tls://127.0.0.1:4222",
        nats_tls_ca=Path("ca.pem"),
        nats_tls_cert=Path("c.pem"),
        nats_tls_key=Path("k.pem"),
        nats_consumer_durable_name="bench",
        nats_connect_timeout_s=10.0,
        db_host="localhost",
        db_port=5432,
        db_name="bench",
        db_user="bench",
        db_password="",
        db_max_conns=1,
        db_min_conns=0,
        db_ssl_mode="disable",
        db_ssl_root_cert=None,
        gateway_buffer_size=1000,
        heartbeat_tick_ms=10_000,
        heartbeat_grace_period_ms=0,
        alert_config_refresh_ms=120_000,
        alert_config_default_timeout_ms=TIMEOUT_MS,
        alert_config_max_retries=1,
        alert_config_initial_backoff_ms=1000,
        alert_config_max_backoff_ms=1000,
        metrics_host="127.0.0.1",
        metrics_port=0,
    )


def _keys(count: int) -> list[Key]:
    # 100 tenants; ids built per gateway, as decoding a message makes new strings.
    return [(f"tenant-{i % 100:03d}", f"gw-{i // 100:06d}-{i % 100:03d}") for i in range(count)]


def _tracker(fake: _Instant) -> LivenessTracker:
    return LivenessTracker(AlertConfigCache(TIMEOUT_MS), fake, fake, fake, _settings(), Metrics())


def _record_all(tracker: LivenessTracker, keys: list[Key], seen: float) -> None:
    wall = dt.datetime.now(dt.UTC)
    for start in range(0, len(keys), RECORD_BATCH):
        tracker.record(Heartbeats(seen, wall, keys[start : start + RECORD_BATCH]))


async def _tick_one(size: int) -> dict[str, Any]:
    fake = _Instant()
    tracker = _tracker(fake)
    keys = _keys(size)
    due = size // 100
    now = trio.current_time()
    _record_all(tracker, keys[:due], now - TIMEOUT_MS / 1000 - 5)
    _record_all(tracker, keys[due:], now)
    t0 = time.perf_counter()
    await tracker.tick()
    due_ms = (time.perf_counter() - t0) * 1000
    if fake.alerts != due:
        raise RuntimeError(f"expected {due} alerts, got {fake.alerts}")
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        await tracker.tick()
        samples.append((time.perf_counter() - t0) * 1000)
    return {"none_due_ms": statistics.median(samples), "one_pct_due_ms": due_ms, "due": due}


def _tick(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in spec["sizes"]:
        out[str(size)] = trio.run(_tick_one, int(size))
        gc.collect()
    return out


async def _fill(count: int) -> dict[str, Any]:
    fake = _Instant()
    tracker = _tracker(fake)
    gc.collect()
    base = rss_bytes()
    keys = _keys(count)
    gc.collect()
    with_keys_only = rss_bytes()
    _record_all(tracker, keys, trio.current_time())
    gc.collect()
    after = rss_bytes()  # `keys` still alive: its 8-byte list slots count (conservative)
    if len(tracker) != count:
        raise RuntimeError("tracker lost gateways")
    return {
        "count": count,
        "bytes_per_gateway": (after - base) / count,
        "tracker_only_bytes_per_gateway": (after - with_keys_only) / count,
    }


def _rss(spec: dict[str, Any]) -> dict[str, Any]:
    return trio.run(_fill, int(spec["count"]))


MODES = {"tick": _tick, "rss": _rss}

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:], MODES))
