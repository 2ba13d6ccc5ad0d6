"""Liveness end to end (docs/contract.md Behaviour 3-5), in-process, on real NATS and PostgreSQL.

Rules: servers come from the fixtures (a fresh nats-server per test); the
management API is the stand-in running as its own process, which
appends every get-status and update-status request it receives to a JSON-lines
file; the daemon runs in the test's nursery and stops through its `stop` event.
Alerts are counted through the monitoring endpoint while the daemon runs and
read in full after it stopped. The daemon runs on the real clock, so timeouts
are short (1.5-4 s, 200 ms ticks) and every wait polls real state with a
deadline; every test has an absolute hang guard. Nothing asserts on speed.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio_asyncio

from devstack import js as _js
from devstack import simulator
from devstack.env import daemon_env
from devstack.natsd import NatsServer
from notip_trio.config import Settings
from notip_trio.js.bridge import NatsBridge
from notip_trio.metrics import Metrics
from notip_trio.wire import format_rfc3339, offline_alert_msg_id

from ._standin import running_standin
from .fix_daemon import daemon_settings, until
from .fix_daemon import running_daemon as _running_daemon
from .fix_servers import drained

Key = tuple[str, str]
STANDIN_READY_S = 30.0


# --- the daemon ---------------------------------------------------------------


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, **extra: str) -> Settings:
    base = {
        "HEARTBEAT_TICK_MS": "200",
        "HEARTBEAT_GRACE_PERIOD_MS": "0",
        # Long, so a test whose alert config was not applied fails instead of passing.
        "ALERT_CONFIG_DEFAULT_TIMEOUT_MS": "600000",
        "ALERT_CONFIG_REFRESH_MS": "600000",
        "SHUTDOWN_DRAIN_MS": "5000",
    }
    return daemon_settings(env, monkeypatch, **{**base, **extra})


@asynccontextmanager
async def running_daemon(settings: Settings, metrics: Metrics) -> AsyncIterator[None]:
    """The daemon, started with its alert configs loaded from the stand-in."""
    async with _running_daemon(settings, metrics):
        await until(lambda: metrics.alert_cache_last_success._value.get() > 0, 30, "configs")
        yield


# --- telemetry and alerts -----------------------------------------------------

_rng = random.Random(2024)


def _telemetry(keys: Iterable[Key]) -> list[tuple[str, bytes]]:
    """One valid envelope per gateway, measured now."""
    now = dt.datetime.now(dt.UTC)
    return [
        (
            simulator.subject_for(t, g),
            simulator.make_envelope(g, f"{g}-s1", "temperature", now, rng=_rng),
        )
        for t, g in keys
    ]


async def _publish(server: NatsServer, keys: Iterable[Key]) -> None:
    await trio.to_thread.run_sync(_js.publish, server, _telemetry(keys))


async def _decommission(server: NatsServer, tenant: str, gateway: str) -> None:
    body = json.dumps({"gatewayId": gateway, "timestamp": format_rfc3339(_now())}).encode()
    subject = f"gateway.decommissioned.{tenant}.{gateway}"
    await trio.to_thread.run_sync(_js.publish, server, [(subject, body)], "DECOMMISSION")


def _alert_count(server: NatsServer) -> int:
    return _js.stream_count(server, "ALERTS")


async def _alerts(server: NatsServer) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    return await trio.to_thread.run_sync(_js.stream_messages, server, "ALERTS")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _parse(ts: str) -> dt.datetime:
    assert ts.endswith("Z"), ts  # RFC 3339 in UTC
    return dt.datetime.fromisoformat(ts)


# --- the tests ----------------------------------------------------------------


async def test_silent_gateway_one_alert_offline_then_online_again(
    private_nats_server, pg_server, pg_database, monkeypatch, tmp_path
):
    server = private_nats_server
    gw = ("t1", "gw-1")
    settings = _settings(daemon_env(server, pg_server, pg_database.name), monkeypatch)
    metrics = Metrics()
    with trio.fail_after(120):
        async with (
            running_standin(
                server, tmp_path, configs=[{"tenant_id": "t1", "timeout_ms": 2500}]
            ) as standin,
            running_daemon(settings, metrics),
        ):
            first_before = _now()
            await _publish(server, [gw, gw])
            await until(lambda: standin.statuses("gw-1") == ["online"], 30, "first online")
            # The last message: its arrival lies between the publish and the ack.
            last_before = _now()
            await _publish(server, [gw])
            await until(lambda: drained(server), 30, "the last message to be acked")
            last_after = _now()

            await until(lambda: _alert_count(server) >= 1, 30, "the offline alert")
            seen_alert_at = _now()
            await until(lambda: "offline" in standin.statuses("gw-1"), 30, "offline update")
            # Stay silent for five more ticks: still one alert, one offline update.
            await trio.sleep(1.0)
            assert _alert_count(server) == 1
            assert standin.statuses("gw-1") == ["online", "offline"]

            resume_before = _now()
            await _publish(server, [gw])
            await until(lambda: len(standin.updates("gw-1")) >= 3, 30, "online again")
            assert _alert_count(server) == 1

        ((subject, body, headers),) = await _alerts(server)
    assert subject == "alert.t1.gw_offline"
    assert set(body) == {"gatewayId", "lastSeen", "timeoutMs", "timestamp"}
    assert body["gatewayId"] == "gw-1"
    assert body["timeoutMs"] == 2500
    last_seen = _parse(body["lastSeen"])
    assert last_before <= last_seen <= last_after
    detected = _parse(body["timestamp"])
    assert detected - last_seen >= dt.timedelta(milliseconds=2500)
    assert detected <= seen_alert_at
    assert headers["Nats-Msg-Id"] == offline_alert_msg_id("t1", "gw-1", last_seen)

    (first, offline, again) = standin.updates("gw-1")
    assert first[1] == "online"
    assert first_before <= _parse(first[2]) <= last_before
    assert offline == ("gw-1", "offline", body["lastSeen"])
    assert again[1] == "online"
    assert _parse(again[2]) >= resume_before
    assert standin.statuses("gw-1") == ["online", "offline", "online"]
    assert metrics.alerts_published._value.get() == 1


async def test_paused_gateway_falls_silent_without_alert(
    private_nats_server, pg_server, pg_database, monkeypatch, tmp_path
):
    server = private_nats_server
    paused, control = ("t1", "gw-p"), ("t1", "gw-c")
    # A paused gateway is asked again after min(1 min, ALERT_CONFIG_REFRESH_MS):
    # 1 s here, so it is asked several times within the test.
    settings = _settings(
        daemon_env(server, pg_server, pg_database.name),
        monkeypatch,
        ALERT_CONFIG_REFRESH_MS="1000",
    )
    metrics = Metrics()
    with trio.fail_after(120):
        async with (
            running_standin(
                server,
                tmp_path,
                configs=[{"tenant_id": "t1", "timeout_ms": 1500}],
                paused=[paused],
            ) as standin,
            running_daemon(settings, metrics),
        ):
            # Paused first: it is never heard later than the control gateway.
            await _publish(server, [paused, control])
            # The control's alert shows the silence was detected; the paused one
            # was asked about again after each back-off and skipped each time.
            await until(lambda: "offline" in standin.statuses("gw-c"), 30, "control offline")
            await until(lambda: standin.status_queries("gw-p") >= 3, 30, "paused re-checked")
        alerts = await _alerts(server)
    assert [(s, b["gatewayId"]) for s, b, _ in alerts] == [("alert.t1.gw_offline", "gw-c")]
    assert standin.statuses("gw-p") == ["online"]
    assert standin.statuses("gw-c") == ["online", "offline"]
    assert metrics.alerts_suppressed_paused._value.get() >= 3


async def test_100_of_1000_gateways_fall_silent_exactly_100_alerts(
    private_nats_server, pg_server, pg_database, monkeypatch, tmp_path
):
    server = private_nats_server
    fleet = [("ta", f"ta-gw-{i:03d}") for i in range(500)]
    fleet += [("tb", f"tb-gw-{i:03d}") for i in range(500)]
    silent = set(fleet[::10])  # 50 per tenant
    talkers = [key for key in fleet if key not in silent]
    timeouts = {"ta": 3000, "tb": 3500}  # ta: the default; tb: its tenant entry
    settings = _settings(
        daemon_env(server, pg_server, pg_database.name),
        monkeypatch,
        ALERT_CONFIG_DEFAULT_TIMEOUT_MS="3000",
        GATEWAY_BUFFER_SIZE="5000",
    )
    metrics = Metrics()

    async def keep_talking() -> None:
        # The second burst, then again every ~0.5 s: well inside the timeouts.
        while True:
            await _publish(server, talkers)
            await trio.sleep(0.5)

    def offline_updates() -> list[tuple[str, str, str]]:
        return [u for u in standin.updates() if u[1] == "offline"]

    with trio.fail_after(180):
        async with (
            running_standin(
                server, tmp_path, configs=[{"tenant_id": "tb", "timeout_ms": 3500}]
            ) as standin,
            running_daemon(settings, metrics),
        ):
            await _publish(server, fleet)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_talking)
                await until(lambda: _alert_count(server) >= 100, 90, "100 alerts")
                await until(lambda: len(offline_updates()) >= 100, 60, "100 offline updates")
                nursery.cancel_scope.cancel()
            # No fixed wait here: the talkers would go silent too.
        alerts = await _alerts(server)
    alerted = [(s.split(".")[1], b["gatewayId"]) for s, b, _ in alerts]
    assert len(alerted) == 100
    assert set(alerted) == silent
    for subject, body, headers in alerts:
        tenant = subject.split(".")[1]
        assert subject == f"alert.{tenant}.gw_offline"
        assert body["timeoutMs"] == timeouts[tenant]
        last_seen = _parse(body["lastSeen"])
        assert _parse(body["timestamp"]) - last_seen >= dt.timedelta(milliseconds=timeouts[tenant])
        assert headers["Nats-Msg-Id"] == offline_alert_msg_id(tenant, body["gatewayId"], last_seen)
    assert {g for g, _, _ in offline_updates()} == {g for _, g in silent}
    assert len(offline_updates()) == 100
    online = [g for g, status, _ in standin.updates() if status == "online"]
    assert sorted(online) == sorted(g for _, g in fleet)  # first seen, once each
    assert metrics.alerts_published._value.get() == 100
    assert metrics.status_update_dropped._value.get() == 0


async def test_same_alert_published_twice_is_stored_once(
    private_nats_server: NatsServer, aio_loop: trio_asyncio.TrioEventLoop
) -> None:
    server = private_nats_server
    client = server.client("notip-trio")
    last_seen = dt.datetime(2026, 11, 27, 8, 0, 1, 250000, tzinfo=dt.UTC)
    later = last_seen + dt.timedelta(minutes=5)
    with trio.fail_after(60):
        bridge = await NatsBridge.connect(
            server.url,
            ca=str(client.ca),
            cert=str(client.cert),
            key=str(client.key),
            connect_timeout_s=5,
        )
        try:
            for seen in (last_seen, last_seen, later):  # a retry, then the next silence
                body = json.dumps(
                    {
                        "gatewayId": "gw-1",
                        "lastSeen": format_rfc3339(seen),
                        "timeoutMs": 60000,
                        "timestamp": format_rfc3339(seen + dt.timedelta(minutes=1)),
                    }
                ).encode()
                await bridge.publish(
                    "alert.t1.gw_offline", body, msg_id=offline_alert_msg_id("t1", "gw-1", seen)
                )
        finally:
            await bridge.close()
        alerts = await _alerts(server)
    assert [h["Nats-Msg-Id"] for _, _, h in alerts] == [
        offline_alert_msg_id("t1", "gw-1", last_seen),
        offline_alert_msg_id("t1", "gw-1", later),
    ]
    assert [b["lastSeen"] for _, b, _ in alerts] == [
        format_rfc3339(last_seen),
        format_rfc3339(later),
    ]


async def test_decommissioned_gateway_gets_no_alert_and_is_first_seen_again(
    private_nats_server, pg_server, pg_database, monkeypatch, tmp_path
):
    server = private_nats_server
    gone, control = ("t1", "gw-d"), ("t1", "gw-c")
    settings = _settings(daemon_env(server, pg_server, pg_database.name), monkeypatch)
    metrics = Metrics()
    with trio.fail_after(120):
        async with (
            # 9 s: a lone decommission message can wait up to 5 s in the daemon's
            # pull request (batch 100, expires 5 s) before it is handled.
            running_standin(
                server, tmp_path, configs=[{"tenant_id": "t1", "timeout_ms": 9000}]
            ) as standin,
            running_daemon(settings, metrics),
        ):
            # gw-d first: it is never heard later than the control gateway.
            await _publish(server, [gone, control])
            await until(
                lambda: standin.statuses("gw-d") == standin.statuses("gw-c") == ["online"],
                30,
                "both online",
            )
            await _decommission(server, *gone)
            await until(
                lambda: metrics.gateways_decommissioned._value.get() == 1, 30, "decommission"
            )
            assert standin.statuses("gw-c") == ["online"], "decommission came too late"
            await until(lambda: "offline" in standin.statuses("gw-c"), 30, "control offline")
            await _publish(server, [gone])
            await until(lambda: len(standin.updates("gw-d")) >= 2, 30, "gw-d first seen again")
        alerts = await _alerts(server)
    assert [(s, b["gatewayId"]) for s, b, _ in alerts] == [("alert.t1.gw_offline", "gw-c")]
    assert standin.statuses("gw-d") == ["online", "online"]
    assert standin.status_queries("gw-d") == 0  # never a candidate once decommissioned
    first, again = standin.updates("gw-d")
    assert _parse(again[2]) > _parse(first[2])


async def test_failing_status_query_still_alerts(
    private_nats_server, pg_server, pg_database, monkeypatch, tmp_path
):
    server = private_nats_server
    gw = ("t1", "gw-x")
    settings = _settings(
        daemon_env(server, pg_server, pg_database.name),
        monkeypatch,
        ALERT_CONFIG_DEFAULT_TIMEOUT_MS="1500",
    )
    metrics = Metrics()
    with trio.fail_after(120):
        async with (
            running_standin(server, tmp_path, invalid_status=[gw]) as standin,
            running_daemon(settings, metrics),
        ):
            await _publish(server, [gw])
            # Four invalid replies with 1 + 2 + 4 s between them, then fail open.
            await until(lambda: _alert_count(server) >= 1, 45, "the fail-open alert")
            await until(lambda: "offline" in standin.statuses("gw-x"), 30, "offline update")
        ((subject, body, _),) = await _alerts(server)
    assert subject == "alert.t1.gw_offline"
    assert (body["gatewayId"], body["timeoutMs"]) == ("gw-x", 1500)
    assert standin.status_queries("gw-x") == 4  # one attempt and three retries
    assert standin.statuses("gw-x") == ["online", "offline"]
    assert metrics.lifecycle_query_errors._value.get() == 1
