"""pytest plugin: real, throwaway NATS and PostgreSQL servers (devstack), and
what a test reads back from them.

Session-scoped servers are shared: tests must not stop them. A test that stops,
kills or restarts a server asks for the `private_*` variant, which is its own.
Tests that use a server fixture are marked `integration` automatically.

A missing server binary skips the test with the reason (`pytest -ra` shows it),
except under CI=true, where `.ci/run` installs the binaries: there it fails
(`require`). With NOTIP_TEST_PG_DSN set, PostgreSQL is that external server and
`private_pg_server` skips (an external server cannot be stopped).

Fixture           scope     yields
pki               session   certs.Pki: CA, server cert, the four mapped clients
nats_server       session   natsd.NatsServer, TELEMETRY/ALERTS/DECOMMISSION created
clean_nats_server function  the session NatsServer with the three streams recreated empty
private_nats_server function its own NatsServer (streams created); may stop/restart
pg_server         session   postgres.PgServer (local initdb, or NOTIP_TEST_PG_DSN)
private_pg_server function  its own local PgServer; may stop/start
pg_database       function  postgres.PgDatabase: a fresh empty database on pg_server
timescaledb_database function PgDatabase with the timescaledb extension, or skip
settings_env      function  dict[str, str]: the daemon's environment for
                            nats_server + pg_database (identity "notip-trio")

Helpers: `DURABLE` (the daemon's default telemetry durable), `scalar`,
`telemetry_rows`, `drained`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, NoReturn

import psycopg
import pytest

from devstack import certs, js, natsd, postgres
from devstack.env import daemon_env

DURABLE = "data-consumer-telemetry"  # NATS_CONSUMER_DURABLE_NAME's default

_SERVER_FIXTURES = frozenset(
    {
        "nats_server",
        "clean_nats_server",
        "private_nats_server",
        "pg_server",
        "private_pg_server",
        "pg_database",
        "timescaledb_database",
        "settings_env",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require(missing: str) -> NoReturn:
    """Skip for a missing server or tool, saying what is missing; under CI=true
    (whose `.ci/run` installs every one of them) fail instead."""
    if in_ci():
        pytest.fail(f"{missing}; CI=true: .ci/run installs it, so it must be there")
    pytest.skip(missing)


# --- what a test reads back ------------------------------------------------------


def scalar(conninfo: str, sql: str) -> int:
    """The one integer `sql` returns, over a fresh direct connection."""
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def telemetry_rows(conninfo: str) -> int:
    return scalar(conninfo, "SELECT count(*) FROM telemetry")


def drained(server: natsd.NatsServer, durable: str = DURABLE) -> bool:
    """The TELEMETRY durable has nothing left to deliver and nothing awaiting an ack."""
    return js.consumer_state(server, "TELEMETRY", durable).drained


def create_durable(
    server: natsd.NatsServer, *, ack_wait_s: float, max_ack_pending: int, durable: str = DURABLE
) -> None:
    """Create the TELEMETRY durable before the daemon does, with the given ack wait
    and MaxAckPending (a short ack wait brings a killed replica's deliveries back
    within seconds; a small MaxAckPending is what an older migration guide made)."""

    async def create(nc: Any) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig

        await nc.jetstream().add_consumer(
            "TELEMETRY",
            config=ConsumerConfig(
                durable_name=durable,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ack_wait_s,
                max_ack_pending=max_ack_pending,
                max_waiting=512,
            ),
        )

    js.run_nats(server, create)


# --- PKI and NATS ------------------------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> certs.Pki:
    return certs.make_pki(tmp_path_factory.mktemp("pki"))


def _start_nats(pki: certs.Pki) -> natsd.NatsServer:
    if natsd.find_nats_server() is None:
        require("nats-server binary not found (apt-get install nats-server)")
    server = natsd.start_nats_server(pki)
    try:
        js.create_streams(server)
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture(scope="session")
def nats_server(pki: certs.Pki) -> Iterator[natsd.NatsServer]:
    server = _start_nats(pki)
    yield server
    server.close()


@pytest.fixture
def clean_nats_server(nats_server: natsd.NatsServer) -> natsd.NatsServer:
    if not nats_server.running:
        pytest.fail("the session nats_server was stopped by a test; use private_nats_server")
    js.create_streams(nats_server, reset=True)
    return nats_server


@pytest.fixture
def private_nats_server(pki: certs.Pki) -> Iterator[natsd.NatsServer]:
    server = _start_nats(pki)
    yield server
    server.close()


# --- PostgreSQL --------------------------------------------------------------


def _external_pg() -> bool:
    return bool(os.environ.get(postgres.DSN_ENV, "").strip())


def _require_local_pg() -> None:
    if postgres.find_pg_bindir() is None:
        require(
            "PostgreSQL server binaries (initdb, pg_ctl) not found "
            f"(apt-get install postgresql, or set {postgres.DSN_ENV})"
        )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[postgres.PgServer]:
    if not _external_pg():
        _require_local_pg()
    server = postgres.from_env_or_start()
    yield server
    server.close()


@pytest.fixture
def private_pg_server() -> Iterator[postgres.PgServer]:
    if _external_pg():
        pytest.skip(f"{postgres.DSN_ENV} is set: an external PostgreSQL cannot be stopped/started")
    _require_local_pg()
    server = postgres.start_postgres()
    yield server
    server.close()


@pytest.fixture
def pg_database(pg_server: postgres.PgServer) -> Iterator[postgres.PgDatabase]:
    if not pg_server.running:
        pytest.fail("the session pg_server was stopped by a test; use private_pg_server")
    db = pg_server.create_database()
    yield db
    pg_server.drop_database(db.name)


@pytest.fixture(scope="session")
def timescaledb_server(pg_server: postgres.PgServer) -> Iterator[postgres.PgServer]:
    """pg_server if it has timescaledb, else a TimescaleDB container, else skip.

    TimescaleDB is optional (the daemon runs on plain PostgreSQL too), so this
    skips under CI as well."""
    if pg_server.timescaledb_available:
        yield pg_server
        return
    from devstack import containers

    reason = containers.container_engine_reason()
    if reason is not None:
        pytest.skip(f"timescaledb: not installed in the local PostgreSQL and {reason}")
    server = containers.start_timescaledb_container()
    yield server
    server.close()


@pytest.fixture
def timescaledb_database(
    timescaledb_server: postgres.PgServer,
) -> Iterator[postgres.PgDatabase]:
    db = timescaledb_server.create_database(timescaledb=True)
    yield db
    timescaledb_server.drop_database(db.name)


# --- the daemon's view -------------------------------------------------------


@pytest.fixture
def settings_env(
    nats_server: natsd.NatsServer,
    pg_server: postgres.PgServer,
    pg_database: postgres.PgDatabase,
) -> dict[str, str]:
    """The daemon's variables for the session servers and this test's database.

    For private servers call `devstack.env.daemon_env(nats, pg, dbname)`.
    """
    return daemon_env(nats_server, pg_server, pg_database.name)
