"""Unclean faults on real servers: connections that stay open and stop answering.

A `devstack.relay.Relay` (tests/fix_relay.py) sits between the in-process
daemon and PostgreSQL, or NATS. With messages flowing, every connection open at
that moment is frozen (bytes stop both ways, sockets stay open; new connections
pass), and every message must still end up stored exactly once, within 60 s of
the freeze. The daemon runs at its production defaults for every deadline, so
the times printed are what an operator would see (`pytest -s` shows them); they
are measurements, never assertions. The 60 s limits are the hang guards of the
waits (the issue's bound), not speed checks.
"""

from __future__ import annotations

import datetime as dt
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import trio

from devstack import js as _js
from devstack import simulator
from devstack.env import daemon_env
from devstack.natsd import NatsServer
from notip_trio.db.writer import Storage
from notip_trio.envelope import Row
from notip_trio.errors import DeadlineExceeded
from notip_trio.metrics import Metrics

from .fix_daemon import daemon_settings, running_daemon, until
from .fix_relay import nats_url
from .fix_servers import drained, telemetry_rows

# Real traffic through frozen and slowed connections, for many seconds.
pytestmark = pytest.mark.slow

RECOVERY_LIMIT_S = 60.0  # the bound: every message stored within this of the freeze


@dataclass
class Flow:
    """Publishes `total` unique envelopes at a steady rate from a thread."""

    total: int
    per_tick: int = 50
    tick_s: float = 0.1
    seed: int = 3
    published: int = 0
    msgs: list[tuple[str, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        base = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
        for i in range(self.total):
            gw = f"gw-{i % 20:03d}"
            body = simulator.make_envelope(
                gw, f"s{i % 3}", "temperature", base + dt.timedelta(seconds=i), rng=rng
            )
            self.msgs.append((f"telemetry.data.t1.{gw}", body))

    def run(self, server: NatsServer) -> None:
        import asyncio

        async def fn(nc: Any) -> None:
            for start in range(0, self.total, self.per_tick):
                for subject, body in self.msgs[start : start + self.per_tick]:
                    await nc.publish(subject, body)
                await nc.flush(timeout=10)
                self.published = min(self.total, start + self.per_tick)
                await asyncio.sleep(self.tick_s)

        _js.run_nats(server, fn, "test-client", timeout_s=300)


def _rows(conninfo: str) -> int:
    """Rows in telemetry over a direct connection (not the relay); 0 before the migration."""
    try:
        return telemetry_rows(conninfo)
    except psycopg.errors.UndefinedTable:
        return 0


def _livez(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@dataclass
class Watch:
    """Samples rows and /livez while a fault test runs."""

    conninfo: str
    port: int
    livez: list[int] = field(default_factory=list)
    samples: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, rows)

    async def run(self) -> None:
        while True:
            rows = await trio.to_thread.run_sync(_rows, self.conninfo)
            self.samples.append((time.monotonic(), rows))
            self.livez.append(await trio.to_thread.run_sync(_livez, self.port))
            await trio.sleep(0.25)

    def first_growth_after(self, t0: float) -> float | None:
        """Seconds from t0 to the first sample after t0 with more rows than at t0."""
        before = [rows for t, rows in self.samples if t <= t0]
        base = before[-1] if before else 0
        for t, rows in self.samples:
            if t > t0 and rows > base:
                return t - t0
        return None


def _report(name: str, **figures: object) -> None:
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def _metric(counter: Any) -> float:
    return float(counter._value.get())


async def test_frozen_postgres_connections_recover_on_their_own(
    clean_nats_server, pg_server, pg_database, pg_relay, monkeypatch
):
    env = daemon_env(clean_nats_server, pg_server, pg_database.name, DB_PORT=str(pg_relay.port))
    settings = daemon_settings(env, monkeypatch, HEARTBEAT_GRACE_PERIOD_MS="600000")
    flow = Flow(total=8000)  # 500 msgs/s for 16 s
    metrics = Metrics()
    with trio.fail_after(150):
        async with running_daemon(settings, metrics) as port, trio.open_nursery() as nursery:
            watch = Watch(pg_database.conninfo, port)
            nursery.start_soon(watch.run)
            nursery.start_soon(trio.to_thread.run_sync, flow.run, clean_nats_server)
            await until(lambda: _rows(pg_database.conninfo) >= 500, 30, "rows flowing")
            frozen = pg_relay.freeze_open()
            t_freeze = time.monotonic()
            published_at_freeze = flow.published
            await until(
                lambda: _rows(pg_database.conninfo) >= flow.total,
                RECOVERY_LIMIT_S,
                "every message stored after the freeze",
            )
            t_all = time.monotonic() - t_freeze
            await until(lambda: drained(clean_nats_server), 30, "every delivery acked")
            nursery.cancel_scope.cancel()
    assert telemetry_rows(pg_database.conninfo) == flow.total  # every message once
    assert frozen >= 1
    assert _metric(metrics.write_errors) >= 1  # the freeze did bite: a write hit its deadline
    assert set(watch.livez) == {200}  # recovered by itself: /livez never failed
    _report(
        "postgres freeze",
        frozen_connections=frozen,
        published_at_freeze=published_at_freeze,
        write_timeout_s=settings.db_write_timeout_ms / 1000,
        first_commit_after_freeze_s=_round(watch.first_growth_after(t_freeze)),
        all_stored_after_freeze_s=round(t_all, 1),
        failed_writes=int(_metric(metrics.write_errors)),
    )


async def test_ten_times_slower_database_slows_ingest_and_trips_nothing(
    clean_nats_server, pg_server, pg_database, pg_relay, monkeypatch
):
    env = daemon_env(clean_nats_server, pg_server, pg_database.name, DB_PORT=str(pg_relay.port))
    settings = daemon_settings(env, monkeypatch, HEARTBEAT_GRACE_PERIOD_MS="600000")
    flow = Flow(total=6000)
    metrics = Metrics()

    def mean_write_s() -> tuple[float, float]:
        hist = {s.name: s.value for s in metrics.write_duration.collect()[0].samples}
        return hist["notip_consumer_write_duration_seconds_sum"], hist[
            "notip_consumer_write_duration_seconds_count"
        ]

    with trio.fail_after(150):
        async with running_daemon(settings, metrics) as port, trio.open_nursery() as nursery:
            watch = Watch(pg_database.conninfo, port)
            nursery.start_soon(watch.run)
            nursery.start_soon(trio.to_thread.run_sync, flow.run, clean_nats_server)
            await until(lambda: _rows(pg_database.conninfo) >= 1500, 30, "rows flowing")
            sum0, n0 = mean_write_s()
            baseline = sum0 / n0
            # A round trip crosses the relay twice; a batch write makes about five
            # (checkout check, BEGIN, COPY start, COPY end, COMMIT): a latency equal
            # to the usual write time each way makes each write about ten times slower.
            pg_relay.delay_s = baseline
            await until(
                lambda: _rows(pg_database.conninfo) >= flow.total,
                RECOVERY_LIMIT_S,
                "every message stored on the slow database",
            )
            sum1, n1 = mean_write_s()
            nursery.cancel_scope.cancel()
    assert telemetry_rows(pg_database.conninfo) == flow.total
    assert _metric(metrics.write_errors) == 0  # no deadline tripped
    assert set(watch.livez) == {200}
    slow = (sum1 - sum0) / max(1.0, n1 - n0)
    _report(
        "slow database",
        relay_latency_ms=round(baseline * 1000, 1),
        write_before_ms=round(baseline * 1000, 1),
        write_after_ms=round(slow * 1000, 1),
        slowdown=round(slow / baseline, 1),
        writes_slow=int(n1 - n0),
    )


async def test_frozen_nats_connection_is_detected_and_nothing_is_lost(
    clean_nats_server, pg_server, pg_database, nats_relay, monkeypatch
):
    relay = nats_relay(clean_nats_server)
    env = daemon_env(clean_nats_server, pg_server, pg_database.name, NATS_URL=nats_url(relay))
    settings = daemon_settings(env, monkeypatch, HEARTBEAT_GRACE_PERIOD_MS="600000")
    flow = Flow(total=6000)  # 500 msgs/s for 12 s
    metrics = Metrics()
    with trio.fail_after(150):
        async with running_daemon(settings, metrics) as port, trio.open_nursery() as nursery:
            watch = Watch(pg_database.conninfo, port)
            nursery.start_soon(watch.run)
            nursery.start_soon(trio.to_thread.run_sync, flow.run, clean_nats_server)
            await until(lambda: _rows(pg_database.conninfo) >= 500, 30, "rows flowing")
            frozen = relay.freeze_open()
            t_freeze = time.monotonic()
            published_at_freeze = flow.published
            await until(
                lambda: _metric(metrics.nats_reconnects) >= 1, RECOVERY_LIMIT_S, "a reconnect"
            )
            t_reconnect = time.monotonic() - t_freeze
            await until(
                lambda: _rows(pg_database.conninfo) >= flow.total,
                RECOVERY_LIMIT_S - t_reconnect,
                "every message stored after the freeze",
            )
            t_all = time.monotonic() - t_freeze
            await until(lambda: drained(clean_nats_server), 45, "every delivery acked")
            nursery.cancel_scope.cancel()
    assert telemetry_rows(pg_database.conninfo) == flow.total
    assert frozen >= 1
    assert set(watch.livez) == {200}
    _report(
        "nats freeze",
        frozen_connections=frozen,
        published_at_freeze=published_at_freeze,
        ping_interval_s=settings.nats_ping_interval_s,
        max_outstanding_pings=settings.nats_max_outstanding_pings,
        reconnected_after_s=round(t_reconnect, 1),
        first_commit_after_freeze_s=_round(watch.first_growth_after(t_freeze)),
        all_stored_after_freeze_s=round(t_all, 1),
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def test_livez_fails_while_a_write_is_stuck_and_recovers_with_it(
    clean_nats_server, pg_server, pg_database, pg_relay, monkeypatch
):
    """With the write deadline out of the way (10 min), a frozen database leaves
    ingest stuck with work in hand: /livez must say so (and name it) once
    LIVEZ_STALL_MS passes, and be 200 again once the write completes."""
    env = daemon_env(clean_nats_server, pg_server, pg_database.name, DB_PORT=str(pg_relay.port))
    settings = daemon_settings(
        env,
        monkeypatch,
        HEARTBEAT_GRACE_PERIOD_MS="600000",
        DB_WRITE_TIMEOUT_MS="600000",
        LIVEZ_STALL_MS="3000",
    )
    flow = Flow(total=3000)
    metrics = Metrics()
    with trio.fail_after(150):
        async with running_daemon(settings, metrics) as port, trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, flow.run, clean_nats_server)
            await until(lambda: _rows(pg_database.conninfo) >= 500, 30, "rows flowing")
            assert await trio.to_thread.run_sync(_livez, port) == 200
            pg_relay.freeze_open()
            t_freeze = time.monotonic()
            await until(lambda: _livez(port) == 503, 60, "/livez failing")
            t_failed = time.monotonic() - t_freeze
            body = await trio.to_thread.run_sync(_livez_body, port)
            pg_relay.unfreeze()
            await until(lambda: _livez(port) == 200, 30, "/livez passing again")
            await until(lambda: _rows(pg_database.conninfo) >= flow.total, 60, "every message")
            nursery.cancel_scope.cancel()
    assert body.startswith("ingest: ")
    assert "nothing committed" in body
    assert telemetry_rows(pg_database.conninfo) == flow.total
    assert _metric(metrics.write_errors) == 0  # the write was stuck, never failed
    _report("livez on a stuck write", stall_bound_s=3.0, livez_failed_after_s=round(t_failed, 1))


def _livez_body(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as resp:
            return str(resp.read().decode())
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode())


def _row(i: int) -> Row:
    t = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=i)
    return Row(t, "t1", "gw-1", "s1", "temperature", "ZGF0YQ==", "aXY=", "dGFn", 1)


async def test_storage_cuts_frozen_connections_and_goes_on_with_fresh_ones(
    pg_server, pg_database, pg_relay
):
    """Storage alone: a write, a ping and a cancelled write on frozen connections
    each come back (cut), and the next write succeeds on a fresh connection."""
    conninfo = pg_server.conninfo(pg_database.name, port=pg_relay.port)
    # One connection, so that a successful call before each freeze shows the
    # connection in the pool is the one the freeze catches.
    storage = Storage.create(conninfo, min_size=1, max_size=1, write_timeout_s=2.0)
    with trio.fail_after(60):
        await storage.open(timeout_s=10)
        try:
            await storage.migrate()
            assert (await storage.write_batch([_row(i) for i in range(100)], [])).inserted == 100

            assert pg_relay.freeze_open() >= 1
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await storage.write_batch([_row(i) for i in range(100, 200)], [])
            cut_after = time.monotonic() - t0
            t0 = time.monotonic()
            result = await storage.write_batch([_row(i) for i in range(100, 200)], [])
            fresh_after = time.monotonic() - t0
            assert (result.inserted, result.duplicates) == (100, 0)

            pg_relay.freeze_open()
            with pytest.raises(DeadlineExceeded):
                await storage.ping(timeout_s=1.0)
            await storage.ping(timeout_s=5.0)
            pg_relay.freeze_open()
            with trio.move_on_after(0.5) as scope:  # e.g. the shutdown drain running out
                await storage.write_batch([_row(i) for i in range(200, 300)], [])
            assert scope.cancelled_caught
            result = await storage.write_batch([_row(i) for i in range(200, 300)], [])
            assert result.inserted + result.duplicates == 100
            assert telemetry_rows(pg_database.conninfo) == 300
        finally:
            await storage.close()
    _report(
        "storage cut",
        deadline_s=2.0,
        write_cut_after_s=round(cut_after, 2),
        next_write_s=round(fresh_after, 2),
    )
