"""Storage on a real PostgreSQL: migrations (incl. a table the Go service filled),
COPY writes, redelivery dedup, rejected records."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest
import trio
from psycopg.conninfo import make_conninfo

from notip_trio.db.pool import RECONNECT_MAX_DELAY_S, ReconnectAttempt
from notip_trio.db.schema import (
    TimescalePlan,
    preloads_timescaledb,
    probe_timescaledb,
    timescaledb_plan,
)
from notip_trio.db.writer import RejectedRecord, Storage
from notip_trio.envelope import Row

from .fix_servers import scalar, telemetry_rows

T0 = dt.datetime(2026, 11, 27, tzinfo=dt.UTC)
GO_SCHEMA = """
CREATE TABLE telemetry (
    time TIMESTAMPTZ NOT NULL, tenant_id TEXT NOT NULL, gateway_id TEXT NOT NULL,
    sensor_id TEXT NOT NULL, sensor_type TEXT NOT NULL, encrypted_data TEXT NOT NULL,
    iv TEXT NOT NULL, auth_tag TEXT NOT NULL, key_version INTEGER NOT NULL);
CREATE INDEX idx_telemetry_tenant_gateway_time ON telemetry (tenant_id, gateway_id, time DESC);
"""


def _row(i: int, blob: str = "QUJD", sensor: str = "s1") -> Row:
    return Row(
        T0 + dt.timedelta(seconds=i), "t1", "g1", sensor, "humidity", blob, "aXY=", "dGFn", 1
    )


def _is_hypertable(conninfo: str) -> bool:
    """What the database says: is `telemetry` a TimescaleDB hypertable?"""
    with psycopg.connect(conninfo) as conn:
        if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
            return False
        found = conn.execute(
            "SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_name = 'telemetry'"
        ).fetchone()
        return found is not None


def _plan(conninfo: str) -> TimescalePlan:
    with psycopg.connect(conninfo) as conn:
        return timescaledb_plan(probe_timescaledb(conn))


async def _storage(conninfo: str) -> Storage:
    storage = Storage.create(conninfo, min_size=1, max_size=2)
    await storage.open(timeout_s=10)
    return storage


async def test_fresh_database_migrates_idempotently_and_dedups(pg_database) -> None:
    plan = _plan(pg_database.conninfo)
    storage = await _storage(pg_database.conninfo)
    try:
        first = await storage.migrate()
        second = await storage.migrate()
        assert first == second
        assert first.dedup_index
        # Either storage is fine; the one the server allows is the one we get.
        assert first.hypertable == (plan is TimescalePlan.HYPERTABLE)
        assert _is_hypertable(pg_database.conninfo) == first.hypertable
        rows = [_row(i) for i in range(300)]
        result = await storage.write_batch(rows[:200], [])
        assert (result.inserted, result.duplicates) == (200, 0)
        # A redelivered overlap: only the 100 new rows land.
        result = await storage.write_batch(rows[100:], [])
        assert (result.inserted, result.duplicates) == (100, 100)
        # Duplicates inside one batch collapse too.
        result = await storage.write_batch([_row(1000), _row(1000)], [])
        assert (result.inserted, result.duplicates) == (1, 1)
    finally:
        await storage.close()
    assert telemetry_rows(pg_database.conninfo) == 301


async def test_rejected_records_are_kept_once_per_stream_sequence(pg_database) -> None:
    storage = await _storage(pg_database.conninfo)
    record = RejectedRecord(T0, "telemetry.data.t1", "bad_subject", "d", b"\x00\xff", 2, 42)
    try:
        await storage.migrate()
        await storage.write_batch([_row(1)], [record])
        await storage.write_batch([], [record])  # redelivered
    finally:
        await storage.close()
    with psycopg.connect(pg_database.conninfo) as conn:
        kept = conn.execute("SELECT reason, body, body_length FROM telemetry_rejected").fetchall()
    assert kept == [("bad_subject", b"\x00\xff", 2)]


async def test_go_filled_table_with_exact_duplicates_gets_its_index(pg_database) -> None:
    with psycopg.connect(pg_database.conninfo) as conn:
        conn.execute(GO_SCHEMA)
        with conn.cursor().copy("COPY telemetry FROM STDIN") as copy:
            for i in range(50):
                copy.write_row(_row(i))
                if i % 5 == 0:
                    copy.write_row(_row(i))  # the Go service wrote this one twice
    storage = await _storage(pg_database.conninfo)
    try:
        info = await storage.migrate()
        assert info.exact_duplicates_removed == 10
        assert info.dedup_index
        assert info.conflicting_keys == 0
    finally:
        await storage.close()
    assert telemetry_rows(pg_database.conninfo) == 50


async def test_go_filled_table_with_differing_rows_under_one_key_keeps_them(
    pg_server, pg_database
) -> None:
    with psycopg.connect(pg_database.conninfo) as conn:
        conn.execute(GO_SCHEMA)
        with conn.cursor().copy("COPY telemetry FROM STDIN") as copy:
            for i in range(20):
                copy.write_row(_row(i))
            copy.write_row(_row(3))  # exact duplicate: removed
            copy.write_row(_row(7, blob="T1RIRVI="))  # same key, another reading: kept
    storage = await _storage(pg_database.conninfo)
    try:
        info = await storage.migrate()
        assert info.exact_duplicates_removed == 1
        assert not info.dedup_index
        assert info.conflicting_keys == 1
        assert info.hypertable == pg_server.timescaledb_available
        assert _is_hypertable(pg_database.conninfo) == info.hypertable
        # Still effectively once, through the NOT EXISTS fallback.
        result = await storage.write_batch([_row(5), _row(100)], [])
        assert (result.inserted, result.duplicates) == (1, 1)
        # A restart finds the same state and still starts.
        assert await storage.migrate() == info.__class__(info.hypertable, False, 0, 1)
    finally:
        await storage.close()
    assert telemetry_rows(pg_database.conninfo) == 22
    assert (
        scalar(
            pg_database.conninfo, "SELECT count(*) FROM telemetry WHERE encrypted_data <> 'QUJD'"
        )
        == 1
    )


def test_timescaledb_probe_sees_what_the_server_has(pg_server, pg_database) -> None:
    """The probe on a real server, as the application role and as the admin role."""
    with psycopg.connect(pg_database.conninfo) as conn:
        app = probe_timescaledb(conn)
    with psycopg.connect(make_conninfo(pg_server.admin_conninfo, dbname=pg_database.name)) as conn:
        admin = probe_timescaledb(conn)
    assert app.available == admin.available == pg_server.timescaledb_available
    assert not app.created  # a fresh database
    assert app.loader_running == admin.loader_running
    # The role that may read shared_preload_libraries agrees with the loader's setting.
    if admin.preload is not None:
        assert preloads_timescaledb(admin.preload) == admin.loader_running
    if pg_server.can_restart:
        # Our own cluster (devstack): the application role is no superuser, so it
        # cannot read shared_preload_libraries; the admin role can; and timescaledb
        # is preloaded exactly when it is installed. Either way it never has to stop.
        assert app.preload is None
        assert admin.preload is not None
        assert app.loader_running == app.available
        expected = TimescalePlan.HYPERTABLE if app.available else TimescalePlan.PLAIN
        assert timescaledb_plan(app) is expected


async def test_hypertable_when_timescaledb_is_available(timescaledb_database) -> None:
    assert _plan(timescaledb_database.conninfo) is TimescalePlan.HYPERTABLE
    storage = await _storage(timescaledb_database.conninfo)
    try:
        info = await storage.migrate()
        assert info.hypertable
        assert _is_hypertable(timescaledb_database.conninfo)
        assert info.dedup_index
        await storage.write_batch([_row(i) for i in range(10)], [])
        assert (await storage.write_batch([_row(1)], [])).duplicates == 1
    finally:
        await storage.close()


async def test_go_filled_table_that_is_already_a_hypertable(timescaledb_database) -> None:
    """The Go service's table, made a hypertable by hand and filled across several
    chunks (one row a day over 40 days), with exact duplicates in more than one
    chunk: kept a hypertable, duplicates removed chunk by chunk, the dedup index
    built. Only where TimescaleDB exists (the fixture skips, saying why)."""
    conninfo = timescaledb_database.conninfo
    day = [_row(0)._replace(time=T0 + dt.timedelta(days=i)) for i in range(40)]
    with psycopg.connect(conninfo) as conn:
        conn.execute(GO_SCHEMA)
        conn.execute("SELECT create_hypertable('telemetry', 'time')")
        with conn.cursor().copy("COPY telemetry FROM STDIN") as copy:
            for i, row in enumerate(day):
                copy.write_row(row)
                if i % 10 == 0:
                    copy.write_row(row)  # written twice, in four different chunks
        chunks = conn.execute("SELECT count(*) FROM show_chunks('telemetry')").fetchone()
    assert chunks is not None
    assert chunks[0] >= 4
    assert _is_hypertable(conninfo)
    storage = await _storage(conninfo)
    try:
        info = await storage.migrate()
        assert (info.hypertable, info.dedup_index) == (True, True)
        assert (info.exact_duplicates_removed, info.conflicting_keys) == (4, 0)
        assert _is_hypertable(conninfo)
        result = await storage.write_batch([*day[:5], _row(7)], [])
        assert (result.inserted, result.duplicates) == (1, 5)
        # A restart finds the same state and removes nothing more.
        assert await storage.migrate() == info.__class__(True, True, 0, 0)
    finally:
        await storage.close()
    assert telemetry_rows(conninfo) == 41


async def test_unreachable_database_is_a_clear_error() -> None:
    from notip_trio.errors import DatabaseError

    storage = Storage.create(
        "host=127.0.0.1 port=1 dbname=x user=x connect_timeout=1", min_size=1, max_size=1
    )
    with trio.fail_after(20), pytest.raises(DatabaseError, match="cannot connect to PostgreSQL"):
        await storage.open(timeout_s=2)
    await storage.close()


def test_the_pool_retries_a_lost_server_at_a_bounded_interval() -> None:
    """psycopg_pool's own policy doubles the delay up to reconnect_timeout (1, 2,
    4, 8, 16 s ...); the pool here retries at most RECONNECT_MAX_DELAY_S apart,
    and still gives up after reconnect_timeout."""
    attempt = ReconnectAttempt(timeout=300.0)
    delays: list[float] = []
    now = 0.0
    for _ in range(1000):
        if attempt.time_to_give_up(now):
            break
        attempt.update_delay(now)
        delays.append(attempt.delay)
        now += attempt.delay
    assert 0.45 <= delays[0] <= 0.55  # 0.5 s, jittered by 10 %
    assert delays[2:7] == [RECONNECT_MAX_DELAY_S] * 5
    assert max(delays) == RECONNECT_MAX_DELAY_S
    assert now == pytest.approx(300.0)
