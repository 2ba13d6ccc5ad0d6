"""The harness is real: mTLS-mapped NATS with JetStream, password PostgreSQL, restarts.

Rules for this file: every test has an absolute hang guard (`trio.fail_after`);
NATS code is asyncio run through trio_asyncio (`aio_loop`), with a short connect
timeout and no reconnects where a refusal is expected; blocking calls (psycopg,
pg_ctl, nats-server restarts) go through `trio.to_thread` so the guard can
abandon them.
"""

from __future__ import annotations

import ssl
import uuid
from pathlib import Path
from typing import Any

import nats
import nats.errors
import psycopg
import pytest
import trio
import trio_asyncio
from nats.js.api import ConsumerConfig, DeliverPolicy

from devstack import certs, natsd, postgres
from notip_trio.config import load_settings

HANG_GUARD_S = 30


async def _in_thread(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


# --- NATS --------------------------------------------------------------------


async def _publish_and_pull(server: natsd.NatsServer, subject: str, body: bytes) -> int:
    """Publish with a PubAck, pull it back on a fresh durable, ack; return its seq."""
    nc = await server.connect("test-client", allow_reconnect=False)
    try:
        js = nc.jetstream()
        ack = await js.publish(subject, body)
        assert ack.stream == "TELEMETRY"
        durable = f"harness-{uuid.uuid4().hex[:8]}"
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=ack.seq
        )
        sub = await js.pull_subscribe(subject, durable=durable, stream="TELEMETRY", config=config)
        msgs = await sub.fetch(1, timeout=5)
        assert [m.data for m in msgs] == [body]
        assert msgs[0].subject == subject
        await msgs[0].ack_sync(timeout=5)
        info = await js.consumer_info("TELEMETRY", durable)
        assert info.num_ack_pending == 0
        assert info.num_pending == 0
        return ack.seq
    finally:
        await nc.close()


async def test_jetstream_roundtrip_over_mtls(
    clean_nats_server: natsd.NatsServer, aio_loop: object
) -> None:
    body = f'{{"probe": "{uuid.uuid4()}"}}'.encode()
    with trio.fail_after(HANG_GUARD_S):
        seq = await trio_asyncio.aio_as_trio(_publish_and_pull)(
            clean_nats_server, "telemetry.data.t1.g1", body
        )
    assert seq == 1  # the stream was recreated empty for this test


async def _connect_with(server: natsd.NatsServer, ctx: ssl.SSLContext) -> None:
    """Connect once (no reconnects, 3 s timeout); close again if it succeeds."""

    async def quiet(_exc: Exception) -> None:
        pass

    nc = await nats.connect(
        server.url,
        tls=ctx,
        connect_timeout=3,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        error_cb=quiet,
    )
    await nc.close()


def _foreign_ca_ctx(server: natsd.NatsServer, tmp_path: Path) -> ssl.SSLContext:
    # A mapped identity, but signed by an unrelated CA: refused for the CA alone.
    return natsd.client_ssl_context(certs.issue_foreign_client(tmp_path, "test-client"), server.ca)


def _no_client_cert_ctx(server: natsd.NatsServer, tmp_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.ca))


@pytest.mark.parametrize("make_ctx", [_foreign_ca_ctx, _no_client_cert_ctx])
async def test_tls_refuses_untrusted_client(
    nats_server: natsd.NatsServer, aio_loop: object, tmp_path: Path, make_ctx: Any
) -> None:
    ctx = make_ctx(nats_server, tmp_path)
    with trio.fail_after(HANG_GUARD_S), pytest.raises((ssl.SSLError, ConnectionError)):
        await trio_asyncio.aio_as_trio(_connect_with)(nats_server, ctx)


async def test_unmapped_identity_is_refused(
    nats_server: natsd.NatsServer, aio_loop: object
) -> None:
    stranger = nats_server.pki.issue_client("stranger")  # our CA, identity not a user
    assert stranger.identity not in {c.identity for c in nats_server.pki.clients.values()}
    ctx = natsd.client_ssl_context(stranger)
    with (
        trio.fail_after(HANG_GUARD_S),
        pytest.raises(nats.errors.Error, match="Authorization Violation"),
    ):
        await trio_asyncio.aio_as_trio(_connect_with)(nats_server, ctx)
    # The same path with a mapped identity connects: the refusal is the mapping.
    with trio.fail_after(HANG_GUARD_S):
        await trio_asyncio.aio_as_trio(_connect_with)(nats_server, nats_server.ssl_context())


async def test_nats_restart_keeps_port_and_messages(
    private_nats_server: natsd.NatsServer, aio_loop: object
) -> None:
    server = private_nats_server
    url = server.url
    with trio.fail_after(HANG_GUARD_S):
        await trio_asyncio.aio_as_trio(_publish_and_pull)(server, "telemetry.data.t1.g2", b"1")
        await _in_thread(server.restart)
        assert server.url == url
        seq = await trio_asyncio.aio_as_trio(_publish_and_pull)(
            server, "telemetry.data.t1.g2", b"2"
        )
    assert seq == 2  # the file store survived the restart


# --- PostgreSQL --------------------------------------------------------------


def _write_and_read(conninfo: str, value: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS probe (v TEXT NOT NULL)")
        conn.execute("INSERT INTO probe (v) VALUES (%s)", (value,))
        conn.commit()
    with psycopg.connect(conninfo) as conn:
        return conn.execute("SELECT v FROM probe").fetchall()


def _read(conninfo: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo) as conn:
        return conn.execute("SELECT v FROM probe").fetchall()


async def test_postgres_row_over_tcp_with_password(
    pg_server: postgres.PgServer, pg_database: postgres.PgDatabase
) -> None:
    assert pg_server.password_file.read_text().strip() == pg_server.password
    with trio.fail_after(HANG_GUARD_S):
        rows = await _in_thread(_write_and_read, pg_database.conninfo, "ünïcode ok")
        assert rows == [("ünïcode ok",)]
        wrong = pg_server.conninfo(pg_database.name, password="not-the-password")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await _in_thread(_read, wrong)


async def test_pg_database_is_fresh(pg_database: postgres.PgDatabase) -> None:
    with trio.fail_after(HANG_GUARD_S), pytest.raises(psycopg.errors.UndefinedTable):
        await _in_thread(_read, pg_database.conninfo)


async def test_postgres_stop_and_start(private_pg_server: postgres.PgServer) -> None:
    pg = private_pg_server
    conninfo = pg.conninfo(connect_timeout=3)
    with trio.fail_after(HANG_GUARD_S * 2):
        await _in_thread(_write_and_read, conninfo, "before")
        await _in_thread(pg.stop)
        with pytest.raises(psycopg.OperationalError):
            await _in_thread(_read, conninfo)
        await _in_thread(pg.start)
        assert await _in_thread(_read, conninfo) == [("before",)]


# --- the daemon's configuration ----------------------------------------------


def test_settings_env_is_a_valid_configuration(
    settings_env: dict[str, str],
    pg_server: postgres.PgServer,
    pg_database: postgres.PgDatabase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in settings_env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.nats_url.startswith("tls://127.0.0.1:")
    assert settings.nats_tls_cert.name == "notip-trio.pem"
    assert settings.db_name == pg_database.name
    assert settings.db_password == pg_server.password
    assert settings.db_ssl_mode == "disable"
    with psycopg.connect(settings.db_conninfo(), connect_timeout=5) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (pg_database.name,)
