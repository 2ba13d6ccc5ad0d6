"""The telemetry lifecycle on a real server: the policies on TimescaleDB (the
fixture skips, saying why, where the extension is absent), the one line on
plain PostgreSQL, and the dedup key on compressed chunks."""

from __future__ import annotations

import datetime as dt
import logging

import psycopg
import pytest

from notip_trio.db.lifecycle import ORDERBY, SEGMENTBY, Lifecycle, read_facts
from notip_trio.db.writer import Storage
from notip_trio.envelope import Row

from .fix_servers import scalar, telemetry_rows

D = 24
T0 = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)


def _row(i: int, *, day: int = 0, blob: str = "QUJD", gateway: str = "g1") -> Row:
    at = T0 + dt.timedelta(days=day, seconds=i)
    return Row(at, "t1", gateway, f"s{i % 3}", "humidity", blob, "aXY=", "dGFn", 1)


async def _storage(conninfo: str) -> Storage:
    storage = Storage.create(conninfo, min_size=1, max_size=2)
    await storage.open(timeout_s=10)
    return storage


def _facts(conninfo: str):  # type: ignore[no-untyped-def]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return read_facts(conn)  # type: ignore[arg-type]


async def test_plain_postgresql_says_once_that_the_policies_need_timescaledb(
    pg_server, pg_database, caplog: pytest.LogCaptureFixture
) -> None:
    if pg_server.timescaledb_available:
        pytest.skip("this server has TimescaleDB: the plain path is not taken")
    storage = await _storage(pg_database.conninfo)
    try:
        with caplog.at_level(logging.INFO, logger="notip_trio.db.lifecycle"):
            info = await storage.migrate(Lifecycle(7 * D, 90 * D))
    finally:
        await storage.close()
    assert (info.hypertable, info.compression) == (False, False)
    lines = [r for r in caplog.records if r.getMessage() == "telemetry_lifecycle_needs_timescaledb"]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING  # a retention was asked for
    # Nothing TimescaleDB-specific was created.
    assert (
        scalar(
            pg_database.conninfo,
            "SELECT count(*) FROM pg_class WHERE relname = 'telemetry_policies'",
        )
        == 0
    )


async def test_policies_follow_the_settings_across_restarts(timescaledb_database) -> None:
    conninfo = timescaledb_database.conninfo
    storage = await _storage(conninfo)
    try:
        info = await storage.migrate(Lifecycle(7 * D, 90 * D))
        assert (info.hypertable, info.compression) == (True, True)
        first = _facts(conninfo)
        assert first is not None
        assert first.chunk_interval_s == 86400
        assert (first.segmentby, first.orderby) == (SEGMENTBY, ORDERBY)
        assert first.compression_policy is not None
        assert first.retention_policy is not None
        assert first.compression_policy.after_s == 7 * 86400
        assert first.retention_policy.after_s == 90 * 86400
        assert first.compression_policy.ours
        assert first.retention_policy.ours

        # The same settings again: nothing changes (same job ids).
        await storage.migrate(Lifecycle(7 * D, 90 * D))
        assert _facts(conninfo) == first

        # A changed value replaces the policy.
        await storage.migrate(Lifecycle(2 * D, 30 * D))
        changed = _facts(conninfo)
        assert changed is not None
        assert changed.compression_policy is not None
        assert changed.retention_policy is not None
        assert changed.compression_policy.after_s == 2 * 86400
        assert changed.retention_policy.after_s == 30 * 86400
        assert changed.compression_policy.ours

        # Off removes our policies; compression stays enabled.
        info = await storage.migrate(Lifecycle(None, None))
        gone = _facts(conninfo)
        assert gone is not None
        assert (gone.compression_policy, gone.retention_policy) == (None, None)
        assert gone.compression_enabled
        assert info.compression
    finally:
        await storage.close()


async def test_off_leaves_a_hand_made_retention_policy_alone(timescaledb_database) -> None:
    conninfo = timescaledb_database.conninfo
    storage = await _storage(conninfo)
    try:
        await storage.migrate(Lifecycle(None, None))
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(
                "SELECT add_retention_policy('telemetry', drop_after => INTERVAL '400 days')"
            )
        await storage.migrate(Lifecycle(None, None))
        facts = _facts(conninfo)
        assert facts is not None
        assert facts.retention_policy is not None
        assert facts.retention_policy.after_s == 400 * 86400
        assert not facts.retention_policy.ours
    finally:
        await storage.close()


async def test_a_late_or_replayed_row_in_a_compressed_chunk_is_stored_once(
    timescaledb_database,
) -> None:
    """Rows of day 0 are written and their chunk compressed; then a batch mixes
    rows already there (a replay), new rows of the same compressed chunk (late
    readings) and a duplicate inside the batch: each key ends up stored once,
    both through the fast COPY path's fallback and a second replay."""
    conninfo = timescaledb_database.conninfo
    storage = await _storage(conninfo)
    try:
        info = await storage.migrate(Lifecycle(7 * D, None))
        assert info.compression
        old = [_row(i) for i in range(0, 600, 2)]  # 300 rows of day 0, even seconds
        assert (await storage.write_batch(old, [])).inserted == 300
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("SELECT compress_chunk(c) FROM show_chunks('telemetry') c")
            still = conn.execute(
                "SELECT count(*) FROM timescaledb_information.chunks"
                " WHERE hypertable_name = 'telemetry' AND is_compressed"
            ).fetchone()
            assert still is not None
            assert still[0] >= 1

        replayed = old[:100]
        late = [_row(i) for i in range(1, 200, 2)]  # 100 odd seconds: new keys in that chunk
        batch = [*replayed[:50], *late[:50], *replayed[50:], late[0], *late[50:]]
        result = await storage.write_batch(batch, [])
        assert (result.inserted, result.duplicates) == (100, len(batch) - 100)
        # The same window again stores nothing.
        result = await storage.write_batch(batch, [])
        assert (result.inserted, result.duplicates) == (0, len(batch))
        # A late row alone (the fast path, COPY straight into the compressed chunk).
        assert (await storage.write_batch([_row(1001)], [])).inserted == 1
        assert (await storage.write_batch([_row(1001)], [])).duplicates == 1
    finally:
        await storage.close()
    assert telemetry_rows(conninfo) == 401
    assert (
        scalar(
            conninfo,
            "SELECT count(*) FROM (SELECT 1 FROM telemetry GROUP BY tenant_id, gateway_id,"
            " sensor_id, time HAVING count(*) > 1) d",
        )
        == 0
    )


async def test_the_guarded_merge_stores_each_key_once(pg_database) -> None:
    """The merge used where compression is on (writer._MERGE_GUARDED), run on
    any PostgreSQL: repeats within a batch and rows already stored are left
    out before the insert. (Set by hand here: only a compressed hypertable
    turns it on.)"""
    storage = await _storage(pg_database.conninfo)
    try:
        await storage.migrate()
        storage._compression = True
        old = [_row(i) for i in range(0, 200, 2)]
        assert (await storage.write_batch(old, [])).inserted == 100
        late = [_row(i) for i in range(1, 100, 2)]
        batch = [*old[:30], *late[:25], late[0], *old[30:60], *late[25:]]
        result = await storage.write_batch(batch, [])
        assert (result.inserted, result.duplicates) == (50, len(batch) - 50)
        result = await storage.write_batch(batch, [])
        assert (result.inserted, result.duplicates) == (0, len(batch))
    finally:
        await storage.close()
    assert telemetry_rows(pg_database.conninfo) == 150
