"""Shared fixtures: real, throwaway NATS and PostgreSQL servers (devstack).

Session-scoped servers are shared: tests must not stop them. A test that stops,
kills or restarts a server asks for the `private_*` variant, which is its own.
Tests that use a server fixture are marked `integration` automatically. When a
server binary is missing the fixture skips with the reason (`pytest -ra` shows
it); with NOTIP_TEST_PG_DSN set, PostgreSQL is that external server and
`private_pg_server` skips.

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
aio_loop          function  a trio_asyncio loop open around the (trio) test
"""

from __future__ import annotations

# trio_asyncio must be imported before psycopg (NOTES.md).
import trio_asyncio  # isort: split

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from devstack import certs, js, natsd, postgres
from devstack.env import daemon_env

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


# --- PKI and NATS ------------------------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> certs.Pki:
    return certs.make_pki(tmp_path_factory.mktemp("pki"))


def _start_nats(pki: certs.Pki) -> natsd.NatsServer:
    if natsd.find_nats_server() is None:
        pytest.skip("nats-server binary not found (apt-get install nats-server)")
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


def _pg_skip_reason() -> str | None:
    if os.environ.get(postgres.DSN_ENV, "").strip():
        return None
    if postgres.find_pg_bindir() is None:
        return (
            "PostgreSQL server binaries (initdb, pg_ctl) not found "
            f"(apt-get install postgresql, or set {postgres.DSN_ENV})"
        )
    return None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[postgres.PgServer]:
    reason = _pg_skip_reason()
    if reason:
        pytest.skip(reason)
    server = postgres.from_env_or_start()
    yield server
    server.close()


@pytest.fixture
def private_pg_server() -> Iterator[postgres.PgServer]:
    if os.environ.get(postgres.DSN_ENV, "").strip():
        pytest.skip(f"{postgres.DSN_ENV} is set: an external PostgreSQL cannot be stopped/started")
    reason = _pg_skip_reason()
    if reason:
        pytest.skip(reason)
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
    """pg_server if it has timescaledb, else a TimescaleDB container, else skip."""
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
    """SPEC.md's variables for the session servers and this test's database.

    For private servers call `devstack.env.daemon_env(nats, pg, dbname)`.
    """
    return daemon_env(nats_server, pg_server, pg_database.name)


@pytest.fixture
async def aio_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    async with trio_asyncio.open_loop() as loop:
        yield loop
