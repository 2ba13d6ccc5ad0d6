"""The database failing under a running leader, as real processes.

Rules as in test_ha.py: fresh servers per test, the daemon as its own process,
the management API as the stand-in process (it records every request),
gateways publishing from a thread every 0.25 s, 250 ms ticks. Every wait polls
real state with a deadline; each test has an absolute hang guard. Nothing
asserts on speed: recovery times are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from devstack import js as _js
from devstack.natsd import NatsServer
from devstack.postgres import PgDatabase, PgServer
from notip_trio.mgmt import SUBJECT_GET_STATUS

from ._standin import running_standin
from .fix_daemon import DaemonProcess, liveness_env, spawn_daemon, until
from .fix_servers import drained, telemetry_rows
from .sim_gateways import TENANT, Gateways, alerted_gateways

# Daemons as their own processes, their database stopped and its backends ended.
pytestmark = pytest.mark.slow

OUTAGE_S = 20.0

# The daemon's pool connections: its application name, and not the session
# that holds the liveness lock (terminating that one is another fault).
_POOL_BACKENDS = """
SELECT pid, wait_event_type = 'Lock'
       AND query LIKE '%%SELECT g.tenant_id, g.gateway_id, g.last_seen FROM gateway_liveness g%%'
  FROM pg_stat_activity
 WHERE datname = %(db)s AND application_name = 'notip-trio' AND pid <> pg_backend_pid()
   AND pid NOT IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)
"""


def _pool_backends(db: PgDatabase) -> list[tuple[int, bool]]:
    """(pid, waiting to re-read a last-seen) of each of the daemon's pool backends."""
    with psycopg.connect(db.conninfo, connect_timeout=10) as conn:
        rows = conn.execute(_POOL_BACKENDS, {"db": db.name}).fetchall()
    return [(int(pid), bool(rereading)) for pid, rereading in rows]


def _terminate(db: PgDatabase, pids: list[int]) -> int:
    with psycopg.connect(db.conninfo, connect_timeout=10, autocommit=True) as conn:
        ended = 0
        for pid in pids:
            row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
            ended += bool(row and row[0])
        return ended


def _first_request(server: NatsServer, subject: str, listening: threading.Event) -> None:
    """Return when the first request on `subject` arrives (not when it is answered:
    the stand-in records a request only as it replies)."""

    async def fn(nc: Any) -> None:
        arrived = asyncio.Event()

        async def seen(msg: Any) -> None:
            arrived.set()

        await nc.subscribe(subject, cb=seen)
        await nc.flush()
        listening.set()
        await arrived.wait()

    _js.run_nats(server, fn, "test-client", timeout_s=120)


async def test_pool_backends_terminated_during_a_tick_end_the_tick_not_the_process(
    private_nats_server: NatsServer, pg_server: PgServer, pg_database: PgDatabase, tmp_path: Path
) -> None:
    """Six gateways fall silent (2 s timeout) while two keep sending (60 s
    timeout). get-status takes 2 s; while the tick waits for it, the test takes
    an exclusive lock on the liveness table, so the tick's re-read of last-seen
    (one statement for the chunk) then waits inside a database round trip;
    there every pool backend of the daemon is terminated (a failover), and the
    lock let go. The tick ends with a
    database error; the process stays up and the next tick alerts each silent
    gateway exactly once."""
    nats, db = private_nats_server, pg_database
    silent = [f"s{i}" for i in range(6)]
    alive = ["a0", "a1"]
    configs = [{"tenant_id": TENANT, "timeout_ms": 2000}] + [
        {"tenant_id": TENANT, "gateway_id": g, "timeout_ms": 60_000} for g in alive
    ]
    gateways = Gateways(nats, silent + alive)
    with trio.fail_after(180):
        async with running_standin(nats, tmp_path, configs=configs, delay_ms=2000) as standin:
            gateways.start()
            try:
                with spawn_daemon(
                    liveness_env(nats, pg_server, db), tmp_path / "daemon.log"
                ) as daemon:
                    await daemon.wait_ready()
                    await until(
                        lambda: all(standin.statuses(g) == ["online"] for g in silent + alive),
                        30,
                        "every gateway online",
                    )
                    listening, asked = threading.Event(), trio.Event()

                    async def watch() -> None:
                        await trio.to_thread.run_sync(
                            _first_request, nats, SUBJECT_GET_STATUS, listening
                        )
                        asked.set()

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(watch)
                        await until(listening.is_set, 30, "a get-status watcher")
                        for g in silent:
                            gateways.silence(g)
                        await asked.wait()  # the tick now waits 2 s for get-status
                    with psycopg.connect(db.conninfo, connect_timeout=10) as holder:
                        holder.execute("LOCK TABLE gateway_liveness IN ACCESS EXCLUSIVE MODE")
                        await until(
                            lambda: any(rereading for _, rereading in _pool_backends(db)),
                            30,
                            "a check re-reading last-seen, inside a database round trip",
                        )
                        await trio.sleep(0.5)  # any other round trip gets there too
                        rereading = sum(r for _, r in _pool_backends(db))
                        pids = [pid for pid, _ in _pool_backends(db)]
                        ended = await trio.to_thread.run_sync(_terminate, db, pids)
                        holder.rollback()
                    terminated_at = time.monotonic()
                    await until(
                        lambda: all("offline" in standin.statuses(g) for g in silent),
                        60,
                        "every silent gateway offline",
                    )
                    print(
                        f"{ended} pool backends terminated during a tick ({rereading} of them "
                        "re-reading last-seen); every silent gateway "
                        f"reported offline {time.monotonic() - terminated_at:.2f} s later"
                    )
                    await trio.sleep(3)  # a repeated alert or update would come now
                    assert daemon.running, daemon.tail()
                    events = [e["event"] for e in daemon.json_logs()]
            finally:
                await trio.to_thread.run_sync(gateways.stop)
        alerted = await trio.to_thread.run_sync(alerted_gateways, nats)

    assert ended >= 1
    assert "liveness_tick_database_error" in events  # the fault hit a tick
    assert "startup_failed" not in events
    assert "fatal" not in events
    assert alerted == sorted(silent)
    for g in silent:
        assert standin.statuses(g) == ["online", "offline"], g
    for g in alive:
        assert standin.statuses(g) == ["online"], g


def _logged_after(daemon: DaemonProcess, event: str, since: dt.datetime) -> float | None:
    """Seconds from `since` to the first `event` the daemon logged after it."""
    for entry in daemon.json_logs():
        at = dt.datetime.fromisoformat(entry["time"])
        if entry["event"] == event and at >= since:
            return (at - since).total_seconds()
    return None


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 2)


async def test_ingest_and_the_leaders_load_resume_soon_after_a_database_outage(
    private_nats_server: NatsServer, private_pg_server: PgServer, tmp_path: Path
) -> None:
    """PostgreSQL stopped for 20 s while 20 gateways send (5 s timeout): every
    message is stored once, no gateway is alerted, and the first batch commit and
    the leader's state load after the restart are printed (seconds after it)."""
    nats, pg = private_nats_server, private_pg_server
    db = pg.create_database()
    names = [f"g{i:02d}" for i in range(20)]
    configs = [{"tenant_id": TENANT, "timeout_ms": 5000}]
    gateways = Gateways(nats, names)
    with trio.fail_after(240):
        async with running_standin(nats, tmp_path, configs=configs) as standin:
            gateways.start()
            try:
                with spawn_daemon(liveness_env(nats, pg, db), tmp_path / "daemon.log") as daemon:
                    await daemon.wait_ready()
                    await until(
                        lambda: all(standin.statuses(g) == ["online"] for g in names),
                        30,
                        "every gateway online",
                    )
                    await trio.sleep(2)
                    await trio.to_thread.run_sync(pg.stop)
                    await trio.sleep(OUTAGE_S)
                    await trio.to_thread.run_sync(pg.start)
                    restarted = dt.datetime.now(dt.UTC)
                    await until(
                        lambda: (
                            _logged_after(daemon, "liveness_state_loaded", restarted) is not None
                        ),
                        60,
                        "the leader's state load after the restart",
                    )
                    await trio.sleep(5)  # a false alert would come now
                    await trio.to_thread.run_sync(gateways.stop)
                    sent = gateways.sent

                    def stored_and_drained() -> bool:
                        return drained(nats) and telemetry_rows(db.conninfo) >= sent

                    await until(stored_and_drained, 60, "every message stored and acked")
                    first_commit = _logged_after(daemon, "batch_write_recovered", restarted)
                    loaded = _logged_after(daemon, "liveness_state_loaded", restarted)
                    failed_loads = sum(
                        e["event"] == "liveness_state_load_failed" for e in daemon.json_logs()
                    )
                    print(
                        f"PostgreSQL down {OUTAGE_S:g} s: first batch committed "
                        f"{_round(first_commit)} s "
                        f"and the leader's state loaded {_round(loaded)} s after the restart "
                        f"({failed_loads} failed loads)"
                    )
                    daemon.signal(signal.SIGTERM)
                    code, _ = await daemon.wait_exit(30)
                    assert code == 0, daemon.tail()
            finally:
                await trio.to_thread.run_sync(gateways.stop)
        alerted = await trio.to_thread.run_sync(alerted_gateways, nats)

    assert telemetry_rows(db.conninfo) == sent
    # The nak'd backlog holds the durable's ack floor, so the horizon waits for it.
    assert alerted == []
    for name in names:
        assert standin.statuses(name) == ["online"], name
