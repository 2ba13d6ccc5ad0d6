"""`notip-trio check`: the preflight (docs/contract.md Behaviour 11).

`__main__` loads the settings exactly as for the daemon (a bad one: exit 2
there) and hands them to `run_check`, which checks every dependency the daemon
needs, each within its own deadline, and prints one line per check::

    ok     <check>: <detail>
    FAILED <check>: <reason> (hint: <what to do>)
    info   <check>: <detail>                 worth knowing, never a failure
    skip   <check>: not checked (<why>)      it needs a check that failed

It changes nothing: no migration, no stream or consumer created, and the
database session is read-only. Returns 0 when nothing FAILED, 1 otherwise.

The NATS checks connect exactly as the daemon does (`NatsBridge.connect`) but
give up at the first TLS or authorization error instead of retrying; durables
are judged by `js.specs.durable_problems`, as at start-up; the management API
is asked through `MgmtClient`, one attempt. The database facts are gathered in
one worker thread (`db.facts.db_facts`) and judged by pure functions; TimescaleDB by the
daemon's own plan (`db.schema.timescaledb_plan`), so the preflight reports what
the daemon will do. The pull specs come from `js.specs`, not from the task tree.
"""

from __future__ import annotations

# trio_asyncio must be imported before psycopg (docs/pitfalls.md).
import trio_asyncio  # isort: split

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Literal, TextIO

import nats.errors
import psycopg
import trio

from . import wire
from .config import Settings
from .db.facts import DB_CONNECT_TIMEOUT_S, DB_QUERY_TIMEOUT_S, DbFacts, db_facts, pg_hint
from .db.schema import COLUMNS, PRELOAD_SETTING, TimescalePlan, timescaledb_plan
from .errors import MgmtError, NatsRequestError, StartupError
from .horizon import parse_stream_time
from .js.bridge import NatsBridge
from .js.specs import PullSpec, decommission_spec, durable_problems, telemetry_spec
from .leader import lock_session_settings
from .mgmt import SUBJECT_LIST_CONFIGS, MgmtClient
from .wire import STREAMS

Verdict = Literal["ok", "FAILED", "info", "skip"]

STEP_TIMEOUT_S: Final = 5.0  # one JetStream info call, one management-API request
#: A subject each stream must capture: what the platform publishes, or the daemon does.
SAMPLE_SUBJECTS: Final = {
    "TELEMETRY": "telemetry.data.tenant.gateway",
    "ALERTS": "alert.tenant.gw_offline",
    "DECOMMISSION": "gateway.decommissioned.tenant.gateway",
}


@dataclass(frozen=True, slots=True)
class Result:
    status: Verdict
    check: str
    detail: str
    hint: str = ""

    def line(self) -> str:
        text = f"{self.status:<6} {self.check}: {self.detail}"
        return f"{text} (hint: {self.hint})" if self.hint else text


Emit = Callable[[Result], None]


def run_check(settings: Settings, out: TextIO | None = None) -> int:
    """Run every check, print one line each to `out` (stdout); return the exit code."""
    stream = out if out is not None else sys.stdout
    failed = False

    def emit(result: Result) -> None:
        nonlocal failed
        failed = failed or result.status == "FAILED"
        print(result.line(), file=stream, flush=True)

    with _quiet_logs():
        trio.run(check_all, settings, emit)
    return 1 if failed else 0


@contextmanager
def _quiet_logs() -> Iterator[None]:
    # The lines are the report; the daemon's warnings (nats_error, ...) would only
    # repeat them, and unconfigured logging would print them without context.
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


async def check_all(settings: Settings, emit: Emit) -> None:
    emit(
        Result(
            "ok",
            "configuration",
            f"loaded (NATS {settings.nats_url}, PostgreSQL {settings.db_host}:"
            f"{settings.db_port}/{settings.db_name} as {settings.db_user})",
        )
    )
    async with trio_asyncio.open_loop():
        await check_nats(settings, emit)
    await check_database(settings, emit)


# --- NATS --------------------------------------------------------------------


async def check_nats(settings: Settings, emit: Emit) -> None:
    specs = (telemetry_spec(settings), decommission_spec())
    try:
        with trio.fail_after(settings.nats_connect_timeout_s + 2):
            bridge = await NatsBridge.from_settings(
                settings, name="notip-trio-check", retry=False
            )
    except (StartupError, trio.TooSlowError) as exc:
        reason = str(exc).removeprefix("NATS: ") or "no connection"
        emit(Result("FAILED", "nats", reason, nats_hint(reason)))
        why = "no NATS connection"
        for name in STREAMS:
            emit(Result("skip", f"stream {name}", f"not checked ({why})"))
        for spec in specs:
            emit(Result("skip", _durable_check(spec), f"not checked ({why})"))
        emit(Result("skip", "management API", f"not checked ({why})"))
        return
    try:
        v = bridge.nc.connected_server_version
        emit(
            Result(
                "ok",
                "nats",
                f"connected to {settings.nats_url} with {settings.nats_tls_cert} "
                f"(nats-server {v.major}.{v.minor}.{v.patch})",
            )
        )
        subjects = {name: await _check_stream(bridge, name, emit) for name in STREAMS}
        for spec in specs:
            await _check_durable(bridge, spec, subjects.get(spec.stream), emit)
        await _check_clock(bridge, emit)
        await _check_mgmt(bridge, emit)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(STEP_TIMEOUT_S):
            await bridge.close()


def nats_hint(reason: str) -> str:
    """What to do about a failed NATS connection, from its reason."""
    r = reason.lower()
    if "hostname mismatch" in r or "ip address mismatch" in r:
        return "NATS_URL's host is not named in the server's certificate"
    if "certificate verify failed" in r:
        return "NATS_TLS_CA must be the CA that signed the server's certificate"
    if "authorization violation" in r:
        return (
            "the server trusts the certificate but maps it to no user: add its identity "
            "(SAN e-mail, SAN DNS or subject DN) to the server's authorization users"
        )
    if "alert" in r and ("certificate" in r or "unknown ca" in r):
        return "the server does not trust NATS_TLS_CERT: it must be issued by the server's CA"
    if "nats_tls_" in r:
        return "NATS_TLS_KEY must be the key of NATS_TLS_CERT; all three files PEM"
    if "broken pipe" in r or "connection reset" in r:
        # TLS 1.3: a refused client certificate often shows as the server hanging up.
        return (
            "the server hung up during the TLS handshake: it may not trust NATS_TLS_CERT "
            "(issued by another CA?)"
        )
    return "check NATS_URL (host, port, tls://) and that nats-server is reachable from here"


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: `*` is one token, a final `>` one or more."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return i == len(want) - 1 and len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(want) == len(got)


async def _check_stream(bridge: NatsBridge, name: str, emit: Emit) -> list[str] | None:
    check = f"stream {name}"
    try:
        with trio.fail_after(STEP_TIMEOUT_S):
            subjects = await bridge.stream_subjects(name)
    except trio.TooSlowError:
        emit(Result("FAILED", check, f"no answer within {STEP_TIMEOUT_S:g}s", _JS_HINT))
        return None
    except (nats.errors.Error, OSError) as exc:
        emit(Result("FAILED", check, f"{type(exc).__name__}: {exc}", _JS_HINT))
        return None
    if subjects is None:
        emit(
            Result(
                "FAILED",
                check,
                "missing",
                "the platform creates the streams; notip-trio never does",
            )
        )
        return None
    sample = SAMPLE_SUBJECTS[name]
    listed = ", ".join(subjects) or "none"
    if not any(subject_matches(p, sample) for p in subjects):
        emit(
            Result(
                "FAILED",
                check,
                f"its subjects ({listed}) do not capture {sample}",
                "the stream's subjects must follow docs/contract.md",
            )
        )
        return subjects
    emit(Result("ok", check, f"present (subjects {listed})"))
    return subjects


_JS_HINT: Final = "JetStream must be enabled for this client's account"


def _durable_check(spec: PullSpec) -> str:
    return f"durable {spec.durable}"


async def _check_durable(
    bridge: NatsBridge, spec: PullSpec, subjects: list[str] | None, emit: Emit
) -> None:
    check = _durable_check(spec)
    if subjects is None:
        emit(Result("skip", check, f"not checked (stream {spec.stream} unusable)"))
        return
    try:
        with trio.fail_after(STEP_TIMEOUT_S):
            cfg = await bridge.durable_config(spec.stream, spec.durable)
    except trio.TooSlowError:
        emit(Result("FAILED", check, f"no answer within {STEP_TIMEOUT_S:g}s", _JS_HINT))
        return
    except (nats.errors.Error, OSError) as exc:
        emit(Result("FAILED", check, f"{type(exc).__name__}: {exc}", _JS_HINT))
        return
    if cfg is None:
        emit(
            Result(
                "info",
                check,
                f"absent on {spec.stream}; the daemon creates it at start (pull, explicit ack)",
            )
        )
        return
    problems = durable_problems(
        cfg,
        subjects,
        stream=spec.stream,
        durable=spec.durable,
        max_ack_pending=spec.max_ack_pending,
    )
    # Refused ones stop the daemon; the redundant filter makes it crawl: both fail here.
    bad = [p for p in problems if p.refused or p.kind == "filter_redundant"]
    if bad:
        emit(
            Result(
                "FAILED",
                check,
                "; ".join(p.message for p in bad),
                "recreate it as a pull consumer with explicit ack and no filter, from its "
                "ack floor (README: Migrating from the Go service)",
            )
        )
        return
    filt = f"filter {cfg.filter_subject}" if cfg.filter_subject else "no filter"
    emit(Result("ok", check, f"pull consumer on {spec.stream}, explicit ack, {filt}"))
    for p in problems:
        emit(Result("info", check, p.message))


# --- clocks ------------------------------------------------------------------

#: Beyond this age the newest message says nothing useful about the clocks.
CLOCK_RECENT_S: Final = 60.0


async def _check_clock(bridge: NatsBridge, emit: Emit) -> None:
    """How this host's clock compares with the stream's (the NATS server's): the
    newest TELEMETRY message's stream time against this host's clock."""
    try:
        with trio.fail_after(STEP_TIMEOUT_S):
            raw = await bridge.request(f"$JS.API.STREAM.INFO.{wire.TELEMETRY_STREAM}", b"")
        newest = parse_stream_time(json.loads(raw)["state"]["last_ts"])
        messages = int(json.loads(raw)["state"]["messages"])
    except (trio.TooSlowError, NatsRequestError, KeyError, TypeError, ValueError) as exc:
        emit(Result("skip", "clock", f"stream time not read ({type(exc).__name__}: {exc})"))
        return
    emit(clock_result(time.time(), newest if messages else None))


def clock_result(now: float, newest: float | None) -> Result:
    """The `clock` line from this host's time and the newest message's stream time.

    Last-seen is stream time; the leader judges silence in stream time too and
    corrects for the skew it measures (docs/architecture.md, One clock), so
    this line informs, it does not fail: a skew of seconds means NTP is broken
    somewhere, and alerts' `timestamp` fields carry this host's time."""
    if newest is None:
        return Result("info", "clock", "TELEMETRY is empty: no stream time to compare with")
    age = now - newest
    if age < 0:
        return Result(
            "info",
            "clock",
            f"this host's clock is {-age:.3f} s behind the NATS server's "
            "(the newest message is from its future); the daemon corrects for it",
        )
    if age > CLOCK_RECENT_S:
        return Result(
            "info", "clock", f"the newest message is {age:.0f} s old: no recent one to compare with"
        )
    return Result(
        "info",
        "clock",
        f"the newest message is {age:.3f} s old by this host's clock: this host runs at most "
        "that far ahead of the NATS server; the daemon corrects for the skew it measures",
    )


async def _check_mgmt(bridge: NatsBridge, emit: Emit) -> None:
    client = MgmtClient(bridge, attempt_timeout_s=STEP_TIMEOUT_S, retry_delays_s=())
    try:
        configs = await client.list_alert_configs()
    except MgmtError as exc:
        emit(
            Result(
                "FAILED",
                "management API",
                str(exc),
                f"the management service must answer {SUBJECT_LIST_CONFIGS} on this NATS; "
                "without it there are no alert configs and no status updates",
            )
        )
        return
    emit(
        Result(
            "ok",
            "management API",
            f"{SUBJECT_LIST_CONFIGS} answered with {len(configs)} alert config(s)",
        )
    )


# --- PostgreSQL ----------------------------------------------------------------


async def check_database(settings: Settings, emit: Emit) -> None:
    conninfo = settings.db_conninfo()
    where = f"{settings.db_host}:{settings.db_port}/{settings.db_name} as {settings.db_user}"
    try:
        with trio.fail_after(DB_CONNECT_TIMEOUT_S + DB_QUERY_TIMEOUT_S + 2):
            facts = await trio.to_thread.run_sync(db_facts, conninfo, abandon_on_cancel=True)
    except trio.TooSlowError:
        reason = f"{where}: no answer within {DB_CONNECT_TIMEOUT_S + DB_QUERY_TIMEOUT_S:g}s"
        emit(Result("FAILED", "postgres", reason, pg_hint(reason)))
        facts = None
    except psycopg.Error as exc:
        reason = f"{where}: {_one_line(str(exc))}"
        emit(Result("FAILED", "postgres", reason, pg_hint(reason)))
        facts = None
    if facts is None:
        emit(Result("skip", "schema", "not checked (no database connection)"))
        emit(Result("skip", "timescaledb", "not checked (no database connection)"))
        emit(Result("skip", "leader lock", "not checked (no database connection)"))
        return
    tls = f"TLS on, DB_SSL_MODE={settings.db_ssl_mode}" if facts.ssl else "TLS off"
    emit(
        Result("ok", "postgres", f"connected to {where} (PostgreSQL {facts.server_version}, {tls})")
    )
    emit(schema_result(facts))
    emit(timescaledb_result(facts))
    await _check_lock_session(settings, emit)


def schema_result(facts: DbFacts) -> Result:
    """Whether the daemon's start-up migration can run: it needs CREATE on the
    schema even when every object exists (CREATE ... IF NOT EXISTS checks the
    right first) and the owner's rights on existing tables (CREATE INDEX)."""
    if facts.schema is None:
        return Result(
            "FAILED",
            "schema",
            f"no schema on the search_path of {facts.user}",
            f"ALTER ROLE {facts.user} SET search_path = public",
        )
    reasons: list[str] = []
    hints: list[str] = []
    if not facts.can_create:
        reasons.append(f"{facts.user} may not CREATE in schema {facts.schema}")
        hints.append(f"GRANT CREATE ON SCHEMA {facts.schema} TO {facts.user}")
    for name, table in facts.tables.items():
        if table is None:
            continue
        if not table.owned:
            reasons.append(f"table {name} belongs to {table.owner}, not {facts.user}")
            hints.append(
                f"ALTER TABLE {name} OWNER TO {facts.user} (or GRANT {table.owner} TO {facts.user})"
            )
        elif not table.writable:
            reasons.append(f"{facts.user} may not SELECT and INSERT on {name}")
            hints.append(f"GRANT SELECT, INSERT ON {name} TO {facts.user}")
    telemetry = facts.tables.get("telemetry")
    if telemetry is not None and (lacking := [c for c in COLUMNS if c not in telemetry.columns]):
        reasons.append(f"table telemetry lacks column(s) {', '.join(lacking)}")
        hints.append("telemetry must have docs/contract.md's columns")
    if reasons:
        why = "; ".join(reasons)
        return Result(
            "FAILED",
            "schema",
            f"the start-up migration would fail: {why}",
            "; ".join(hints),
        )
    missing = [n for n, t in facts.tables.items() if t is None]
    missing += [n for n, present in facts.indexes.items() if not present]
    if not missing:
        return Result(
            "ok",
            "schema",
            f"tables {', '.join(facts.tables)} and indexes {', '.join(facts.indexes)} present "
            f"in schema {facts.schema}, owned by {facts.user}",
        )
    return Result(
        "ok",
        "schema",
        f"{', '.join(missing)} missing; {facts.user} may create them in schema "
        f"{facts.schema} (the daemon does at start)",
    )


def timescaledb_result(facts: DbFacts) -> Result:
    """What the daemon will run on, decided by the daemon's own plan
    (`db.schema.timescaledb_plan`) from the same probe: check and daemon agree.

    Information unless the daemon would stop: an extension created in this
    database but not preloaded (FAILED).
    """
    probe = facts.timescale
    plan = timescaledb_plan(probe)
    version = facts.timescaledb_installed or facts.timescaledb_available or "timescaledb"
    restart = f"add {PRELOAD_SETTING} to postgresql.conf and restart PostgreSQL"
    if plan is TimescalePlan.PLAIN:
        return Result("info", "timescaledb", "not available; telemetry is a plain table")
    if plan is TimescalePlan.HYPERTABLE:
        if probe.created:
            table = (
                "telemetry is a hypertable"
                if facts.hypertable
                else "telemetry becomes a hypertable at start"
            )
            return Result("info", "timescaledb", f"{version} installed and preloaded; {table}")
        return Result(
            "info",
            "timescaledb",
            f"{version} available and preloaded, not installed; the daemon creates the "
            "extension at start and telemetry becomes a hypertable",
        )
    if plan is TimescalePlan.PLAIN_NOT_PRELOADED:
        return Result(
            "info",
            "timescaledb",
            f"{version} available but not preloaded; the daemon runs on plain PostgreSQL "
            "(telemetry stays a plain table) and warns timescaledb_not_preloaded",
            f"for a hypertable, {restart}",
        )
    return Result(
        "FAILED",
        "timescaledb",
        f"the extension ({version}) exists in this database but the server does not preload "
        "it; any use of it ends the connection, so the daemon stops at start",
        restart,
    )


# --- the leader's lock session (docs/leader-lock.md) -----------------------------


@dataclass(frozen=True, slots=True)
class LockSessionFacts:
    """How the leader's lock connection reaches PostgreSQL."""

    pids: tuple[int, int]  # pg_backend_pid() in two transactions on one connection
    server_version: str
    unavailable: tuple[str, ...]  # lock-session settings this server does not know


def lock_session_facts(conninfo: str) -> LockSessionFacts:
    """Blocking (worker thread): connect as the lock does and look, read-only."""
    with psycopg.connect(conninfo, connect_timeout=DB_CONNECT_TIMEOUT_S, autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = on")
        conn.execute(f"SET statement_timeout = '{int(DB_QUERY_TIMEOUT_S * 1000)}ms'")

        def pid() -> int:
            # Autocommit: each statement is its own transaction, which a
            # transaction pooler may hand to any server connection.
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            return int(row[0])

        pids = (pid(), pid())
        wanted = list(lock_session_settings())
        known = {
            str(r[0])
            for r in conn.execute(
                "SELECT name FROM pg_settings WHERE name = ANY(%s::text[])", (wanted,)
            )
        }
        row = conn.execute("SELECT current_setting('server_version')").fetchone()
        assert row is not None
        return LockSessionFacts(
            pids=pids,
            server_version=str(row[0]).split()[0],
            unavailable=tuple(name for name in wanted if name not in known),
        )


def lock_session_result(facts: LockSessionFacts) -> Result:
    """The lock needs one server session for the life of its connection."""
    first, second = facts.pids
    if first != second:
        return Result(
            "FAILED",
            "leader lock",
            f"two transactions on one connection ran on backends {first} and {second}: a "
            "transaction (or statement) pooler sits in front of PostgreSQL, so the leader's "
            "advisory lock does not stay with its session and replicas cannot agree on a leader",
            "point DB_HOST/DB_PORT at PostgreSQL directly or at a pooler in session mode "
            "(docs/leader-lock.md)",
        )
    same = f"one backend per connection (pid {first}: direct or session pooling)"
    if facts.unavailable:
        return Result(
            "info",
            "leader lock",
            f"{same}; PostgreSQL {facts.server_version} lacks {', '.join(facts.unavailable)}: "
            "a leader hung behind a path that still answers TCP keepalives keeps the lock "
            "until its connection closes (PostgreSQL 14+ ends it within ~20 s)",
        )
    return Result(
        "ok",
        "leader lock",
        f"{same}; the server ends a silent leader's lock session within ~20 s",
    )


async def _check_lock_session(settings: Settings, emit: Emit) -> None:
    conninfo = settings.db_conninfo(keepalives=True)  # exactly the lock's connection
    try:
        with trio.fail_after(DB_CONNECT_TIMEOUT_S + DB_QUERY_TIMEOUT_S + 2):
            facts = await trio.to_thread.run_sync(
                lock_session_facts, conninfo, abandon_on_cancel=True
            )
    except trio.TooSlowError:
        emit(Result("FAILED", "leader lock", "no answer", pg_hint("")))
        return
    except psycopg.Error as exc:
        emit(Result("FAILED", "leader lock", _one_line(str(exc)), pg_hint(str(exc))))
        return
    emit(lock_session_result(facts))


def _one_line(text: str) -> str:
    return " ".join(text.split())
