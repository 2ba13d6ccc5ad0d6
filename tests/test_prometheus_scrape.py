"""A real scraper: Debian's Prometheus scrapes a running daemon every second.

Rules: the daemon runs in-process on the suite's throwaway mTLS nats-server and
PostgreSQL; Prometheus is a subprocess on a free port (devstack.prometheus),
stopped on the way out whatever happens; an absolute hang guard; every wait
polls real state (the table, Prometheus's HTTP API) with a deadline and says
what it waited for. Without the prometheus binary the test skips, except in
CI (`.ci/run` installs it), where it fails.
"""

from __future__ import annotations

import datetime as dt
import random
import re

import psycopg
import trio

from devstack import js as _js
from devstack import simulator
from devstack.env import daemon_env
from devstack.proc import PROJECT_ROOT
from devstack.prometheus import JOB, PrometheusServer, start_prometheus
from notip_trio.metrics import Metrics

from ._promql import require_tool
from .fix_daemon import daemon_settings, running_daemon, until

RULES = PROJECT_ROOT / "deploy" / "prometheus" / "notip-trio.rules.yaml"
MESSAGES = 600
NEVER = "0001-01-01T00:00:00"  # Prometheus's lastEvaluation of a rule not yet evaluated


def _envelopes(n: int) -> list[tuple[str, bytes]]:
    rng = random.Random(13)
    base = dt.datetime(2026, 11, 28, tzinfo=dt.UTC)
    out = []
    for i in range(n):
        gw = f"gw-{i % 20:03d}"
        body = simulator.make_envelope(
            gw, f"s{i % 4}", "humidity", base + dt.timedelta(milliseconds=10 * i), rng=rng
        )
        out.append((f"telemetry.data.t-scrape.{gw}", body))
    return out


def _rows(conninfo: str) -> int:
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry").fetchone()
        assert row is not None
        return int(row[0])


def _stored(prom: PrometheusServer, metric: str) -> float | None:
    """The value Prometheus holds for `metric` of our job, None while it has none."""
    result = prom.query(f'{metric}{{job="{JOB}"}}')
    if not result:
        return None
    assert len(result) == 1, result
    return float(result[0]["value"][1])


async def test_prometheus_stores_what_the_daemon_wrote(
    clean_nats_server, pg_server, pg_database, monkeypatch
):
    binary = require_tool("prometheus")
    env = daemon_env(clean_nats_server, pg_server, pg_database.name)
    settings = daemon_settings(
        env, monkeypatch, HEARTBEAT_GRACE_PERIOD_MS="600000", SHUTDOWN_DRAIN_MS="2000"
    )
    msgs = _envelopes(MESSAGES)
    with trio.fail_after(180):
        async with running_daemon(settings, Metrics()) as port:
            prom = await trio.to_thread.run_sync(
                lambda: start_prometheus([f"127.0.0.1:{port}"], rule_files=[RULES], binary=binary)
            )
            try:
                await until(
                    lambda: prom.query(f'up{{job="{JOB}"}} == 1') != [],
                    30,
                    f"Prometheus to scrape the daemon on port {port} (up == 1)",
                )
                await trio.to_thread.run_sync(_js.publish, clean_nats_server, msgs)
                await until(
                    lambda: _rows(pg_database.conninfo) == MESSAGES,
                    60,
                    f"{MESSAGES} rows in telemetry",
                )
                await until(
                    lambda: _stored(prom, "notip_consumer_messages_written_total") == MESSAGES,
                    30,
                    f"Prometheus to store notip_consumer_messages_written_total == {MESSAGES}",
                )
                written = await trio.to_thread.run_sync(
                    _stored, prom, "notip_consumer_messages_written_total"
                )
                received = await trio.to_thread.run_sync(
                    _stored, prom, "notip_consumer_messages_received_total"
                )
                rows = await trio.to_thread.run_sync(_rows, pg_database.conninfo)
                # The alert rules load in a real Prometheus and evaluate without error.
                await until(
                    lambda: all(
                        not r.get("lastEvaluation", NEVER).startswith(NEVER) for r in prom.rules()
                    ),
                    30,
                    "every alert rule evaluated at least once",
                )
                rules = await trio.to_thread.run_sync(prom.rules)
            except BaseException:
                print(await trio.to_thread.run_sync(prom.tail))
                raise
            finally:
                await trio.to_thread.run_sync(prom.close)
    assert written == rows == MESSAGES
    assert received == MESSAGES
    alerts_in_file = re.findall(r"(?m)^\s+- alert: (\w+)$", RULES.read_text(encoding="utf-8"))
    assert sorted(r["name"] for r in rules) == sorted(alerts_in_file)
    assert {(r["name"], r["health"], r.get("lastError", "")) for r in rules} == {
        (r["name"], "ok", "") for r in rules
    }
    firing = {r["name"] for r in rules if r.get("state") == "firing"}
    assert firing == set(), "nothing failed long enough to fire an alert"
    assert not prom.running
