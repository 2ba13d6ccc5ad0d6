"""A throwaway PostgreSQL, or an external one named by NOTIP_TEST_PG_DSN.

`start_postgres()` runs initdb into a temporary directory and `pg_ctl start` on
a free 127.0.0.1 port (unix socket in the same directory), then creates the
application role `notip` with a random password (scram-sha-256 over TCP) and
its database `notip`. As root, initdb and pg_ctl run as the `postgres` user in
directories it owns. Settings are production-like: fsync stays on. When
timescaledb is installed it is preloaded, and `timescaledb_available` says so.

With NOTIP_TEST_PG_DSN set, `from_env_or_start()` uses that server instead:
its role and database are the DSN's; `can_restart` is False and `stop()` /
`start()` raise `RestartUnsupported`.

In both cases the password is also written to `password_file` (what the
daemon's DB_PASSWORD_FILE reads) and `create_database()` gives each test an
empty database of its own.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack._common import DevstackError, free_port, log_tail

DSN_ENV = "NOTIP_TEST_PG_DSN"
APP_USER = "notip"
APP_DB = "notip"
SUPERUSER = "postgres"
PG_TIMEOUT_S = 60


class RestartUnsupported(DevstackError):
    """stop()/start() on a server this process does not own (external DSN, container)."""


def find_pg_bindir() -> Path | None:
    """Directory holding initdb/pg_ctl: `pg_config --bindir`, else the newest
    /usr/lib/postgresql/*/bin, else None."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            candidates.append(Path(out))
        except (OSError, subprocess.SubprocessError):
            pass
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name or 0)
    )
    candidates.extend(Path(p) for p in reversed(versions))
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


@dataclass(frozen=True, slots=True)
class PgDatabase:
    """One database on a PgServer, with the application role's credentials."""

    name: str
    conninfo: str


@dataclass(eq=False)
class PgServer:
    """A PostgreSQL reachable on host:port with password auth for `user`.

    `admin_conninfo` is a superuser (or the DSN's role) connection to the
    maintenance database. Methods block; from Trio use `trio.to_thread`.
    """

    host: str
    port: int
    user: str
    password: str
    password_file: Path
    dbname: str
    admin_conninfo: str
    timescaledb_available: bool = False
    _cluster: _LocalCluster | None = field(default=None, repr=False)
    _tmpdir: Path | None = field(default=None, repr=False)
    #: Extra clean-ups run by close(), e.g. stopping a container.
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def can_restart(self) -> bool:
        """True if this process owns the server and can stop and start it."""
        return self._cluster is not None

    @property
    def running(self) -> bool:
        return self._cluster.running() if self._cluster is not None else True

    def conninfo(self, dbname: str | None = None, **extra: Any) -> str:
        """libpq conninfo as the application role over TCP with the password.

        `extra` adds or overrides libpq parameters (e.g. connect_timeout=3).
        """
        from psycopg.conninfo import make_conninfo

        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": dbname or self.dbname,
            "sslmode": "disable",
            "connect_timeout": 10,
        }
        return make_conninfo(**(params | extra))

    def stop(self, *, mode: str = "fast") -> None:
        """pg_ctl stop (`mode`: smart, fast or immediate); data and port are kept."""
        self._owned().stop(mode)

    def start(self) -> None:
        """pg_ctl start on the same port and data; returns once it accepts connections."""
        self._owned().start()

    def restart(self, *, mode: str = "fast") -> None:
        self.stop(mode=mode)
        self.start()

    def close(self) -> None:
        """Stop an owned server (immediate) and delete its files. Idempotent."""
        if self._cluster is not None:
            # DevstackError: already gone (stale pid file), nothing left to stop.
            with contextlib.suppress(DevstackError):
                self._cluster.stop("immediate", missing_ok=True)
        while self._closers:
            self._closers.pop()()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def create_database(self, name: str | None = None, *, timescaledb: bool = False) -> PgDatabase:
        """Create an empty database owned by the application role.

        `name` defaults to `test_<random hex>`. With `timescaledb=True` the
        extension is created in it (by the admin role), or DevstackError if not
        available.
        """
        import psycopg
        from psycopg import sql

        name = name or f"test_{secrets.token_hex(6)}"
        if timescaledb and not self.timescaledb_available:
            raise DevstackError("timescaledb extension is not available on this server")
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(self.user)
                )
            )
        if timescaledb:
            admin_db = _with_dbname(self.admin_conninfo, name)
            with psycopg.connect(admin_db, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        return PgDatabase(name=name, conninfo=self.conninfo(name))

    def drop_database(self, name: str) -> None:
        """Drop `name`, terminating its open connections first (FORCE)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def _owned(self) -> _LocalCluster:
        if self._cluster is None:
            raise RestartUnsupported(
                f"this PostgreSQL ({self.host}:{self.port}) is not started by the tests "
                f"({DSN_ENV} or a container): it cannot be stopped and started"
            )
        return self._cluster


@dataclass
class _LocalCluster:
    """initdb/pg_ctl on one data directory; commands run as `postgres` when root."""

    bindir: Path
    base: Path  # owned by the server's OS user; holds data/, the socket and the log
    port: int

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "postgres.log"

    def run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", SUPERUSER, "--", *cmd]
        try:
            subprocess.run(
                cmd,
                check=True,
                capture_output=True,
                text=True,
                timeout=PG_TIMEOUT_S,
                cwd=self.base,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.CalledProcessError as exc:
            raise DevstackError(
                f"{tool} failed ({exc.returncode}): {exc.stderr.strip() or exc.stdout.strip()}"
                f"\n--- {self.log} ---\n{log_tail(self.log)}"
            ) from None
        except subprocess.TimeoutExpired:
            raise DevstackError(f"{tool} did not finish within {PG_TIMEOUT_S} s") from None

    def initdb(self) -> None:
        self.run(
            "initdb",
            "-D", str(self.data),
            "-U", SUPERUSER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        )  # fmt: skip
        preload = ""
        if self._timescaledb_installed():
            preload = "shared_preload_libraries = 'timescaledb'\n"
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                "\n# devstack\n"
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.base}'\n"
                "max_connections = 200\n"
                f"{preload}"
            )

    def start(self) -> None:
        self.run(
            "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log),
            "-w", "-t", str(PG_TIMEOUT_S),
        )  # fmt: skip

    def stop(self, mode: str, *, missing_ok: bool = False) -> None:
        if missing_ok and not self.running():
            return
        self.run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", str(PG_TIMEOUT_S))

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def _timescaledb_installed(self) -> bool:
        try:
            out = subprocess.run(
                [str(self.bindir / "pg_config"), "--pkglibdir"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return False
        return (Path(out) / "timescaledb.so").exists()


def start_postgres(bindir: Path | None = None) -> PgServer:
    """initdb + pg_ctl start a new cluster and create the application role and database.

    `close()` (registered with atexit) stops it and removes its directory.
    Raises DevstackError if the binaries are missing or a step fails.
    """
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    bindir = bindir or find_pg_bindir()
    if bindir is None:
        raise DevstackError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    tmp = Path(tempfile.mkdtemp(prefix="notip-pg-"))
    base = tmp / "pg"
    base.mkdir(mode=0o700)
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            shutil.chown(base, SUPERUSER, SUPERUSER)
        except LookupError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DevstackError(
                f"running as root but there is no {SUPERUSER!r} OS user to run PostgreSQL as"
            ) from None
        tmp.chmod(0o755)  # let the postgres user reach base/
    cluster = _LocalCluster(bindir=bindir, base=base, port=free_port())
    password = secrets.token_urlsafe(18)
    password_file = tmp / "db-password"
    password_file.write_text(password + "\n", encoding="utf-8")
    admin = make_conninfo(
        host=str(base), port=cluster.port, user=SUPERUSER, dbname="postgres", connect_timeout=10
    )
    server = PgServer(
        host="127.0.0.1",
        port=cluster.port,
        user=APP_USER,
        password=password,
        password_file=password_file,
        dbname=APP_DB,
        admin_conninfo=admin,
        _cluster=cluster,
        _tmpdir=tmp,
    )
    atexit.register(server.close)
    try:
        cluster.initdb()
        cluster.start()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(APP_USER), sql.Literal(password)
                )
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(APP_DB), sql.Identifier(APP_USER)
                )
            )
            server.timescaledb_available = _has_timescaledb(conn)
    except BaseException:
        server.close()
        raise
    return server


def connect_external(dsn: str) -> PgServer:
    """A PgServer for an existing server: the DSN's role, password and database.

    The DSN must name a host reachable over TCP and a role that may CREATE
    DATABASE (for `create_database`). The password goes to a temporary file.
    """
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    tmp = Path(tempfile.mkdtemp(prefix="notip-pg-ext-"))
    password = str(params.get("password") or os.environ.get("PGPASSWORD", ""))
    password_file = tmp / "db-password"
    password_file.write_text(password + "\n", encoding="utf-8")
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        info = conn.info
        server = PgServer(
            host=info.host,
            port=info.port,
            user=info.user,
            password=password,
            password_file=password_file,
            dbname=info.dbname,
            admin_conninfo=dsn,
            timescaledb_available=_has_timescaledb(conn),
            _tmpdir=tmp,
        )
    atexit.register(server.close)
    return server


def from_env_or_start() -> PgServer:
    """`connect_external($NOTIP_TEST_PG_DSN)` if set, else `start_postgres()`."""
    dsn = os.environ.get(DSN_ENV, "").strip()
    return connect_external(dsn) if dsn else start_postgres()


def _with_dbname(conninfo: str, dbname: str) -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo(conninfo, dbname=dbname)


def _has_timescaledb(conn: Any) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
    ).fetchone()
    return row is not None
