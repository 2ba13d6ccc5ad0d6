"""PostgreSQL: migrations, batched COPY writes with redelivery dedup, rejected messages.

psycopg 3's *sync* connections run in worker threads (`trio.to_thread`): measured
faster than its asyncio connection through trio-asyncio (README: Storage), and it
keeps the database off the asyncio bridge.

Every round trip has a deadline (`_run`). A thread cannot be interrupted and a
server that stopped answering never sends the error `statement_timeout` would
make, so when the deadline passes (or the caller is cancelled) the round trip
is cut loose: the socket of every connection it holds is shut down under the
blocked call, libpq fails at once, the worker thread returns, the pool discards
the broken connection, and the idle ones (likely behind the same dead path) are
replaced too. Statements that take connections from `self._pool` inside `_run`
get this without doing anything (`_Pool` and `_check` register them).

Effectively once: a unique index on (tenant_id, gateway_id, sensor_id, time)
and `INSERT ... SELECT FROM <staging> ON CONFLICT DO NOTHING` after a COPY into
a temporary staging table, so a redelivered message never makes a second row.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import psycopg
import psycopg_pool
import trio
from psycopg import sql
from psycopg_pool.base import AttemptWithBackoff

from . import livestate
from .config import DEFAULTS
from .envelope import Row
from .log import get_logger

log = get_logger(__name__)
T = TypeVar("T")

COLUMNS: Final = (
    "time",
    "tenant_id",
    "gateway_id",
    "sensor_id",
    "sensor_type",
    "encrypted_data",
    "iv",
    "auth_tag",
    "key_version",
)
_COPY_TYPES: Final = ("timestamptz", "text", "text", "text", "text", "text", "text", "text", "int4")
DEDUP_INDEX: Final = "telemetry_dedup_key"
#: What the migration creates (`notip-trio check` looks for them by these names).
TABLES: Final = ("telemetry", "telemetry_rejected", "gateway_liveness")
INDEXES: Final = (
    "idx_telemetry_tenant_gateway_time",
    DEDUP_INDEX,
    "telemetry_rejected_stream_seq",
    "telemetry_rejected_received_at",
    "gateway_liveness_changed",
)
_MIGRATION_LOCK: Final = 0x6E6F746970  # "notip": serialises migrations across replicas

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS telemetry (
    time           TIMESTAMPTZ NOT NULL,
    tenant_id      TEXT        NOT NULL,
    gateway_id     TEXT        NOT NULL,
    sensor_id      TEXT        NOT NULL,
    sensor_type    TEXT        NOT NULL,
    encrypted_data TEXT        NOT NULL,
    iv             TEXT        NOT NULL,
    auth_tag       TEXT        NOT NULL,
    key_version    INTEGER     NOT NULL
);
CREATE TABLE IF NOT EXISTS telemetry_rejected (
    id            BIGSERIAL   PRIMARY KEY,
    received_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    subject       TEXT        NOT NULL,
    reason        TEXT        NOT NULL,
    detail        TEXT        NOT NULL,
    body          BYTEA       NOT NULL,
    body_length   INTEGER     NOT NULL,
    stream_seq    BIGINT
);
CREATE UNIQUE INDEX IF NOT EXISTS telemetry_rejected_stream_seq
    ON telemetry_rejected (stream_seq);
CREATE INDEX IF NOT EXISTS telemetry_rejected_received_at
    ON telemetry_rejected (received_at DESC);
"""
_INDEX: Final = """
CREATE INDEX IF NOT EXISTS idx_telemetry_tenant_gateway_time
    ON telemetry (tenant_id, gateway_id, time DESC);
"""
_DEDUP: Final = f"""
CREATE UNIQUE INDEX IF NOT EXISTS {DEDUP_INDEX}
    ON telemetry (tenant_id, gateway_id, sensor_id, time);
"""
# Rows equal in every column are the same reading written twice (the Go service
# wrote at least once); keep one of each. Rows that differ anywhere are kept.
_DELETE_EXACT_DUPLICATES: Final = """
DELETE FROM telemetry a USING telemetry b
 WHERE a.ctid > b.ctid
   AND a.time = b.time AND a.tenant_id = b.tenant_id AND a.gateway_id = b.gateway_id
   AND a.sensor_id = b.sensor_id AND a.sensor_type = b.sensor_type
   AND a.encrypted_data = b.encrypted_data AND a.iv = b.iv AND a.auth_tag = b.auth_tag
   AND a.key_version = b.key_version
"""
_COUNT_KEY_CONFLICTS: Final = """
SELECT count(*) FROM (
  SELECT 1 FROM telemetry GROUP BY tenant_id, gateway_id, sensor_id, time HAVING count(*) > 1
) k
"""
_STAGE: Final = """
CREATE TEMP TABLE IF NOT EXISTS telemetry_stage (
    time TIMESTAMPTZ, tenant_id TEXT, gateway_id TEXT, sensor_id TEXT, sensor_type TEXT,
    encrypted_data TEXT, iv TEXT, auth_tag TEXT, key_version INTEGER
) ON COMMIT DELETE ROWS
"""
_COLS: Final = ", ".join(COLUMNS)
_COPY_STAGE: Final = f"COPY telemetry_stage ({_COLS}) FROM STDIN (FORMAT BINARY)"
_COPY_DIRECT: Final = f"COPY telemetry ({_COLS}) FROM STDIN (FORMAT BINARY)"
_MERGE_ON_CONFLICT: Final = (
    f"INSERT INTO telemetry ({_COLS}) SELECT {_COLS} FROM telemetry_stage ON CONFLICT DO NOTHING"
)
# Fallback when the unique index could not be built (a table the Go service
# filled with differing rows under one key): same result, slower, per batch.
_MERGE_NOT_EXISTS: Final = f"""
INSERT INTO telemetry ({_COLS})
SELECT DISTINCT ON (tenant_id, gateway_id, sensor_id, time) {_COLS} FROM telemetry_stage s
 WHERE NOT EXISTS (
   SELECT 1 FROM telemetry t
    WHERE t.tenant_id = s.tenant_id AND t.gateway_id = s.gateway_id
      AND t.time = s.time AND t.sensor_id = s.sensor_id)
"""
_INSERT_REJECTED: Final = """
INSERT INTO telemetry_rejected (received_at, subject, reason, detail, body, body_length, stream_seq)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (stream_seq) DO NOTHING
"""


class DatabaseError(Exception):
    """The database could not be reached or refused a write; the batch was not committed."""


class DeadlineExceeded(DatabaseError):
    """No answer within the round trip's deadline; its connections were abandoned."""

    def __init__(self, message: str, *, connections_cut: int = 0) -> None:
        super().__init__(message)
        self.connections_cut = connections_cut


Conn = psycopg.Connection[tuple[Any, ...]]

# After cutting a round trip loose, wait this long for its thread to return
# before leaving it behind (it then still returns its connection when it ends).
CUT_GRACE_S: Final = 5.0
WRITE_TIMEOUT_S: Final = int(DEFAULTS["DB_WRITE_TIMEOUT_MS"]) / 1000
MIGRATE_TIMEOUT_S: Final = int(DEFAULTS["DB_MIGRATE_TIMEOUT_MS"]) / 1000


class _Cut(BaseException):
    """Raised in a worker thread that asks for a connection after its round trip
    was cut. A BaseException so the pool gives the connection back and stops
    retrying (it retries checks that fail with an Exception)."""


class RoundTrip:
    """What one round trip holds, so that its deadline can cut it loose. Thread-safe.

    The worker thread `hold`s each connection it uses (with a way to cut it and
    a way to let it go); `cut` runs every cutter once and makes later `hold`s
    raise. Pure bookkeeping: `_run` owns the timing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, tuple[Callable[[], None], Callable[[], None]]] = {}
        self.cut_done = False

    def hold(self, key: object, cut: Callable[[], None], release: Callable[[], None]) -> None:
        """Hold `key` until `let_go` (a second hold of it keeps the first).

        Raises `_Cut` (after `release()`) once the round trip has been cut."""
        with self._lock:
            fresh = not self.cut_done and id(key) not in self._held
            if fresh:
                self._held[id(key)] = (cut, release)
            refused = self.cut_done
        if not fresh:
            release()
        if refused:
            raise _Cut

    def let_go(self, key: object) -> None:
        with self._lock:
            entry = self._held.pop(id(key), None)
        if entry is not None:
            entry[1]()

    def cut(self) -> int:
        """Cut every held connection; returns how many."""
        with self._lock:
            self.cut_done = True
            held, self._held = list(self._held.values()), {}
        for cut, release in held:
            try:
                cut()
            finally:
                release()
        return len(held)


_local = threading.local()  # .trip: the RoundTrip of the worker thread's current call


def current_round_trip() -> RoundTrip | None:
    """The round trip this worker thread runs for (None outside `bounded`)."""
    trip: RoundTrip | None = getattr(_local, "trip", None)
    return trip


async def bounded(fn: Callable[[], T], timeout_s: float) -> T:
    """Run `fn` in a worker thread; cut its connections loose at the deadline or
    when the caller is cancelled.

    On the deadline raises `DeadlineExceeded` (whatever the thread then raised
    is dropped); on cancellation lets `Cancelled` through without waiting for
    the thread. Exceptions from `fn` before the deadline pass through.
    """
    trip = RoundTrip()
    token = trio.lowlevel.current_trio_token()
    returned = trio.Event()

    def in_thread() -> T:
        _local.trip = trip
        try:
            return fn()
        finally:
            _local.trip = None
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(returned.set)

    deadline = trio.current_time() + timeout_s
    try:
        with trio.move_on_at(deadline):
            return await trio.to_thread.run_sync(in_thread, abandon_on_cancel=True)
    except trio.Cancelled:
        trip.cut()  # the caller gave up: nothing must stay blocked on its behalf
        raise
    cut = trip.cut()
    log.warning("database_deadline_exceeded", timeout_s=timeout_s, connections_cut=cut)
    with trio.move_on_after(CUT_GRACE_S):
        await returned.wait()
    if not returned.is_set():
        log.error("database_thread_left_behind", grace_s=CUT_GRACE_S)
    raise DeadlineExceeded(
        f"no answer within {timeout_s:g} s; connection abandoned", connections_cut=cut
    )


def _hold_connection(conn: Conn) -> None:
    """Register `conn` with this thread's round trip (if any), by a duplicate of
    its socket: shutting that down fails libpq's blocked call, and the duplicate
    keeps the socket from being reused under us should libpq close its own fd."""
    trip = current_round_trip()
    if trip is None:
        return
    if trip.cut_done:
        raise _Cut
    try:
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except (psycopg.Error, OSError):
        return  # already broken: nothing to cut

    def cut() -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    trip.hold(conn, cut, sock.close)


def _let_go_connection(conn: Conn) -> None:
    trip = current_round_trip()
    if trip is not None:
        trip.let_go(conn)


def _check(conn: Conn) -> None:
    """The pool's check on checkout, itself inside the round trip's deadline."""
    _hold_connection(conn)
    try:
        psycopg_pool.ConnectionPool.check_connection(conn)
    except BaseException:
        _let_go_connection(conn)
        raise


# psycopg_pool retries a lost server with exponential backoff (1, 2, 4, 8, 16 s
# ... until reconnect_timeout): after a 20 s outage a slot's next attempt could
# come 16 s after the server is back, and ingest and the leader's load wait for
# it. Retry at most this far apart instead (a refused connect costs little).
RECONNECT_MAX_DELAY_S: Final = 1.0


class ReconnectAttempt(AttemptWithBackoff):
    """The pool's reconnect policy: backoff from 0.5 s, capped at RECONNECT_MAX_DELAY_S."""

    INITIAL_DELAY = 0.5

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_MAX_DELAY_S)


class _Pool(psycopg_pool.ConnectionPool[Conn]):
    """A pool whose checked-out connections belong to the current round trip, and
    that retries a lost server at most RECONNECT_MAX_DELAY_S apart."""

    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        if attempt is None:
            attempt = ReconnectAttempt(timeout=self.reconnect_timeout)
        super()._add_connection(attempt, growing)

    def getconn(self, timeout: float | None = None) -> Conn:
        trip = current_round_trip()
        if trip is not None and trip.cut_done:
            raise _Cut
        conn = super().getconn(timeout)
        try:
            _hold_connection(conn)
        except _Cut:
            super().putconn(conn)  # cut while waiting for it: give it back unused
            raise
        return conn

    def putconn(self, conn: Conn) -> None:
        _let_go_connection(conn)
        super().putconn(conn)


@dataclass(frozen=True, slots=True)
class RejectedRecord:
    received_at: dt.datetime
    subject: str
    reason: str
    detail: str
    body: bytes  # already cut to the configured cap
    body_length: int  # the full length as received
    stream_seq: int | None


@dataclass(frozen=True, slots=True)
class WriteResult:
    inserted: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class SchemaInfo:
    hypertable: bool
    dedup_index: bool
    exact_duplicates_removed: int
    conflicting_keys: int


class Storage:
    """A connection pool and the statements the daemon runs. All methods are async
    and run psycopg in a worker thread; errors come out as `DatabaseError`."""

    def __init__(
        self,
        pool: psycopg_pool.ConnectionPool[Conn],
        *,
        write_timeout_s: float = WRITE_TIMEOUT_S,
        migrate_timeout_s: float = MIGRATE_TIMEOUT_S,
    ) -> None:
        self._pool = pool
        self._dedup_index = True
        self._write_timeout_s = write_timeout_s
        self._migrate_timeout_s = migrate_timeout_s

    # ---- lifecycle -------------------------------------------------------

    @classmethod
    def create(
        cls,
        conninfo: str,
        *,
        min_size: int,
        max_size: int,
        write_timeout_s: float = WRITE_TIMEOUT_S,
        migrate_timeout_s: float = MIGRATE_TIMEOUT_S,
    ) -> Storage:
        """`write_timeout_s` is the deadline of every round trip but migrations."""
        pool = _Pool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            open=False,
            # statement_timeout as a startup option, not a statement: a new
            # connection makes no round trip outside a deadline (README:
            # Failure handling); the server still ends a runaway statement.
            kwargs={"autocommit": False, "options": "-c statement_timeout=60s"},
            # A connection broken by a database restart is found and replaced on
            # checkout; the check runs inside the round trip's deadline.
            check=_check,
            name="notip-trio",
        )
        return cls(pool, write_timeout_s=write_timeout_s, migrate_timeout_s=migrate_timeout_s)

    async def open(self, *, timeout_s: float) -> None:
        """Open the pool and wait until one connection works, or raise DatabaseError."""
        try:
            await trio.to_thread.run_sync(lambda: self._pool.open(wait=True, timeout=timeout_s))
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL: {exc}") from None

    async def close(self) -> None:
        await trio.to_thread.run_sync(lambda: self._pool.close(timeout=5.0))

    # ---- statements ------------------------------------------------------

    async def migrate(self) -> SchemaInfo:
        return await self._run(self._migrate_sync, timeout_s=self._migrate_timeout_s)

    async def ping(self, *, timeout_s: float = 2.0) -> None:
        def _ping() -> None:
            with self._pool.connection(timeout=timeout_s) as conn:
                conn.execute("SELECT 1")

        await self._run(_ping, timeout_s=timeout_s)

    async def write_batch(
        self, rows: Sequence[Row], rejected: Sequence[RejectedRecord]
    ) -> WriteResult:
        """Write good rows and rejected records in one transaction."""
        return await self._run(lambda: self._write_sync(rows, rejected))

    async def run_in_transaction(self, fn: Callable[[livestate.Conn], T]) -> T:
        """`fn(conn)` in a worker thread, inside one transaction on a pooled connection."""

        def run() -> T:
            with self._pool.connection(timeout=5.0) as conn, conn.transaction():
                return fn(conn)

        return await self._run(run)

    # ---- sync internals (worker thread) ---------------------------------

    async def _run(self, fn: Callable[[], T], *, timeout_s: float | None = None) -> T:
        """`fn()` in a worker thread under a deadline (the write timeout unless
        given); every error comes out as `DatabaseError`."""
        timeout_s = self._write_timeout_s if timeout_s is None else timeout_s
        try:
            return await bounded(fn, timeout_s)
        except DeadlineExceeded as exc:
            if exc.connections_cut:
                # The path that swallowed this round trip likely holds the idle
                # connections too: replace them all rather than time out on each.
                # (Not when it only waited for a free connection: a busy pool.)
                await trio.to_thread.run_sync(self._pool.drain, abandon_on_cancel=True)
            raise
        except (psycopg.Error, psycopg_pool.PoolTimeout, _Cut) as exc:
            raise DatabaseError(f"{type(exc).__name__}: {exc}".strip()) from None

    def _write_sync(self, rows: Sequence[Row], rejected: Sequence[RejectedRecord]) -> WriteResult:
        with self._pool.connection(timeout=5.0) as conn:
            if self._dedup_index and rows:
                # Fast path: COPY straight into the table. A redelivered row makes the
                # unique index refuse the whole COPY; then redo the batch through the
                # staging table, which skips the rows already there.
                try:
                    with conn.transaction():
                        self._copy(conn, _COPY_DIRECT, rows)
                        self._insert_rejected(conn, rejected)
                    return WriteResult(inserted=len(rows), duplicates=0)
                except psycopg.errors.UniqueViolation:
                    pass
            with conn.transaction():
                inserted = 0
                if rows:
                    conn.execute(_STAGE)  # once per connection; later a no-op
                    self._copy(conn, _COPY_STAGE, rows)
                    cur = conn.execute(
                        _MERGE_ON_CONFLICT if self._dedup_index else _MERGE_NOT_EXISTS
                    )
                    inserted = max(cur.rowcount, 0)
                self._insert_rejected(conn, rejected)
        return WriteResult(inserted=inserted, duplicates=len(rows) - inserted)

    @staticmethod
    def _copy(conn: Conn, stmt: str, rows: Sequence[Row]) -> None:
        with conn.cursor().copy(stmt) as copy:
            copy.set_types(_COPY_TYPES)
            for row in rows:
                copy.write_row(row)

    @staticmethod
    def _insert_rejected(
        conn: Conn, rejected: Sequence[RejectedRecord]
    ) -> None:
        if not rejected:
            return
        conn.cursor().executemany(
            _INSERT_REJECTED,
            [
                (r.received_at, r.subject, r.reason, r.detail, r.body, r.body_length, r.stream_seq)
                for r in rejected
            ],
        )

    def _migrate_sync(self) -> SchemaInfo:
        with self._pool.connection(timeout=10.0) as conn:
            conn.autocommit = True
            try:
                return self._migrate_locked(conn)
            finally:
                conn.autocommit = False

    def _migrate_locked(self, conn: Conn) -> SchemaInfo:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            # Before any DDL: with an unpreloaded extension, DDL alone ends the connection.
            hypertable = decide_timescaledb(conn) is TimescalePlan.HYPERTABLE
            conn.execute(_SCHEMA)
            conn.execute(livestate.SCHEMA)
            if hypertable:
                _make_hypertable(conn)
            conn.execute(_INDEX)
            removed, conflicts = 0, 0
            try:
                conn.execute(_DEDUP)
            except psycopg.errors.UniqueViolation:
                cur = conn.execute(_DELETE_EXACT_DUPLICATES)
                removed = max(cur.rowcount, 0)
                log.warning("exact_duplicates_removed", rows=removed)
                try:
                    conn.execute(_DEDUP)
                except psycopg.errors.UniqueViolation:
                    row = conn.execute(_COUNT_KEY_CONFLICTS).fetchone()
                    conflicts = int(row[0]) if row else 0
            self._dedup_index = conflicts == 0
            if not self._dedup_index:
                log.warning(
                    "dedup_index_unavailable",
                    conflicting_keys=conflicts,
                    detail=(
                        "telemetry holds differing rows under one (tenant_id, gateway_id, "
                        "sensor_id, time); they are kept and redelivery dedup falls back to "
                        "a slower NOT EXISTS check (README: Deduplication)"
                    ),
                )
            return SchemaInfo(hypertable, self._dedup_index, removed, conflicts)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))


# ---- TimescaleDB: use it only where it can work -------------------------------
#
# With the timescaledb package installed but not in `shared_preload_libraries`,
# `CREATE EXTENSION timescaledb` (and any later use of an existing extension) ends
# the connection with a FATAL ("extension must be preloaded"): the client sees only
# "the connection is lost". So look first, then decide (`timescaledb_plan`).

PRELOAD_SETTING: Final = "shared_preload_libraries = 'timescaledb'"

# `shared_preload_libraries` is readable only by superusers and pg_read_all_settings,
# which the application role usually is not. The TimescaleDB loader, once preloaded,
# defines `timescaledb.disable_load` in every backend: that any role can see.
_TIMESCALEDB_PROBE: Final = """
SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),
       EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'),
       current_setting('timescaledb.disable_load', true) IS NOT NULL,
       CASE WHEN pg_has_role('pg_read_all_settings', 'USAGE')
            THEN current_setting('shared_preload_libraries') END
"""


@dataclass(frozen=True, slots=True)
class TimescaleProbe:
    """What the server says about TimescaleDB, before anything touches it."""

    available: bool  # the package is installed (pg_available_extensions)
    created: bool  # CREATE EXTENSION already ran in this database
    loader_running: bool  # the preloaded loader defined timescaledb.disable_load
    preload: str | None  # shared_preload_libraries, if this role may read it


class TimescalePlan(enum.Enum):
    HYPERTABLE = "timescaledb hypertable"
    PLAIN = "plain PostgreSQL"  # no TimescaleDB on the server
    PLAIN_NOT_PRELOADED = "plain PostgreSQL, timescaledb not preloaded"  # warn, run
    STOP_NOT_PRELOADED = "timescaledb created but not preloaded"  # cannot run


def preloads_timescaledb(preload: str) -> bool:
    """True if a `shared_preload_libraries` value lists the timescaledb loader.

    Entries are comma-separated, may be quoted and may be paths
    (`'$libdir/timescaledb'`) or carry the library suffix.
    """
    for entry in preload.split(","):
        name = entry.strip().strip('"').rsplit("/", 1)[-1]
        name = name.removesuffix(".so").removesuffix(".dll").removesuffix(".dylib")
        if name == "timescaledb":
            return True
    return False


def timescaledb_plan(probe: TimescaleProbe) -> TimescalePlan:
    """Hypertable only where TimescaleDB is installed *and* preloaded.

    Installed but not preloaded: plain PostgreSQL (the table works the same, only
    without chunks); the caller warns with the setting to add. An extension that
    already exists in the database but is not preloaded cannot be run around: every
    use of it (its DDL event triggers included) ends the connection, so stop.
    """
    preloaded = probe.loader_running or (
        probe.preload is not None and preloads_timescaledb(probe.preload)
    )
    if preloaded and (probe.available or probe.created):
        return TimescalePlan.HYPERTABLE
    if probe.created:
        return TimescalePlan.STOP_NOT_PRELOADED
    if probe.available:
        return TimescalePlan.PLAIN_NOT_PRELOADED
    return TimescalePlan.PLAIN


def probe_timescaledb(conn: psycopg.Connection[tuple[object, ...]]) -> TimescaleProbe:
    row = conn.execute(_TIMESCALEDB_PROBE).fetchone()
    assert row is not None  # a SELECT without FROM always returns its row
    available, created, loader_running, preload = row
    return TimescaleProbe(
        available=bool(available),
        created=bool(created),
        loader_running=bool(loader_running),
        preload=None if preload is None else str(preload),
    )


def decide_timescaledb(conn: psycopg.Connection[tuple[object, ...]]) -> TimescalePlan:
    """Probe and decide; warn or raise for the two not-preloaded cases."""
    plan = timescaledb_plan(probe_timescaledb(conn))
    if plan is TimescalePlan.PLAIN_NOT_PRELOADED:
        log.warning(
            "timescaledb_not_preloaded",
            storage=TimescalePlan.PLAIN.value,
            detail=(
                "the timescaledb extension is installed but the server does not preload it, "
                f"so telemetry stays a plain table; add {PRELOAD_SETTING} to postgresql.conf "
                "and restart PostgreSQL to get a hypertable at the next start (README: TimescaleDB)"
            ),
        )
    elif plan is TimescalePlan.STOP_NOT_PRELOADED:
        raise DatabaseError(
            "the timescaledb extension exists in this database but the server does not "
            f"preload it, so any use of it ends the connection: add {PRELOAD_SETTING} "
            "to postgresql.conf and restart PostgreSQL"
        )
    return plan


def _make_hypertable(conn: Conn) -> None:
    conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    conn.execute(
        sql.SQL(
            "SELECT create_hypertable('telemetry', 'time', chunk_time_interval => INTERVAL '1 day',"
            " if_not_exists => TRUE, migrate_data => TRUE)"
        )
    )
