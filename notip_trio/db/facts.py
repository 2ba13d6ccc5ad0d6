"""What the preflight (`notip-trio check`) reads about the database.

One read-only session in a worker thread (`db_facts`): the current user and
schema, the daemon's tables and indexes, and the TimescaleDB probe the daemon's
migration decides by (schema.py). Judging the facts is the preflight's part (check/database.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import psycopg

from .lifecycle import LifecycleFacts, read_facts
from .schema import (
    INDEXES,
    TABLES,
    TimescalePlan,
    TimescaleProbe,
    probe_timescaledb,
    timescaledb_plan,
)

DB_CONNECT_TIMEOUT_S: Final = 10  # libpq connect_timeout (whole seconds)
DB_QUERY_TIMEOUT_S: Final = 10.0  # every query of the schema inspection together


#: A server without TimescaleDB, as the probe reports it.
NO_TIMESCALEDB: Final = TimescaleProbe(
    available=False, created=False, loader_running=False, preload=None
)


@dataclass(frozen=True, slots=True)
class TableFacts:
    owner: str
    owned: bool  # the current user has the owner's rights (the migration needs them)
    writable: bool  # SELECT and INSERT
    columns: frozenset[str]


@dataclass(frozen=True, slots=True)
class DbFacts:
    """What the checks need to know about the database, read in one session."""

    user: str
    server_version: str
    ssl: bool
    schema: str | None  # current_schema(): where the daemon's tables go
    can_create: bool  # CREATE on that schema
    tables: dict[str, TableFacts | None] = field(default_factory=dict)
    indexes: dict[str, bool] = field(default_factory=dict)
    # What the daemon's migration looks at before deciding (db.schema.probe_timescaledb).
    timescale: TimescaleProbe = NO_TIMESCALEDB
    timescaledb_available: str | None = None  # default_version, None if not available
    timescaledb_installed: str | None = None
    hypertable: bool = False
    # Compression and retention of a hypertable telemetry (db.lifecycle.read_facts).
    lifecycle: LifecycleFacts | None = None


def pg_hint(reason: str) -> str:
    """What to do about a failed database connection, from its reason."""
    r = reason.lower()
    if "password authentication failed" in r:
        return "check DB_USER and the password in DB_PASSWORD_FILE"
    if "database" in r and "does not exist" in r:
        return "check DB_NAME"
    if "role" in r and "does not exist" in r:
        return "check DB_USER"
    if "does not support ssl" in r:
        return "the server has no TLS: enable ssl there, or DB_SSL_MODE=disable"
    if "certificate" in r or "root cert" in r:
        return (
            "DB_SSL_ROOT_CERT must be the CA of the server's certificate (verify-full: and "
            "DB_HOST must be named in it)"
        )
    if "pg_hba.conf" in r:
        return "the server's pg_hba.conf admits no such host, user, database and TLS mode"
    return "check DB_HOST and DB_PORT and that PostgreSQL is reachable from here"


def db_facts(conninfo: str) -> DbFacts:
    """Blocking (worker thread): connect read-only and gather `DbFacts`."""
    with psycopg.connect(conninfo, connect_timeout=DB_CONNECT_TIMEOUT_S, autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = on")
        conn.execute(f"SET statement_timeout = '{int(DB_QUERY_TIMEOUT_S * 1000)}ms'")

        def one(query: str, *params: object) -> tuple[Any, ...] | None:
            return conn.execute(query, params).fetchone()

        row = one(
            "SELECT current_user, current_setting('server_version'), current_schema(),"
            " coalesce(has_schema_privilege(current_schema(), 'CREATE'), false)"
        )
        assert row is not None
        user, version, schema, can_create = str(row[0]), str(row[1]), row[2], bool(row[3])
        tables: dict[str, TableFacts | None] = {}
        for table in TABLES:
            info = one(
                "SELECT pg_get_userbyid(c.relowner), pg_has_role(c.relowner, 'USAGE'),"
                # A list of privileges would mean "any of them": ask for each.
                " has_table_privilege(c.oid, 'SELECT') AND has_table_privilege(c.oid, 'INSERT'),"
                " array(SELECT attname::text FROM pg_attribute"
                "       WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped)"
                " FROM pg_class c WHERE c.oid = to_regclass(%s)",
                table,
            )
            if info is None:
                tables[table] = None
                continue
            owner, owned, writable, columns = info
            tables[table] = TableFacts(str(owner), bool(owned), bool(writable), frozenset(columns))
        indexes = {
            name: bool((found := one("SELECT to_regclass(%s) IS NOT NULL", name)) and found[0])
            for name in INDEXES
        }
        ext = one(
            "SELECT default_version, installed_version FROM pg_available_extensions"
            " WHERE name = 'timescaledb'"
        )
        timescale = probe_timescaledb(conn)
        hypertable = False
        lifecycle = None
        # Only where the daemon would use it: touching an extension that is not
        # preloaded ends the connection.
        if (
            timescale.created
            and timescaledb_plan(timescale) is TimescalePlan.HYPERTABLE
            and tables.get("telemetry") is not None
        ):
            found = one(
                "SELECT 1 FROM timescaledb_information.hypertables"
                " WHERE hypertable_name = 'telemetry'"
            )
            hypertable = found is not None
        lifecycle = read_facts(conn) if hypertable else None
        return DbFacts(
            user=user,
            server_version=version.split()[0],
            ssl=bool(conn.pgconn.ssl_in_use),
            schema=None if schema is None else str(schema),
            can_create=can_create,
            tables=tables,
            indexes=indexes,
            timescaledb_available=None if ext is None else str(ext[0]),
            timescaledb_installed=None if ext is None or ext[1] is None else str(ext[1]),
            timescale=timescale,
            hypertable=hypertable,
            lifecycle=lifecycle,
        )
