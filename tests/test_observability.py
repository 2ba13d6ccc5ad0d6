"""Observability of the running daemon process (docs/contract.md Behaviour 7, Metrics).

Rules for this file: as in test_daemon_process.py, the daemon is a real
subprocess (tests/fix_daemon.py) configured by `daemon_env`, on a fresh
`private_nats_server` and a fresh database (a `private_pg_server` where the test
stops PostgreSQL); each test has an absolute `trio.fail_after` hang guard, and
waits poll real state (HTTP endpoints, the table, the server's monitoring
endpoint) with a deadline.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import signal
from collections.abc import Callable

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from devstack import js as _js
from devstack import simulator
from devstack.env import daemon_env

from .fix_daemon import DaemonProcess, assert_logs_clean, spawn_daemon, until
from .fix_servers import drained, telemetry_rows

# The daemon as its own process.
pytestmark = pytest.mark.slow

COUNTERS = (
    "notip_consumer_messages_received_total",
    "notip_consumer_message_parsing_errors_total",
    "notip_consumer_messages_written_total",
    "notip_consumer_write_errors_total",
    "notip_consumer_alerts_published_total",
    "notip_consumer_alert_publish_errors_total",
    "notip_consumer_status_update_errors_total",
    "notip_consumer_status_update_dropped_total",
    "notip_consumer_alert_cache_refresh_errors_total",
    "notip_consumer_nats_reconnects_total",
    "notip_consumer_lifecycle_query_errors_total",
)
GAUGES = (
    "notip_consumer_heartbeat_map_size",
    "notip_consumer_dispatch_queue_length",
    "notip_consumer_alert_cache_last_success_timestamp",
)
HISTOGRAMS = (
    "notip_consumer_write_duration_seconds",
    "notip_consumer_batch_size",
    "notip_consumer_heartbeat_tick_duration_seconds",
)


def _traffic(valid: int, seed: int) -> tuple[list[tuple[str, bytes]], int]:
    """`valid` good envelopes with one bad message of every kind spread among them.

    Returns (messages, number of bad ones). Bad kinds: the simulator's
    malformed kinds, an oversized body and a subject without a gateway.
    """
    rng = random.Random(seed)
    base = dt.datetime(2026, 11, 27, tzinfo=dt.UTC)
    good = []
    for i in range(valid):
        gw = f"gw-{i % 25:03d}"
        ts = base + dt.timedelta(milliseconds=i)
        body = simulator.make_envelope(gw, f"s{i % 3}", "temperature", ts, rng=rng)
        good.append((f"telemetry.data.t1.{gw}", body))
    bad = [
        (
            "telemetry.data.t1.gw-bad",
            simulator.make_malformed(kind, "gw-bad", "s-bad", "humidity", base, rng=rng),
        )
        for kind in simulator.MALFORMED_KINDS
    ]
    oversized = simulator.envelope_fields("gw-bad", "s-big", "pressure", base, rng=rng)
    oversized["encryptedData"] = simulator._blob(rng, 24_000)  # > 16 KiB default limit
    bad.append(("telemetry.data.t1.gw-bad", json.dumps(oversized).encode()))
    bad.append(("telemetry.data.t1", simulator.make_envelope("gw-x", "s", "movement", base)))
    msgs = list(good)
    step = max(1, valid // (len(bad) + 1))
    for n, item in enumerate(bad, start=1):
        msgs.insert(n * step + n - 1, item)
    return msgs, len(bad)


def _blobs(msgs: list[tuple[str, bytes]]) -> set[str]:
    """Every encryptedData / iv / authTag value published (bad messages included)."""
    out: set[str] = set()
    for _, body in msgs:
        try:
            fields = json.loads(body)
        except ValueError:  # the malformed-JSON one: its blobs by scanning the text
            out.update(re.findall(r"[A-Za-z0-9+/]{16,}={0,2}", body.decode(errors="replace")))
            continue
        out.update(str(fields[k]) for k in ("encryptedData", "iv", "authTag") if k in fields)
    return out


def _samples(daemon: DaemonProcess) -> dict[str, float]:
    """Sample name (labels joined in) -> value, from GET /metrics."""
    status, text = daemon.get("/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


async def _stop(daemon: DaemonProcess) -> None:
    daemon.signal(signal.SIGTERM)
    code, _ = await daemon.wait_exit(60)
    assert code == 0, daemon.tail()


# --- /metrics -------------------------------------------------------------------


async def test_metrics_name_every_spec_metric_and_written_equals_rows(
    private_nats_server, pg_server, pg_database, tmp_path
):
    nats, conninfo = private_nats_server, pg_database.conninfo
    msgs, bad = _traffic(500, seed=1)
    env = daemon_env(nats, pg_server, pg_database.name)
    with trio.fail_after(240), spawn_daemon(env, tmp_path / "daemon.log") as daemon:
        await daemon.wait_ready()
        await trio.to_thread.run_sync(_js.publish, nats, msgs)

        def settled() -> bool:
            samples = _samples(daemon)
            return (
                drained(nats)
                and telemetry_rows(conninfo) == 500
                and _total(samples, "notip_consumer_messages_written_total") == 500
                and _total(samples, "notip_consumer_message_parsing_errors_total") == bad
                # The leader reads the gateways' state from the database each tick.
                and samples.get("notip_consumer_heartbeat_map_size") == 25
            )

        await until(settled, 180, "500 rows, every message acked or terminated, and counted")
        samples = await trio.to_thread.run_sync(_samples, daemon)
        rows = await trio.to_thread.run_sync(telemetry_rows, conninfo)
        await _stop(daemon)

    names = {key.split("{", 1)[0] for key in samples}
    missing = [n for n in COUNTERS + GAUGES if n not in names]
    missing += [
        f"{n}{suffix}"
        for n in HISTOGRAMS
        for suffix in ("_bucket", "_sum", "_count")
        if f"{n}{suffix}" not in names
    ]
    assert missing == []
    assert samples["notip_consumer_messages_written_total"] == rows == 500
    assert samples["notip_consumer_messages_received_total"] >= len(msgs)
    assert _total(samples, "notip_consumer_message_parsing_errors_total") == bad
    assert samples["notip_consumer_write_errors_total"] == 0
    # Every gateway of the valid traffic is tracked (the bad ones are not).
    assert samples["notip_consumer_heartbeat_map_size"] == 25
    assert samples["notip_consumer_batch_size_count"] >= 1
    # The two periods the alert rules compare with, at their defaults.
    assert samples["notip_consumer_heartbeat_tick_interval_seconds"] == 10.0
    assert samples["notip_consumer_alert_cache_refresh_interval_seconds"] == 120.0
    assert_logs_clean(daemon, _blobs(msgs) | {pg_server.password})


# --- health endpoints while PostgreSQL is down -----------------------------------


async def test_healthz_and_readyz_follow_the_database_and_livez_stays_200(
    private_nats_server, private_pg_server, tmp_path
):
    pg = private_pg_server
    db = await trio.to_thread.run_sync(pg.create_database)
    env = daemon_env(private_nats_server, pg, db.name)
    seen: dict[str, list[int]] = {"/livez": []}

    def probe(path: str) -> tuple[int, str]:
        # /livez is asked alongside every other probe: it must never waver.
        live = daemon.get("/livez")
        seen["/livez"].append(live[0])
        return daemon.get(path)

    def both(status: int, reason: str | None = None) -> Callable[[], bool]:
        def check() -> bool:
            answers = [probe("/readyz"), probe("/healthz")]
            ok = all(code == status for code, _ in answers)
            if reason is not None:
                ok = ok and all(reason in body.lower() for _, body in answers)
            return ok

        return check

    with trio.fail_after(300), spawn_daemon(env, tmp_path / "daemon.log") as daemon:
        await daemon.wait_ready()
        await until(both(200), 30, "/readyz and /healthz 200 at start")

        await trio.to_thread.run_sync(pg.stop)
        await until(both(503, "database"), 60, "/readyz and /healthz 503 naming the database")
        down = [probe("/readyz"), probe("/healthz")]
        assert daemon.running

        await trio.to_thread.run_sync(pg.start)
        await until(both(200), 120, "/readyz and /healthz 200 after PostgreSQL is back")
        assert daemon.running
        await _stop(daemon)

    assert all(code == 503 and "database" in body for code, body in down), down
    assert set(seen["/livez"]) == {200}
    assert len(seen["/livez"]) >= 6
    assert_logs_clean(daemon, {pg.password})


# --- logs -------------------------------------------------------------------------


async def test_logs_are_json_and_never_carry_blobs_or_the_password(
    private_nats_server, pg_server, pg_database, tmp_path
):
    """At DEBUG, the most talkative level, with every kind of bad input logged."""
    nats = private_nats_server
    msgs, bad = _traffic(300, seed=2)
    blobs = _blobs(msgs)
    assert len(blobs) >= 3 * 300  # the check below has something to find
    env = daemon_env(nats, pg_server, pg_database.name, LOG_LEVEL="DEBUG")
    with trio.fail_after(240), spawn_daemon(env, tmp_path / "daemon.log") as daemon:
        await daemon.wait_ready()
        await trio.to_thread.run_sync(_js.publish, nats, msgs)
        await until(
            lambda: drained(nats) and telemetry_rows(pg_database.conninfo) == 300,
            180,
            "every message written or rejected",
        )
        await _stop(daemon)

    logs = daemon.json_logs()
    # The bad messages were logged, once each, just without the blobs.
    assert len([e for e in logs if e["event"] == "message_rejected"]) == bad
    lines = assert_logs_clean(daemon, blobs | {pg_server.password})
    assert lines == len(logs)
