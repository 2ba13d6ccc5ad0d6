"""The PostgreSQL side of the preflight: the connection, the schema, TimescaleDB
and the telemetry lifecycle (judged by the daemon's own plans), and the
leader's lock session (docs/leader-lock.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import psycopg
import trio

from ..config import Settings
from ..db.facts import DB_CONNECT_TIMEOUT_S, DB_QUERY_TIMEOUT_S, DbFacts, db_facts, pg_hint
from ..db.lifecycle import (
    Lifecycle,
    LifecycleFacts,
    describe_hours,
    describe_seconds,
    plan_lifecycle,
)
from ..db.schema import COLUMNS, PRELOAD_SETTING, TimescalePlan, timescaledb_plan
from ..leader import lock_session_settings
from .result import Emit, Result, _one_line

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
        emit(Result("skip", LIFECYCLE, "not checked (no database connection)"))
        emit(Result("skip", "leader lock", "not checked (no database connection)"))
        return
    tls = f"TLS on, DB_SSL_MODE={settings.db_ssl_mode}" if facts.ssl else "TLS off"
    emit(
        Result("ok", "postgres", f"connected to {where} (PostgreSQL {facts.server_version}, {tls})")
    )
    emit(schema_result(facts))
    emit(timescaledb_result(facts))
    emit(lifecycle_result(facts, Lifecycle.from_settings(settings)))
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


LIFECYCLE: Final = "telemetry lifecycle"


def lifecycle_result(facts: DbFacts, wanted: Lifecycle) -> Result:
    """The table's kind, chunk interval, compression and retention, against
    TELEMETRY_COMPRESS_AFTER and TELEMETRY_RETENTION, judged by the migration's
    own plan (`db.lifecycle.plan_lifecycle`).

    What the daemon sets right at start is information, as is what it leaves
    alone (said why); never a failure: telemetry is stored either way.
    """
    asked = _asked(wanted)
    plan = timescaledb_plan(facts.timescale)
    if plan is TimescalePlan.STOP_NOT_PRELOADED:
        return Result("skip", LIFECYCLE, "not checked (timescaledb unusable, above)")
    if plan is not TimescalePlan.HYPERTABLE:
        if wanted.compress_after_h is None and wanted.retention_h is None:
            return Result("ok", LIFECYCLE, f"plain table, kept for ever as asked ({asked})")
        return Result(
            "info",
            LIFECYCLE,
            f"plain table: uncompressed and kept for ever; {asked} need TimescaleDB "
            "(the daemon says so once at start)",
        )
    lifecycle = facts.lifecycle
    if not facts.hypertable or lifecycle is None:
        steps = plan_lifecycle(_FRESH, wanted).steps
        then = "; ".join(step.describe() for step in steps) or "sets no policy"
        return Result(
            "info",
            LIFECYCLE,
            f"telemetry becomes a hypertable at start; the daemon then does: {then} ({asked})",
        )
    have = describe_lifecycle(lifecycle)
    todo = plan_lifecycle(lifecycle, wanted)
    if not todo.steps and not todo.notes:
        return Result("ok", LIFECYCLE, f"{have}; as asked ({asked})")
    parts = [f"{have}; differs from {asked}"]
    if todo.steps:
        parts.append("the daemon will at start: " + "; ".join(s.describe() for s in todo.steps))
    parts += todo.notes
    return Result("info", LIFECYCLE, ": ".join(parts[:2]) + "".join(f"; {n}" for n in parts[2:]))


_FRESH: Final = LifecycleFacts(version="99", chunk_interval_s=86400.0, compression_enabled=False)


def _asked(wanted: Lifecycle) -> str:
    def one(name: str, hours: int | None) -> str:
        return f"{name}={'off' if hours is None else describe_hours(hours)}"

    return (
        f"{one('TELEMETRY_COMPRESS_AFTER', wanted.compress_after_h)}, "
        f"{one('TELEMETRY_RETENTION', wanted.retention_h)}"
    )


def describe_lifecycle(facts: LifecycleFacts) -> str:
    """One phrase: hypertable, chunk interval, compression, retention."""
    chunks = (
        "chunk interval unknown"
        if facts.chunk_interval_s is None
        else f"chunk interval {describe_seconds(facts.chunk_interval_s)}"
    )
    if not facts.compression_enabled:
        compression = "compression off"
    else:
        columns = (
            f"segment by {', '.join(facts.segmentby) or 'nothing'}, "
            f"order by {', '.join(facts.orderby) or 'nothing'}"
        )
        policy = facts.compression_policy
        when = (
            "no compression policy"
            if policy is None
            else f"compressed after {describe_seconds(policy.after_s)}{_whose(policy.ours)}"
        )
        compression = f"compression on ({columns}), {when}"
    retention = (
        "no retention policy (kept for ever)"
        if facts.retention_policy is None
        else f"dropped after {describe_seconds(facts.retention_policy.after_s)}"
        f"{_whose(facts.retention_policy.ours)}"
    )
    return f"hypertable (TimescaleDB {facts.version}), {chunks}, {compression}, {retention}"


def _whose(ours: bool) -> str:
    return "" if ours else " (policy made outside notip-trio)"


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
