"""`notip-trio check` (docs/contract.md Behaviour 11) against real servers, and its pure parts.

Rules for this file: the check runs in-process through `main(["check"])` with
exactly the variables of `daemon_env` (nothing inherited), reading what it
prints; the servers are the suite's throwaway nats-server (mTLS,
`verify_and_map`) and PostgreSQL; a test that deletes a stream has its own
nats-server. The check bounds every step itself; each failure test asserts the
exit code and the one FAILED line it expects.
"""

from __future__ import annotations

# trio_asyncio must be imported before psycopg (NOTES.md).
import trio_asyncio  # isort: split

import re
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from nats.js.api import AckPolicy, ConsumerConfig
from psycopg import sql

from devstack import certs, postgres
from devstack import js as _js
from devstack.env import daemon_env
from devstack.js import run_nats
from devstack.mgmt_standin import spawn_standin as spawn_mgmt_standin
from devstack.natsd import NatsServer
from notip_trio.__main__ import main
from notip_trio.check import (
    Result,
    clock_result,
    nats_hint,
    schema_result,
    subject_matches,
    timescaledb_result,
)
from notip_trio.config import Settings
from notip_trio.db.facts import DbFacts, TableFacts, pg_hint
from notip_trio.db.schema import COLUMNS, INDEXES, TABLES, TimescaleProbe
from notip_trio.db.writer import Storage
from notip_trio.errors import DatabaseError
from notip_trio.js.bridge import NatsBridge
from notip_trio.js.specs import decommission_spec, telemetry_spec
from notip_trio.wire import STREAMS

from .fix_daemon import daemon_settings

DURABLES = ("data-consumer-telemetry", "data-consumer-decommission-listener")
LINE = re.compile(r"^(ok    |FAILED|info  |skip  ) [^:]+: \S.*$")


def _check(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys) -> tuple[int, list[str]]:
    """`notip-trio check` with exactly `env`: (exit code, the lines it printed)."""
    daemon_settings(env, monkeypatch)
    capsys.readouterr()
    code = main(["check"])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert err == ""
    bad = [line for line in lines if not LINE.match(line)]
    assert bad == [], "every line is `<status> <check>: <detail>`"
    print(out)
    return code, lines


def _line(lines: list[str], status: str, check: str) -> str:
    """The one line of `check`; fails unless it has `status`."""
    found = [line for line in lines if line[7:].startswith(f"{check}: ")]
    assert len(found) == 1, f"one line for {check!r} in:\n" + "\n".join(lines)
    assert found[0].startswith(f"{status:<6} "), found[0]
    return found[0]


def _statuses(lines: list[str]) -> set[str]:
    return {line.split(" ", 1)[0] for line in lines}


def _table_exists(conninfo: str, name: str) -> bool:
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
        return bool(row and row[0])


def _no_durables(nats: NatsServer) -> bool:
    for stream, durable in zip(("TELEMETRY", "DECOMMISSION"), DURABLES, strict=True):
        try:
            _js.consumer_state(nats, stream, durable)
        except LookupError:
            continue
        return False
    return True


# --- against real servers ------------------------------------------------------


def test_all_ok_on_an_empty_database_and_nothing_is_changed(
    clean_nats_server, pg_server, pg_database, tmp_path, monkeypatch, capsys
):
    nats = clean_nats_server
    env = daemon_env(nats, pg_server, pg_database.name)
    with spawn_mgmt_standin(nats, tmp_path / "mgmt.log"):
        code, lines = _check(env, monkeypatch, capsys)
    assert code == 0
    assert _statuses(lines) <= {"ok", "info"}
    assert "2.9" in _line(lines, "ok", "nats")
    for stream in STREAMS:
        _line(lines, "ok", f"stream {stream}")
    for durable in DURABLES:
        assert "absent" in _line(lines, "info", f"durable {durable}")
    assert "answered with 0 alert config(s)" in _line(lines, "ok", "management API")
    assert "TELEMETRY is empty" in _line(lines, "info", "clock")
    assert "TLS off" in _line(lines, "ok", "postgres")
    schema = _line(lines, "ok", "schema")
    assert all(name in schema for name in TABLES + INDEXES)
    assert "missing" in schema
    _line(lines, "info", "timescaledb")
    # It changed nothing: no migration, no consumer.
    assert not _table_exists(pg_database.conninfo, "telemetry")
    assert not _table_exists(pg_database.conninfo, "telemetry_rejected")
    assert _no_durables(nats)


async def _migrate(settings: Settings) -> None:
    """The daemon's start-up migration."""
    with trio.fail_after(60):
        storage = Storage.create(settings.db_conninfo(), min_size=1, max_size=1)
        await storage.open(timeout_s=10)
        try:
            await storage.migrate()
        finally:
            await storage.close()


async def _start_up_like_the_daemon(settings: Settings) -> None:
    """What `run_daemon` does before it serves: migrate, then streams and durables."""
    await _migrate(settings)
    with trio.fail_after(60):
        async with trio_asyncio.open_loop():
            client = await NatsBridge.connect(
                settings.nats_url,
                ca=str(settings.nats_tls_ca),
                cert=str(settings.nats_tls_cert),
                key=str(settings.nats_tls_key),
                connect_timeout_s=5,
            )
            try:
                await client.require_streams(STREAMS)
                await client.ensure_pull_consumer(telemetry_spec(settings))
                await client.ensure_pull_consumer(decommission_spec())
            finally:
                await client.close()


def test_all_ok_after_the_daemon_set_up_its_table_and_durables(
    clean_nats_server, pg_server, pg_database, tmp_path, monkeypatch, capsys
):
    nats = clean_nats_server
    env = daemon_env(nats, pg_server, pg_database.name)
    trio.run(_start_up_like_the_daemon, daemon_settings(env, monkeypatch))
    # The probes the first test relies on see what the daemon made.
    assert _table_exists(pg_database.conninfo, "telemetry")
    assert not _no_durables(nats)
    with spawn_mgmt_standin(nats, tmp_path / "mgmt.log"):
        code, lines = _check(env, monkeypatch, capsys)
    assert code == 0
    assert _statuses(lines) <= {"ok", "info"}
    schema = _line(lines, "ok", "schema")
    assert "present" in schema
    assert all(name in schema for name in TABLES + INDEXES)
    line = _line(lines, "ok", "durable data-consumer-telemetry")
    assert "pull consumer on TELEMETRY, explicit ack, no filter" in line
    _line(lines, "ok", "durable data-consumer-decommission-listener")


def test_wrong_ca(clean_nats_server, pg_server, pg_database, pki, monkeypatch, capsys):
    foreign = certs.issue_foreign_client(pki.directory, "check-wrong-ca")
    env = daemon_env(clean_nats_server, pg_server, pg_database.name, NATS_TLS_CA=str(foreign.ca))
    code, lines = _check(env, monkeypatch, capsys)
    assert code == 1
    line = _line(lines, "FAILED", "nats")
    assert "certificate verify failed" in line
    assert "(hint: NATS_TLS_CA must be the CA that signed the server's certificate)" in line
    # What needs NATS is skipped; the database is still checked.
    _line(lines, "skip", "stream TELEMETRY")
    _line(lines, "skip", "management API")
    _line(lines, "ok", "postgres")


def test_unmapped_client_certificate(
    clean_nats_server, pg_server, pg_database, pki, monkeypatch, capsys
):
    # Signed by the server's CA, so TLS succeeds, but no user has its identity.
    stranger = pki.issue_client(f"stranger-{uuid.uuid4().hex[:8]}")
    env = daemon_env(
        clean_nats_server,
        pg_server,
        pg_database.name,
        NATS_TLS_CERT=str(stranger.cert),
        NATS_TLS_KEY=str(stranger.key),
    )
    code, lines = _check(env, monkeypatch, capsys)
    assert code == 1
    line = _line(lines, "FAILED", "nats")
    assert "Authorization Violation" in line
    assert "maps it to no user" in line


def test_client_certificate_from_a_foreign_ca(
    clean_nats_server, pg_server, pg_database, pki, monkeypatch, capsys
):
    # A mapped identity, but issued by an unrelated CA: the server refuses the handshake.
    foreign = certs.issue_foreign_client(pki.directory, "notip-trio")
    env = daemon_env(
        clean_nats_server,
        pg_server,
        pg_database.name,
        NATS_TLS_CERT=str(foreign.cert),
        NATS_TLS_KEY=str(foreign.key),
    )
    code, lines = _check(env, monkeypatch, capsys)
    assert code == 1
    line = _line(lines, "FAILED", "nats")
    # The server's refusal arrives as a TLS alert or, with TLS 1.3, as a hang-up.
    assert (
        "(hint: the server does not trust NATS_TLS_CERT" in line
        or "(hint: the server hung up during the TLS handshake: it may not trust NATS_TLS_CERT"
        in line
    )


def test_nats_not_listening(pg_server, pg_database, pki, nats_server, monkeypatch, capsys):
    env = daemon_env(
        nats_server,
        pg_server,
        pg_database.name,
        NATS_URL="tls://127.0.0.1:1",
        NATS_CONNECT_TIMEOUT_SECONDS="1",
    )
    code, lines = _check(env, monkeypatch, capsys)
    assert code == 1
    line = _line(lines, "FAILED", "nats")
    assert "no connection to tls://127.0.0.1:1 within 1s (last error: ConnectionRefused" in line
    assert "(hint: check NATS_URL" in line


def test_wrong_database_password(
    clean_nats_server, pg_server, pg_database, tmp_path, monkeypatch, capsys
):
    password = tmp_path / "wrong-password"
    password.write_text("not-the-password\n", encoding="utf-8")
    env = daemon_env(clean_nats_server, pg_server, pg_database.name, DB_PASSWORD_FILE=str(password))
    with spawn_mgmt_standin(clean_nats_server, tmp_path / "mgmt.log"):
        code, lines = _check(env, monkeypatch, capsys)
    assert code == 1
    line = _line(lines, "FAILED", "postgres")
    assert f'password authentication failed for user "{pg_server.user}"' in line
    assert line.endswith("(hint: check DB_USER and the password in DB_PASSWORD_FILE)")
    assert "not-the-password" not in "\n".join(lines)
    _line(lines, "skip", "schema")
    _line(lines, "ok", "nats")
    _line(lines, "ok", "management API")


def test_database_tls_required_by_the_settings_but_not_offered(
    clean_nats_server, pg_server, pg_database, monkeypatch, capsys
):
    env = daemon_env(clean_nats_server, pg_server, pg_database.name, DB_SSL_MODE="require")
    code, lines = _check(env, monkeypatch, capsys)
    assert code == 1
    line = _line(lines, "FAILED", "postgres")
    assert "does not support SSL" in line
    assert "DB_SSL_MODE=disable" in line


def test_a_stream_missing(
    private_nats_server, pg_server, pg_database, tmp_path, monkeypatch, capsys
):
    nats = private_nats_server

    async def delete_alerts(nc: Any) -> None:
        await nc.jetstream().delete_stream("ALERTS")

    run_nats(nats, delete_alerts)
    env = daemon_env(nats, pg_server, pg_database.name)
    with spawn_mgmt_standin(nats, tmp_path / "mgmt.log"):
        code, lines = _check(env, monkeypatch, capsys)
    assert code == 1
    assert _line(lines, "FAILED", "stream ALERTS") == (
        "FAILED stream ALERTS: missing "
        "(hint: the platform creates the streams; notip-trio never does)"
    )
    _line(lines, "ok", "stream TELEMETRY")
    assert [line for line in lines if line.startswith("FAILED")] == [
        _line(lines, "FAILED", "stream ALERTS")
    ]


def test_management_api_silent(clean_nats_server, pg_server, pg_database, monkeypatch, capsys):
    env = daemon_env(clean_nats_server, pg_server, pg_database.name)
    code, lines = _check(env, monkeypatch, capsys)  # no stand-in: nobody answers
    assert code == 1
    line = _line(lines, "FAILED", "management API")
    assert "internal.mgmt.alert-configs.list" in line
    assert "no responders" in line
    assert "(hint: the management service must answer" in line
    assert [line for line in lines if line.startswith("FAILED")] == [line]


def test_a_durable_with_the_harmful_filter(
    clean_nats_server, pg_server, pg_database, tmp_path, monkeypatch, capsys
):
    nats = clean_nats_server

    async def add_go_style_durable(nc: Any) -> None:
        await nc.jetstream().add_consumer(
            "TELEMETRY",
            config=ConsumerConfig(
                durable_name=DURABLES[0],
                ack_policy=AckPolicy.EXPLICIT,
                filter_subject="telemetry.data.>",
            ),
        )

    run_nats(nats, add_go_style_durable)
    env = daemon_env(nats, pg_server, pg_database.name)
    with spawn_mgmt_standin(nats, tmp_path / "mgmt.log"):
        code, lines = _check(env, monkeypatch, capsys)
    assert code == 1
    line = _line(lines, "FAILED", f"durable {DURABLES[0]}")
    assert "filters on telemetry.data.>, the stream's own subjects" in line
    assert "README: Migrating from the Go service" in line


@pytest.fixture
def limited_role(pg_server: postgres.PgServer, pg_database: postgres.PgDatabase, tmp_path: Path):
    """A login role that owns nothing and may not CREATE in schema public."""
    if not pg_server.can_restart:
        pytest.skip("an external PostgreSQL: this test creates a role")
    name = f"limited_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    with psycopg.connect(pg_server.admin_conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
    password_file = tmp_path / "limited-password"
    password_file.write_text(password, encoding="utf-8")
    yield name, password_file
    # Privileges granted in the test's database first (as its owner), then the role.
    with psycopg.connect(pg_database.conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {}").format(
                sql.Identifier(name)
            )
        )
    with psycopg.connect(pg_server.admin_conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_a_user_that_may_not_run_the_migration(
    clean_nats_server, pg_server, pg_database, limited_role, tmp_path, monkeypatch, capsys
):
    nats = clean_nats_server
    owner_env = daemon_env(nats, pg_server, pg_database.name)
    trio.run(_start_up_like_the_daemon, daemon_settings(owner_env, monkeypatch))
    user, password_file = limited_role
    with psycopg.connect(pg_database.conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT ON telemetry TO {}").format(sql.Identifier(user))
        )
    env = {**owner_env, "DB_USER": user, "DB_PASSWORD_FILE": str(password_file)}
    with spawn_mgmt_standin(nats, tmp_path / "mgmt.log"):
        code, lines = _check(env, monkeypatch, capsys)
    assert code == 1
    line = _line(lines, "FAILED", "schema")
    assert f"{user} may not CREATE in schema public" in line
    assert f"table telemetry belongs to {pg_server.user}, not {user}" in line
    assert f"GRANT CREATE ON SCHEMA public TO {user}" in line
    assert f"ALTER TABLE telemetry OWNER TO {user}" in line
    _line(lines, "ok", "postgres")
    # The judgement is the daemon's fate: its migration fails as this user.
    with pytest.raises(DatabaseError, match="permission denied for schema public"):
        trio.run(_migrate, daemon_settings(env, monkeypatch))


# --- the pure parts --------------------------------------------------------------


def test_a_result_is_one_aligned_line() -> None:
    assert Result("ok", "nats", "connected").line() == "ok     nats: connected"
    assert Result("FAILED", "x", "broken", "fix it").line() == "FAILED x: broken (hint: fix it)"
    assert Result("info", "timescaledb", "n/a").line() == "info   timescaledb: n/a"


@pytest.mark.parametrize(
    ("reason", "hint"),
    [
        (
            "SSLCertVerificationError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
            "failed: unable to get local issuer certificate (_ssl.c:1006)",
            "NATS_TLS_CA must be",
        ),
        (
            "SSLCertVerificationError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
            "failed: Hostname mismatch, certificate is not valid for 'nats.example'",
            "NATS_URL's host",
        ),
        ("Error: nats: 'Authorization Violation'", "maps it to no user"),
        ("SSLError: [SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate", "trust"),
        ("SSLError: [SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca", "trust"),
        ("NATS_TLS_CERT/NATS_TLS_KEY a, b: SSLError: KEY_VALUES_MISMATCH", "NATS_TLS_KEY"),
        ("no connection to tls://x:1 within 1s (last error: ConnectionRefused)", "NATS_URL"),
    ],
)
def test_nats_hints(reason: str, hint: str) -> None:
    assert hint in nats_hint(reason)


@pytest.mark.parametrize(
    ("reason", "hint"),
    [
        ('FATAL:  password authentication failed for user "notip"', "DB_PASSWORD_FILE"),
        ('FATAL:  database "nope" does not exist', "DB_NAME"),
        ('FATAL:  role "nope" does not exist', "DB_USER"),
        ("server does not support SSL, but SSL was required", "DB_SSL_MODE=disable"),
        ("SSL error: certificate verify failed", "DB_SSL_ROOT_CERT"),
        ('FATAL:  no pg_hba.conf entry for host "10.0.0.1"', "pg_hba.conf"),
        ("Connection refused. Is the server running", "DB_HOST and DB_PORT"),
    ],
)
def test_postgres_hints(reason: str, hint: str) -> None:
    assert hint in pg_hint(reason)


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("telemetry.data.>", "telemetry.data.t.g", True),
        ("telemetry.data.>", "telemetry.data", False),
        ("telemetry.*.*.*", "telemetry.data.t.g", True),
        ("telemetry.*", "telemetry.data.t.g", False),
        ("alert.>", "alert.t.gw_offline", True),
        ("alerts.>", "alert.t.gw_offline", False),
        ("gateway.decommissioned.>", "gateway.decommissioned.t.g", True),
        (">", "anything.at.all", True),
        ("a.b", "a.b", True),
        ("a.b", "a.b.c", False),
    ],
)
def test_subject_matching(pattern: str, subject: str, matches: bool) -> None:
    assert subject_matches(pattern, subject) is matches


def _facts(**overrides: Any) -> DbFacts:
    table = TableFacts("notip", owned=True, writable=True, columns=frozenset(COLUMNS))
    base: dict[str, Any] = {
        "user": "notip",
        "server_version": "15.5",
        "ssl": True,
        "schema": "public",
        "can_create": True,
        "tables": dict.fromkeys(TABLES, table),
        "indexes": dict.fromkeys(INDEXES, True),
    }
    return DbFacts(**(base | overrides))


@pytest.mark.parametrize(
    ("age", "verdict", "says"),
    [
        (None, "info", "TELEMETRY is empty"),
        (0.25, "info", "0.250 s old by this host's clock: this host runs at most that far ahead"),
        (-2.0, "info", "2.000 s behind the NATS server's"),
        (600.0, "info", "600 s old: no recent one to compare with"),
    ],
)
def test_the_clock_line(age: float | None, verdict: str, says: str) -> None:
    now = 1_800_000_000.0
    result = clock_result(now, None if age is None else now - age)
    assert (result.status, result.check) == (verdict, "clock")
    assert says in result.detail


def test_schema_judgement() -> None:
    assert schema_result(_facts()).status == "ok"
    empty = schema_result(
        _facts(tables=dict.fromkeys(TABLES), indexes=dict.fromkeys(INDEXES, False))
    )
    assert empty.status == "ok"
    assert "may create them" in empty.detail
    assert schema_result(_facts(schema=None)).status == "FAILED"
    # The migration needs CREATE even when everything exists.
    assert schema_result(_facts(can_create=False)).status == "FAILED"
    foreign = TableFacts("postgres", owned=False, writable=True, columns=frozenset(COLUMNS))
    result = schema_result(_facts(tables={"telemetry": foreign, "telemetry_rejected": None}))
    assert result.status == "FAILED"
    assert "ALTER TABLE telemetry OWNER TO notip" in result.hint
    narrow = TableFacts("notip", owned=True, writable=True, columns=frozenset(COLUMNS[:-1]))
    result = schema_result(_facts(tables={"telemetry": narrow, "telemetry_rejected": None}))
    assert result.status == "FAILED"
    assert COLUMNS[-1] in result.detail


def test_timescaledb_is_what_the_daemon_will_do() -> None:
    def probe(available: bool, created: bool, loader: bool) -> TimescaleProbe:
        return TimescaleProbe(available, created, loader, None)

    cases = [
        _facts(),
        _facts(timescaledb_available="2.13.0", timescale=probe(True, False, False)),
        _facts(timescaledb_available="2.13.0", timescale=probe(True, False, True)),
        _facts(
            timescaledb_available="2.13.0",
            timescaledb_installed="2.13.0",
            timescale=probe(True, True, True),
            hypertable=True,
        ),
        _facts(
            timescaledb_available="2.13.0",
            timescaledb_installed="2.13.0",
            timescale=probe(True, True, False),
        ),
    ]
    results = [timescaledb_result(f) for f in cases]
    assert [r.status for r in results] == ["info", "info", "info", "info", "FAILED"]
    assert "not available" in results[0].detail
    assert "runs on plain PostgreSQL" in results[1].detail
    assert "shared_preload_libraries = 'timescaledb'" in results[1].hint
    assert "becomes a hypertable" in results[2].detail
    assert "telemetry is a hypertable" in results[3].detail
    assert "the daemon stops at start" in results[4].detail


def test_a_table_the_user_may_not_insert_into(
    clean_nats_server, pg_server, pg_database, tmp_path, monkeypatch, capsys
):
    nats = clean_nats_server
    env = daemon_env(nats, pg_server, pg_database.name)
    trio.run(_start_up_like_the_daemon, daemon_settings(env, monkeypatch))
    with psycopg.connect(pg_database.conninfo, autocommit=True) as conn:
        # SELECT stays: a privilege list in has_table_privilege would mean "any of them".
        conn.execute(
            sql.SQL("REVOKE INSERT ON telemetry FROM {}").format(sql.Identifier(pg_server.user))
        )
    with spawn_mgmt_standin(nats, tmp_path / "mgmt.log"):
        code, lines = _check(env, monkeypatch, capsys)
    assert code == 1
    line = _line(lines, "FAILED", "schema")
    assert f"{pg_server.user} may not SELECT and INSERT on telemetry" in line
    assert f"GRANT SELECT, INSERT ON telemetry TO {pg_server.user}" in line
