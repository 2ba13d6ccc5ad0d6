"""The benchmark's servers: one PostgreSQL for the run, one nats-server per measurement.

- PostgreSQL comes from `postgres.start_postgres` (fsync on) with
  `track_commit_timestamp = on`, so the latency measurement can read each
  row's commit time from `pg_xact_commit_timestamp(xmin)` without a column.
  Every measurement gets an empty database of its own.
- nats-server comes from `natsd.start_nats_server` (JetStream, mutual TLS,
  verify_and_map) fresh for each measurement, streams created once and never
  deleted (a deleted-and-recreated stream sometimes trickled on 2.9.10), the
  message file published before the measurement starts.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import publish_file
from devstack import certs, js, natsd, postgres
from devstack.env import daemon_env


@dataclass(eq=False)
class Stack:
    workdir: Path
    pki: certs.Pki
    pg: postgres.PgServer

    @classmethod
    def start(cls, workdir: Path) -> Stack:
        workdir.mkdir(parents=True, exist_ok=True)
        pki = certs.make_pki(workdir / "pki")
        pg = postgres.start_postgres()
        import psycopg

        with psycopg.connect(pg.admin_conninfo, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")
        pg.restart()
        return cls(workdir, pki, pg)

    def close(self) -> None:
        self.pg.close()

    @contextlib.contextmanager
    def nats(self, messages: Path | None) -> Iterator[natsd.NatsServer]:
        """A fresh nats-server with the platform streams, `messages` already published."""
        server = natsd.start_nats_server(self.pki)
        try:
            js.create_streams(server)
            if messages is not None:
                publish_file(server, messages)
            yield server
        finally:
            server.close()

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """An empty database of its own; dropped afterwards."""
        db = self.pg.create_database()
        try:
            yield db.name
        finally:
            self.pg.drop_database(db.name)

    def env(self, server: natsd.NatsServer, dbname: str, **overrides: str) -> dict[str, str]:
        env = daemon_env(server, self.pg, dbname)
        env.update(overrides)
        return env

    def admin_conninfo(self, dbname: str) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(self.pg.admin_conninfo, dbname=dbname)

    def pg_version(self) -> str:
        import psycopg

        with psycopg.connect(self.pg.admin_conninfo) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"


def nats_server_version() -> str:
    binary = natsd.find_nats_server()
    if binary is None:
        return "?"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().removeprefix("nats-server: ")
