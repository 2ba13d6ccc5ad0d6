"""The schema: every table and index, the start-up migration, and TimescaleDB.

Tables: `telemetry` (docs/contract.md), `telemetry_rejected` (messages that broke
the contract), `gateway_liveness` (one row per gateway) and
`gateway_status_outbox` (status reports not yet delivered); the statements of
the last two live in db/liveness.py.

Effectively once: a unique index on (tenant_id, gateway_id, sensor_id, time)
lets the writer (writer.py) make a redelivered message never make a second row.

TimescaleDB: `timescaledb_plan` is the one decision, from what the server says
(`TimescaleProbe`); the migration acts on it and `notip-trio check` reports it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, cast

import psycopg
from psycopg import sql

from ..errors import DatabaseError
from ..log import get_logger
from .lifecycle import Lifecycle, migrate_lifecycle, note_plain
from .pool import Conn

log = get_logger(__name__)

COLUMNS: Final = (
    "time",
    "tenant_id",
    "gateway_id",
    "sensor_id",
    "sensor_type",
    "encrypted_data",
    "iv",
    "auth_tag",
    "key_version",
)
DEDUP_INDEX: Final = "telemetry_dedup_key"
#: What the migration creates (`notip-trio check` looks for them by these names).
TABLES: Final = ("telemetry", "telemetry_rejected", "gateway_liveness", "gateway_status_outbox")
INDEXES: Final = (
    "idx_telemetry_tenant_gateway_time",
    DEDUP_INDEX,
    "telemetry_rejected_stream_seq",
    "telemetry_rejected_received_at",
    "gateway_liveness_changed_key",
    "gateway_liveness_retired",
    "gateway_status_outbox_gateway",
)
_MIGRATION_LOCK: Final = 0x6E6F746970  # "notip": serialises migrations across replicas

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS telemetry (
    time           TIMESTAMPTZ NOT NULL,
    tenant_id      TEXT        NOT NULL,
    gateway_id     TEXT        NOT NULL,
    sensor_id      TEXT        NOT NULL,
    sensor_type    TEXT        NOT NULL,
    encrypted_data TEXT        NOT NULL,
    iv             TEXT        NOT NULL,
    auth_tag       TEXT        NOT NULL,
    key_version    INTEGER     NOT NULL
);
CREATE TABLE IF NOT EXISTS telemetry_rejected (
    id            BIGSERIAL   PRIMARY KEY,
    received_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    subject       TEXT        NOT NULL,
    reason        TEXT        NOT NULL,
    detail        TEXT        NOT NULL,
    body          BYTEA       NOT NULL,
    body_length   INTEGER     NOT NULL,
    stream_seq    BIGINT
);
CREATE UNIQUE INDEX IF NOT EXISTS telemetry_rejected_stream_seq
    ON telemetry_rejected (stream_seq);
CREATE INDEX IF NOT EXISTS telemetry_rejected_received_at
    ON telemetry_rejected (received_at DESC);
"""
_INDEX: Final = """
CREATE INDEX IF NOT EXISTS idx_telemetry_tenant_gateway_time
    ON telemetry (tenant_id, gateway_id, time DESC);
"""
_DEDUP: Final = f"""
CREATE UNIQUE INDEX IF NOT EXISTS {DEDUP_INDEX}
    ON telemetry (tenant_id, gateway_id, sensor_id, time);
"""
# Rows equal in every column are the same reading written twice (the Go service
# wrote at least once); keep one of each. Rows that differ anywhere are kept.
_DELETE_EXACT_DUPLICATES: Final = """
DELETE FROM telemetry a USING telemetry b
 WHERE a.ctid > b.ctid
   AND a.time = b.time AND a.tenant_id = b.tenant_id AND a.gateway_id = b.gateway_id
   AND a.sensor_id = b.sensor_id AND a.sensor_type = b.sensor_type
   AND a.encrypted_data = b.encrypted_data AND a.iv = b.iv AND a.auth_tag = b.auth_tag
   AND a.key_version = b.key_version
"""
_COUNT_KEY_CONFLICTS: Final = """
SELECT count(*) FROM (
  SELECT 1 FROM telemetry GROUP BY tenant_id, gateway_id, sensor_id, time HAVING count(*) > 1
) k
"""
_LIVENESS: Final = """
CREATE TABLE IF NOT EXISTS gateway_liveness (
    tenant_id        TEXT        NOT NULL,
    gateway_id       TEXT        NOT NULL,
    last_seen        TIMESTAMPTZ NOT NULL,
    status           TEXT        NOT NULL DEFAULT 'new'
        CHECK (status IN ('new', 'online', 'offline', 'decommissioned')),
    status_last_seen TIMESTAMPTZ,
    status_at        TIMESTAMPTZ,
    changed_xid      XID8        NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (tenant_id, gateway_id)
);
-- A change read pages by (changed_xid, key): this index gives the pages in
-- order (0.2.0). It replaces one on changed_xid alone, with which every page
-- sorted all the rows of its transactions (a million rows changed in one
-- transaction: ~1 s per 20,000-row page).
CREATE INDEX IF NOT EXISTS gateway_liveness_changed_key
    ON gateway_liveness (changed_xid, tenant_id, gateway_id);
DROP INDEX IF EXISTS gateway_liveness_changed;
-- The janitor's purge of retired rows (janitor.py): only those rows, a small index.
-- Additive: a release without it runs beside one with it.
CREATE INDEX IF NOT EXISTS gateway_liveness_retired ON gateway_liveness (status_at)
    WHERE status IN ('offline', 'decommissioned');
-- A transition's status report, queued in the transition's own transaction
-- (db/liveness.py, dispatch.py). Added in 0.2.0: additive, so 0.1.0 runs beside it.
CREATE TABLE IF NOT EXISTS gateway_status_outbox (
    id            BIGSERIAL   PRIMARY KEY,
    tenant_id     TEXT        NOT NULL,
    gateway_id    TEXT        NOT NULL,
    status        TEXT        NOT NULL CHECK (status IN ('online', 'offline')),
    last_seen     TIMESTAMPTZ NOT NULL,
    transition_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS gateway_status_outbox_gateway
    ON gateway_status_outbox (tenant_id, gateway_id, id);
"""


@dataclass(frozen=True, slots=True)
class SchemaInfo:
    hypertable: bool
    dedup_index: bool
    exact_duplicates_removed: int
    conflicting_keys: int
    compression: bool = False  # TimescaleDB compression enabled on telemetry (lifecycle.py)


def migrate(conn: Conn, lifecycle: Lifecycle | None = None) -> SchemaInfo:
    """Create or update every table and index (autocommit `conn`, worker thread).

    Serialised across replicas by an advisory lock; idempotent. Looks at
    TimescaleDB first (`decide_timescaledb`); then the tables, the hypertable,
    the indexes; builds the dedup index, removing exact duplicates the Go
    service left if they stand in its way. `SchemaInfo.dedup_index` False: rows
    that differ under one key keep it from being built (the writer falls back).
    Last, with `lifecycle`, the compression and retention policies
    (lifecycle.py): applied on a hypertable, one line about them on plain
    PostgreSQL; None leaves them as they are.
    """
    conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
    try:
        # Before any DDL: with an unpreloaded extension, DDL alone ends the connection.
        hypertable = decide_timescaledb(conn) is TimescalePlan.HYPERTABLE
        conn.execute(_SCHEMA)
        conn.execute(_LIVENESS)
        if hypertable:
            _make_hypertable(conn)
        conn.execute(_INDEX)
        removed, conflicts = 0, 0
        try:
            conn.execute(_DEDUP)
        except psycopg.errors.UniqueViolation:
            cur = conn.execute(_DELETE_EXACT_DUPLICATES)
            removed = max(cur.rowcount, 0)
            log.warning("exact_duplicates_removed", rows=removed)
            try:
                conn.execute(_DEDUP)
            except psycopg.errors.UniqueViolation:
                row = conn.execute(_COUNT_KEY_CONFLICTS).fetchone()
                conflicts = cast(int, row[0]) if row else 0  # count(*)
        dedup_index = conflicts == 0
        if not dedup_index:
            log.warning(
                "dedup_index_unavailable",
                conflicting_keys=conflicts,
                detail=(
                    "telemetry holds differing rows under one (tenant_id, gateway_id, "
                    "sensor_id, time); they are kept and redelivery dedup falls back to "
                    "a slower NOT EXISTS check (README: Deduplication)"
                ),
            )
        compression = False
        if lifecycle is not None and hypertable:
            compression = migrate_lifecycle(conn, lifecycle)
        elif lifecycle is not None:
            note_plain(lifecycle)
        return SchemaInfo(hypertable, dedup_index, removed, conflicts, compression)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))


# ---- TimescaleDB: use it only where it can work -------------------------------
#
# With the timescaledb package installed but not in `shared_preload_libraries`,
# `CREATE EXTENSION timescaledb` (and any later use of an existing extension) ends
# the connection with a FATAL ("extension must be preloaded"): the client sees only
# "the connection is lost". So look first, then decide (`timescaledb_plan`).

PRELOAD_SETTING: Final = "shared_preload_libraries = 'timescaledb'"

# `shared_preload_libraries` is readable only by superusers and pg_read_all_settings,
# which the application role usually is not. The TimescaleDB loader, once preloaded,
# defines `timescaledb.disable_load` in every backend: that any role can see.
_TIMESCALEDB_PROBE: Final = """
SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),
       EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'),
       current_setting('timescaledb.disable_load', true) IS NOT NULL,
       CASE WHEN pg_has_role('pg_read_all_settings', 'USAGE')
            THEN current_setting('shared_preload_libraries') END
"""


@dataclass(frozen=True, slots=True)
class TimescaleProbe:
    """What the server says about TimescaleDB, before anything touches it."""

    available: bool  # the package is installed (pg_available_extensions)
    created: bool  # CREATE EXTENSION already ran in this database
    loader_running: bool  # the preloaded loader defined timescaledb.disable_load
    preload: str | None  # shared_preload_libraries, if this role may read it


class TimescalePlan(enum.Enum):
    HYPERTABLE = "timescaledb hypertable"
    PLAIN = "plain PostgreSQL"  # no TimescaleDB on the server
    PLAIN_NOT_PRELOADED = "plain PostgreSQL, timescaledb not preloaded"  # warn, run
    STOP_NOT_PRELOADED = "timescaledb created but not preloaded"  # cannot run


def preloads_timescaledb(preload: str) -> bool:
    """True if a `shared_preload_libraries` value lists the timescaledb loader.

    Entries are comma-separated, may be quoted and may be paths
    (`'$libdir/timescaledb'`) or carry the library suffix.
    """
    for entry in preload.split(","):
        name = entry.strip().strip('"').rsplit("/", 1)[-1]
        name = name.removesuffix(".so").removesuffix(".dll").removesuffix(".dylib")
        if name == "timescaledb":
            return True
    return False


def timescaledb_plan(probe: TimescaleProbe) -> TimescalePlan:
    """Hypertable only where TimescaleDB is installed *and* preloaded.

    Installed but not preloaded: plain PostgreSQL (the table works the same, only
    without chunks); the caller warns with the setting to add. An extension that
    already exists in the database but is not preloaded cannot be run around: every
    use of it (its DDL event triggers included) ends the connection, so stop.
    """
    preloaded = probe.loader_running or (
        probe.preload is not None and preloads_timescaledb(probe.preload)
    )
    if preloaded and (probe.available or probe.created):
        return TimescalePlan.HYPERTABLE
    if probe.created:
        return TimescalePlan.STOP_NOT_PRELOADED
    if probe.available:
        return TimescalePlan.PLAIN_NOT_PRELOADED
    return TimescalePlan.PLAIN


def probe_timescaledb(conn: Conn) -> TimescaleProbe:
    row = conn.execute(_TIMESCALEDB_PROBE).fetchone()
    assert row is not None  # a SELECT without FROM always returns its row
    available, created, loader_running, preload = row
    return TimescaleProbe(
        available=bool(available),
        created=bool(created),
        loader_running=bool(loader_running),
        preload=None if preload is None else str(preload),
    )


def decide_timescaledb(conn: Conn) -> TimescalePlan:
    """Probe and decide; warn or raise for the two not-preloaded cases."""
    plan = timescaledb_plan(probe_timescaledb(conn))
    if plan is TimescalePlan.PLAIN_NOT_PRELOADED:
        log.warning(
            "timescaledb_not_preloaded",
            storage=TimescalePlan.PLAIN.value,
            detail=(
                "the timescaledb extension is installed but the server does not preload it, "
                f"so telemetry stays a plain table; add {PRELOAD_SETTING} to postgresql.conf "
                "and restart PostgreSQL to get a hypertable at the next start (README: TimescaleDB)"
            ),
        )
    elif plan is TimescalePlan.STOP_NOT_PRELOADED:
        raise DatabaseError(
            "the timescaledb extension exists in this database but the server does not "
            f"preload it, so any use of it ends the connection: add {PRELOAD_SETTING} "
            "to postgresql.conf and restart PostgreSQL"
        )
    return plan


def _make_hypertable(conn: Conn) -> None:
    conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    conn.execute(
        sql.SQL(
            "SELECT create_hypertable('telemetry', 'time', chunk_time_interval => INTERVAL '1 day',"
            " if_not_exists => TRUE, migrate_data => TRUE)"
        )
    )
