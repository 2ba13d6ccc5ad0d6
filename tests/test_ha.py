"""Liveness across restarts and replicas (docs/contract.md Behaviour 8, 9), as real processes.

Rules: a fresh nats-server and database per test; the daemon runs as its own
process (`python -m notip_trio`) so it can be SIGKILLed; the management API is
the stand-in process, which records every request; gateways publish from a
thread every 0.25 s. The daemons run on the real clock with 250 ms ticks and a
2 s timeout. Every wait polls real state with a deadline; each test has an
absolute hang guard. Nothing asserts on speed: the takeover time is printed.
A replica whose path to PostgreSQL goes dark reaches it through
`devstack.relay.Relay`, which freezes its connections without closing them.
"""

from __future__ import annotations

import datetime as dt
import signal
import time
from pathlib import Path

import pytest
import trio

from devstack import js as _js
from devstack.relay import Relay

from ._standin import running_standin
from .fix_daemon import liveness_env, spawn_daemon, until
from .fix_servers import create_durable, drained, telemetry_rows
from .sim_gateways import TENANT, Gateways, alerted_gateways

# Daemons as their own processes, SIGKILLed and restarted.
pytestmark = pytest.mark.slow

TIMEOUT_MS = 2000


async def test_restart_alerts_the_gateway_that_fell_silent_around_a_sigkill(
    private_nats_server, pg_server, pg_database, tmp_path: Path
) -> None:
    nats = private_nats_server
    env = liveness_env(nats, pg_server, pg_database)
    configs = [{"tenant_id": TENANT, "timeout_ms": TIMEOUT_MS}]
    gateways = Gateways(nats, ["A", "B", "C"])
    with trio.fail_after(180):
        async with running_standin(nats, tmp_path, configs=configs) as standin:
            gateways.start()
            try:
                with spawn_daemon(env, tmp_path / "first.log") as first:
                    await first.wait_ready()
                    await until(
                        lambda: all(standin.statuses(g) == ["online"] for g in "ABC"),
                        30,
                        "A, B and C online",
                    )
                    gateways.silence("B")
                    await until(lambda: "offline" in standin.statuses("B"), 30, "B offline")
                    a_last = gateways.silence("A")
                    await trio.sleep(0.5)  # A falls silent 0.5 s before the kill
                    await first.sigkill()
                await trio.sleep(1.5)  # down 1.5 s while C keeps sending
                with spawn_daemon(env, tmp_path / "second.log") as second:
                    await second.wait_ready()
                    await until(lambda: "offline" in standin.statuses("A"), 30, "A offline")
                    await trio.sleep(3)  # a repeated alert or update would come now
                    second.signal(signal.SIGTERM)
                    code, _ = await second.wait_exit(30)
                    assert code == 0, second.tail()
            finally:
                await trio.to_thread.run_sync(gateways.stop)
        alerts = await trio.to_thread.run_sync(_js.stream_messages, nats, "ALERTS")

    # A alerted exactly once (by the new process), B not again, C never.
    assert sorted(body["gatewayId"] for _, body, _ in alerts) == ["A", "B"]
    (a_alert,) = [body for _, body, _ in alerts if body["gatewayId"] == "A"]
    last_seen = dt.datetime.fromisoformat(a_alert["lastSeen"])
    assert abs((last_seen - a_last).total_seconds()) <= 1.0, (last_seen, a_last)
    # One online each, one offline each for A and B, nothing repeated.
    assert standin.statuses("A") == ["online", "offline"]
    assert standin.statuses("B") == ["online", "offline"]
    assert standin.statuses("C") == ["online"]
    logs = [e["event"] for e in second.json_logs()]
    assert "liveness_leader_acquired" in logs
    assert "liveness_state_loaded" in logs


async def test_two_replicas_one_leader_no_false_alert_and_a_takeover(
    private_nats_server, pg_server, pg_database, tmp_path: Path
) -> None:
    nats = private_nats_server

    # So the killed replica's unacked deliveries come back within seconds.
    await trio.to_thread.run_sync(
        lambda: create_durable(nats, ack_wait_s=3.0, max_ack_pending=20_000)
    )
    names = [f"g{i:02d}" for i in range(24)]
    gateways = Gateways(nats, names)
    configs = [{"tenant_id": TENANT, "timeout_ms": TIMEOUT_MS}]
    conninfo = pg_database.conninfo
    with trio.fail_after(240):
        async with running_standin(nats, tmp_path, configs=configs) as standin:
            gateways.start()
            try:
                with (
                    spawn_daemon(
                        liveness_env(nats, pg_server, pg_database), tmp_path / "r1.log"
                    ) as r1,
                    spawn_daemon(
                        liveness_env(nats, pg_server, pg_database), tmp_path / "r2.log"
                    ) as r2,
                ):
                    await r1.wait_ready()
                    await r2.wait_ready()
                    await until(
                        lambda: all(standin.statuses(g) == ["online"] for g in names),
                        30,
                        "every gateway online",
                    )
                    await trio.sleep(2)  # both replicas ingest
                    leaders = [
                        await trio.to_thread.run_sync(r.metric, "notip_consumer_liveness_leader")
                        for r in (r1, r2)
                    ]
                    assert sorted(leaders) == [0.0, 1.0]
                    leader, survivor = (r1, r2) if leaders[0] == 1.0 else (r2, r1)

                    gateways.silence("g00")
                    await until(lambda: "offline" in standin.statuses("g00"), 30, "g00 offline")
                    await leader.sigkill()
                    killed_at = time.monotonic()
                    g01_last = gateways.silence("g01")
                    await until(lambda: "offline" in standin.statuses("g01"), 30, "g01 offline")
                    print(
                        f"takeover: g01 reported offline {time.monotonic() - killed_at:.2f} s "
                        f"after the SIGKILL (its last message {g01_last.isoformat()})"
                    )
                    assert (
                        await trio.to_thread.run_sync(
                            survivor.metric, "notip_consumer_liveness_leader"
                        )
                        == 1.0
                    )
                    await trio.sleep(2)  # any false alert would show now
                    await trio.to_thread.run_sync(gateways.stop)
                    sent = gateways.sent

                    # The killed replica's deliveries come back after ack_wait (3 s).
                    await until(
                        lambda: drained(nats) and telemetry_rows(conninfo) >= sent,
                        60,
                        "every message stored and acked",
                    )
                    survivor.signal(signal.SIGTERM)
                    await survivor.wait_exit(30)
            finally:
                await trio.to_thread.run_sync(gateways.stop)
        alerted = await trio.to_thread.run_sync(alerted_gateways, nats)

    assert alerted == ["g00", "g01"]
    assert telemetry_rows(conninfo) == sent
    for name in names:
        expected = ["online", "offline"] if name in ("g00", "g01") else ["online"]
        assert standin.statuses(name) == expected, name


async def test_a_leader_cut_off_from_postgres_without_a_close_is_replaced(
    private_nats_server, pg_server, pg_database, tmp_path: Path
) -> None:
    """The leader's path to PostgreSQL goes dark, sockets open (docs/leader-lock.md).

    A reaches PostgreSQL through the relay and leads; B connects directly. The
    relay then blackholes A's connections, open and new: PostgreSQL keeps
    granting the lock to A's idle session until its idle timeout ends it, then B
    takes over and alerts a gateway that fell silent meanwhile, exactly once.
    """
    nats = private_nats_server
    names = [f"g{i:02d}" for i in range(8)]
    gateways = Gateways(nats, names)
    configs = [{"tenant_id": TENANT, "timeout_ms": TIMEOUT_MS}]
    leader = "notip_consumer_liveness_leader"
    with Relay.start(pg_server.host, pg_server.port) as relay, trio.fail_after(300):
        env_a = liveness_env(nats, pg_server, pg_database) | {"DB_PORT": str(relay.port)}
        async with running_standin(nats, tmp_path, configs=configs) as standin:
            gateways.start()
            try:
                with spawn_daemon(env_a, tmp_path / "a.log") as a:
                    await a.wait_ready()
                    await until(lambda: a.metric(leader) == 1.0, 30, "A leads")
                    with spawn_daemon(
                        liveness_env(nats, pg_server, pg_database), tmp_path / "b.log"
                    ) as b:
                        await b.wait_ready()
                        await until(
                            lambda: all(standin.statuses(g) == ["online"] for g in names),
                            30,
                            "every gateway online",
                        )
                        await trio.sleep(2)  # both replicas ingest
                        assert await trio.to_thread.run_sync(b.metric, leader) == 0.0

                        frozen = relay.blackhole()
                        cut_at = time.monotonic()
                        gateways.silence("g00")
                        # The hang guard (60 s), well above the ~21 s bound: never a speed check.
                        await until(lambda: b.metric(leader) == 1.0, 60, "B leads")
                        took_over_s = time.monotonic() - cut_at
                        await until(lambda: "offline" in standin.statuses("g00"), 30, "g00 offline")
                        alerted_s = time.monotonic() - cut_at
                        # A's held deliveries come back after ack_wait (30 s): a repeated
                        # or a false alert or update would come by then.
                        await trio.sleep_until(trio.current_time() + max(3.0, 35 - alerted_s))
                        a_leads = await trio.to_thread.run_sync(a.metric, leader)
                        b_takeovers = await trio.to_thread.run_sync(
                            b.metric, "notip_consumer_liveness_takeovers_total"
                        )
                        a_logs = [e["event"] for e in a.json_logs()]
                        b_logs = [e["event"] for e in b.json_logs()]
            finally:
                await trio.to_thread.run_sync(gateways.stop)
        alerted = await trio.to_thread.run_sync(alerted_gateways, nats)
    print(
        f"\nblackhole: {frozen} connections of A frozen; B leads {took_over_s:.1f} s after, "
        f"g00 reported offline {alerted_s:.1f} s after"
    )
    assert frozen >= 2  # the lock session and the pool's
    assert a_leads == 0.0
    assert "liveness_leadership_lost" in a_logs
    assert b_takeovers == 1.0
    assert b_logs.count("liveness_leader_acquired") == 1
    assert alerted == ["g00"]
    for name in names:
        expected = ["online", "offline"] if name == "g00" else ["online"]
        assert standin.statuses(name) == expected, name
