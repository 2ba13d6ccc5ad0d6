"""Optional: TimescaleDB in a container, through testcontainers.

Used only when a container engine answers (`container_engine_reason()` returns
None); otherwise callers skip with that reason. Nothing on the default test
path depends on it.
"""

from __future__ import annotations

import atexit
import secrets
import tempfile
from pathlib import Path

from devstack._common import DevstackError
from devstack.postgres import PgServer

TIMESCALEDB_IMAGE = "timescale/timescaledb:latest-pg15"


def container_engine_reason() -> str | None:
    """None if a Docker-compatible engine answers a ping, else why not (for skip)."""
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        return "no container engine (docker client library not installed)"
    try:
        client = docker.from_env(timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any failure means: not usable here
        return f"no container engine ({type(exc).__name__})"
    return None


def start_timescaledb_container(image: str = TIMESCALEDB_IMAGE) -> PgServer:
    """Run `image` and return a PgServer for it (superuser = application role).

    `close()` removes the container; stop()/start() raise RestartUnsupported.
    Raises DevstackError if no engine answers.
    """
    reason = container_engine_reason()
    if reason is not None:
        raise DevstackError(reason)
    import psycopg
    from psycopg.conninfo import make_conninfo
    from testcontainers.community.postgres import PostgresContainer

    password = secrets.token_urlsafe(18)
    container = PostgresContainer(image, username="notip", password=password, dbname="notip")
    container.start()
    tmp = Path(tempfile.mkdtemp(prefix="notip-pg-ctr-"))
    password_file = tmp / "db-password"
    password_file.write_text(password + "\n", encoding="utf-8")
    host = container.get_container_host_ip()
    port = int(container.get_exposed_port(5432))
    admin = make_conninfo(
        host=host, port=port, user="notip", password=password, dbname="postgres", connect_timeout=10
    )
    server = PgServer(
        host=host,
        port=port,
        user="notip",
        password=password,
        password_file=password_file,
        dbname="notip",
        admin_conninfo=admin,
        _tmpdir=tmp,
        _closers=[container.stop],
    )
    atexit.register(server.close)
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
            server.timescaledb_available = row.fetchone() is not None
    except BaseException:
        server.close()
        raise
    return server
