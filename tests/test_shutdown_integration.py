"""Shutdown with a write held up in the real database (docs/contract.md Behaviour 6).

Rules: servers come from the fixtures; the daemon runs in the test's nursery
and stops through its `stop` event; every test has an absolute hang guard. No
timing assertion: the test holds an exclusive lock on `telemetry` from its own
connection and releases it only after the daemon returned, or after a minute
(much longer than the drain budget). The assertion is an order: did the
daemon return while the write was still held?
"""

from __future__ import annotations

import datetime as dt
import random
import threading

import psycopg
import trio

from devstack import js as _js
from devstack import simulator
from devstack.env import daemon_env
from notip_trio.metrics import Metrics

from .fix_daemon import daemon_settings, running_daemon, until

LOCK_HELD_S = 30.0  # far longer than SHUTDOWN_DRAIN_MS below (2 s) and the closes


class TableLock:
    """ACCESS EXCLUSIVE on `telemetry`, held from a thread until `release` (or
    LOCK_HELD_S); `released_by_timeout` says which ended it. The daemon's COPY
    waits on it up to its statement_timeout (60 s)."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.taken = threading.Event()
        self.release = threading.Event()
        self.released_by_timeout = False

    def hold(self) -> None:
        with psycopg.connect(self.conninfo) as conn:
            conn.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
            self.taken.set()
            self.released_by_timeout = not self.release.wait(LOCK_HELD_S)
            conn.rollback()


def _copy_waits_on_the_lock(conninfo: str) -> bool:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'notip-trio'"
            " AND wait_event_type = 'Lock' AND query ILIKE 'COPY%'"
        ).fetchone()
        return bool(row and row[0])


async def test_shutdown_does_not_wait_for_a_write_stuck_in_the_database(
    private_nats_server, pg_server, pg_database, monkeypatch
):
    env = daemon_env(private_nats_server, pg_server, pg_database.name)
    settings = daemon_settings(
        env, monkeypatch, SHUTDOWN_DRAIN_MS="2000", HEARTBEAT_GRACE_PERIOD_MS="600000"
    )
    rng = random.Random(14)
    base = dt.datetime(2026, 11, 27, tzinfo=dt.UTC)
    msgs = [
        (
            simulator.subject_for("t1", "gw-1"),
            simulator.make_envelope(
                "gw-1", "s1", "temperature", base + dt.timedelta(seconds=i), rng=rng
            ),
        )
        for i in range(50)
    ]
    lock = TableLock(pg_database.conninfo)
    returned_while_held: bool | None = None
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            async with running_daemon(settings, Metrics()):  # migrates: the table exists
                nursery.start_soon(trio.to_thread.run_sync, lock.hold)
                await until(lock.taken.is_set, 30, "the table lock")
                await trio.to_thread.run_sync(_js.publish, private_nats_server, msgs)
                await until(
                    lambda: _copy_waits_on_the_lock(pg_database.conninfo),
                    30,
                    "the daemon's COPY to wait on the lock",
                )
                # Leaving the block sets `stop` and waits for the daemon to return.
            returned_while_held = not lock.release.is_set() and not lock.released_by_timeout
            lock.release.set()
    assert returned_while_held
