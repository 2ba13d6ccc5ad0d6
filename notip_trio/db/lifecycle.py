"""The telemetry lifecycle on TimescaleDB: compression and retention policies.

TELEMETRY_COMPRESS_AFTER and TELEMETRY_RETENTION (config.py) are applied by the
start-up migration when `telemetry` is a hypertable (schema.migrate): it reads
what the database has (`read_facts`), decides what to add, replace or remove
(`plan_lifecycle`, pure) and does it (`apply_plan`). `notip-trio check` reads
the same facts and reports the same plan, so check and daemon agree.

- Compression: segment by (tenant_id, gateway_id), order by (time DESC,
  sensor_id). Every column of the dedup key is in one of the two lists, so a
  late or replayed row that lands in a compressed chunk makes TimescaleDB
  decompress only the batches of its gateway and time range to check the key.
  Needs TimescaleDB 2.11 or later (unique indexes on compressed chunks); older
  versions refuse any insert with ON CONFLICT there, so the migration leaves
  compression off and says why. Compression once enabled stays enabled (turning
  it off would mean decompressing every chunk); compression settings made by
  someone else are left as they are.
- Policies: one compression and one retention policy per hypertable
  (timescaledb_information.jobs). A setting that differs from the policy
  replaces it; `off` removes only a policy the daemon made itself (recorded in
  `telemetry_policies` with its job id); one made by hand stays.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

from ..log import get_logger
from .pool import Conn

if TYPE_CHECKING:
    from ..config import Settings

log = get_logger(__name__)

SEGMENTBY: Final = ("tenant_id", "gateway_id")
ORDERBY: Final = ("time DESC", "sensor_id")
#: Unique indexes on compressed chunks (INSERT ... ON CONFLICT there) came in 2.11.0.
MIN_COMPRESSION_VERSION: Final = (2, 11, 0)
#: Where the daemon records the policies it made (job ids), so `off` removes only those.
POLICY_TABLE: Final = "telemetry_policies"
COMPRESSION: Final = "compression"
RETENTION: Final = "retention"

_POLICY_TABLE_DDL: Final = f"""
CREATE TABLE IF NOT EXISTS {POLICY_TABLE} (
    policy  TEXT        PRIMARY KEY CHECK (policy IN ('{COMPRESSION}', '{RETENTION}')),
    job_id  INTEGER     NOT NULL,
    set_at  TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """What the settings ask for, in hours; None: off."""

    compress_after_h: int | None
    retention_h: int | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Lifecycle:
        return cls(settings.telemetry_compress_after_h, settings.telemetry_retention_h)


@dataclass(frozen=True, slots=True)
class Policy:
    job_id: int
    after_s: float | None  # compress_after / drop_after; None: not an interval
    ours: bool  # recorded in telemetry_policies under this job id


@dataclass(frozen=True, slots=True)
class LifecycleFacts:
    """What a hypertable `telemetry` has, as timescaledb_information reports it."""

    version: str  # the installed extension, e.g. "2.13.0"
    chunk_interval_s: float | None
    compression_enabled: bool
    segmentby: tuple[str, ...] = ()
    orderby: tuple[str, ...] = ()  # "time DESC", "sensor_id" (ASC left out)
    compression_policy: Policy | None = None
    retention_policy: Policy | None = None


class Op(enum.Enum):
    ENABLE_COMPRESSION = "enable compression"
    REMOVE_COMPRESSION_POLICY = "remove the compression policy"
    ADD_COMPRESSION_POLICY = "add a compression policy"
    REMOVE_RETENTION_POLICY = "remove the retention policy"
    ADD_RETENTION_POLICY = "add a retention policy"


@dataclass(frozen=True, slots=True)
class Step:
    op: Op
    after_h: int | None = None  # for the ADD steps

    def describe(self) -> str:
        if self.after_h is None:
            return self.op.value
        return f"{self.op.value} after {describe_hours(self.after_h)}"


@dataclass(frozen=True, slots=True)
class LifecyclePlan:
    steps: tuple[Step, ...]
    notes: tuple[str, ...]  # what stays different from the settings, and why


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("-")[0].split("."):
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def describe_hours(hours: int) -> str:
    if hours % (7 * 24) == 0:
        n, unit = hours // (7 * 24), "week"
    elif hours % 24 == 0:
        n, unit = hours // 24, "day"
    else:
        n, unit = hours, "hour"
    return f"{n} {unit}{'s' if n != 1 else ''}"


def describe_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "a non-interval setting"
    if seconds % 3600 == 0:
        return describe_hours(int(seconds // 3600))
    return f"{seconds:g} s"


def plan_lifecycle(facts: LifecycleFacts, wanted: Lifecycle) -> LifecyclePlan:
    """What to add, replace or remove so that the database matches `wanted`.

    Pure. A replaced policy is a remove then an add (TimescaleDB keeps one of
    each kind per hypertable).
    """
    steps: list[Step] = []
    notes: list[str] = []
    can_compress = version_tuple(facts.version) >= MIN_COMPRESSION_VERSION
    if wanted.compress_after_h is not None and not can_compress:
        need = ".".join(map(str, MIN_COMPRESSION_VERSION))
        notes.append(
            f"TELEMETRY_COMPRESS_AFTER needs TimescaleDB {need} or later (the dedup key on "
            f"compressed chunks); {facts.version} keeps telemetry uncompressed"
        )
    elif wanted.compress_after_h is not None:
        if not facts.compression_enabled:
            steps.append(Step(Op.ENABLE_COMPRESSION))
        elif (facts.segmentby, facts.orderby) != (SEGMENTBY, ORDERBY):
            notes.append(
                "compression was enabled with segment by "
                f"({', '.join(facts.segmentby) or 'nothing'}) and order by "
                f"({', '.join(facts.orderby) or 'nothing'}), not ({', '.join(SEGMENTBY)}) and "
                f"({', '.join(ORDERBY)}); left as it is"
            )
    steps += _policy_steps(
        facts.compression_policy,
        wanted.compress_after_h if can_compress else None,
        Op.REMOVE_COMPRESSION_POLICY,
        Op.ADD_COMPRESSION_POLICY,
        "compression",
        notes,
    )
    steps += _policy_steps(
        facts.retention_policy,
        wanted.retention_h,
        Op.REMOVE_RETENTION_POLICY,
        Op.ADD_RETENTION_POLICY,
        "retention",
        notes,
    )
    return LifecyclePlan(tuple(steps), tuple(notes))


def _policy_steps(
    current: Policy | None,
    wanted_h: int | None,
    remove: Op,
    add: Op,
    kind: str,
    notes: list[str],
) -> list[Step]:
    if wanted_h is None:
        if current is None:
            return []
        if current.ours:
            return [Step(remove)]
        notes.append(
            f"a {kind} policy made outside notip-trio (job {current.job_id}, after "
            f"{describe_seconds(current.after_s)}) is left alone"
        )
        return []
    if current is None:
        return [Step(add, wanted_h)]
    if current.after_s == wanted_h * 3600:
        return []
    return [Step(remove), Step(add, wanted_h)]


# ---- the database (worker thread; autocommit connection) ----------------------

_VERSION: Final = "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
_HYPERTABLE: Final = """
SELECT h.compression_enabled,
       (SELECT extract(epoch FROM d.time_interval)::float8
          FROM timescaledb_information.dimensions d
         WHERE d.hypertable_schema = h.hypertable_schema
           AND d.hypertable_name = h.hypertable_name AND d.column_name = 'time')
  FROM timescaledb_information.hypertables h
 WHERE h.hypertable_schema = current_schema() AND h.hypertable_name = 'telemetry'
"""
# The pre-2.14 view; kept by later releases for compatibility.
_COMPRESSION_SETTINGS: Final = """
SELECT attname::text, segmentby_column_index, orderby_column_index, orderby_asc
  FROM timescaledb_information.compression_settings
 WHERE hypertable_schema = current_schema() AND hypertable_name = 'telemetry'
"""
_JOBS: Final = """
SELECT job_id, proc_name::text,
       extract(epoch FROM (config ->> 'compress_after')::interval)::float8,
       extract(epoch FROM (config ->> 'drop_after')::interval)::float8
  FROM timescaledb_information.jobs
 WHERE hypertable_schema = current_schema() AND hypertable_name = 'telemetry'
   AND proc_name IN ('policy_compression', 'policy_retention')
 ORDER BY job_id
"""


def read_facts(conn: Conn) -> LifecycleFacts | None:
    """The lifecycle facts of a hypertable `telemetry`; None if it is not one.

    Read-only; `telemetry_policies` may not exist yet (a check before the
    first start): then no policy is ours.
    """
    row = conn.execute(_VERSION).fetchone()
    if row is None:
        return None
    version = str(row[0])
    row = conn.execute(_HYPERTABLE).fetchone()
    if row is None:
        return None
    compression_enabled = bool(row[0])
    chunk_interval_s = _float(row[1])
    segment: list[tuple[int, str]] = []
    order: list[tuple[int, str]] = []
    for attname, seg_index, ord_index, asc in conn.execute(_COMPRESSION_SETTINGS).fetchall():
        if seg_index is not None:
            segment.append((_int(seg_index), str(attname)))
        if ord_index is not None:
            order.append((_int(ord_index), str(attname) if asc else f"{attname} DESC"))
    ours: dict[str, int] = {}
    found = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (POLICY_TABLE,)).fetchone()
    if found and found[0]:
        rows = conn.execute(f"SELECT policy, job_id FROM {POLICY_TABLE}").fetchall()
        ours = {str(p): _int(j) for p, j in rows}
    compression: Policy | None = None
    retention: Policy | None = None
    for job_id, proc, compress_after, drop_after in conn.execute(_JOBS).fetchall():
        if proc == "policy_compression" and compression is None:
            compression = Policy(
                _int(job_id), _float(compress_after), ours.get(COMPRESSION) == job_id
            )
        elif proc == "policy_retention" and retention is None:
            retention = Policy(_int(job_id), _float(drop_after), ours.get(RETENTION) == job_id)
    return LifecycleFacts(
        version=version,
        chunk_interval_s=chunk_interval_s,
        compression_enabled=compression_enabled,
        segmentby=tuple(name for _, name in sorted(segment)),
        orderby=tuple(name for _, name in sorted(order)),
        compression_policy=compression,
        retention_policy=retention,
    )


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value


def _float(value: object) -> float | None:
    return None if value is None else float(cast(float, value))


def apply_plan(conn: Conn, plan: LifecyclePlan) -> None:
    """Carry out `plan`'s steps in order (under the migration's lock)."""
    for step in plan.steps:
        if step.op is Op.ENABLE_COMPRESSION:
            conn.execute(
                "ALTER TABLE telemetry SET (timescaledb.compress,"
                f" timescaledb.compress_segmentby = '{', '.join(SEGMENTBY)}',"
                f" timescaledb.compress_orderby = '{', '.join(ORDERBY)}')"
            )
        elif step.op is Op.REMOVE_COMPRESSION_POLICY:
            conn.execute("SELECT remove_compression_policy('telemetry', if_exists => true)")
            conn.execute(f"DELETE FROM {POLICY_TABLE} WHERE policy = %s", (COMPRESSION,))
        elif step.op is Op.ADD_COMPRESSION_POLICY:
            _record(
                conn,
                COMPRESSION,
                "SELECT add_compression_policy('telemetry', compress_after => %s::interval)",
                step,
            )
        elif step.op is Op.REMOVE_RETENTION_POLICY:
            conn.execute("SELECT remove_retention_policy('telemetry', if_exists => true)")
            conn.execute(f"DELETE FROM {POLICY_TABLE} WHERE policy = %s", (RETENTION,))
        elif step.op is Op.ADD_RETENTION_POLICY:
            _record(
                conn,
                RETENTION,
                "SELECT add_retention_policy('telemetry', drop_after => %s::interval)",
                step,
            )


def _record(conn: Conn, policy: str, add_sql: str, step: Step) -> None:
    assert step.after_h is not None
    row = conn.execute(add_sql, (dt.timedelta(hours=step.after_h),)).fetchone()
    assert row is not None  # add_*_policy returns the job id
    conn.execute(
        f"INSERT INTO {POLICY_TABLE} (policy, job_id) VALUES (%s, %s)"
        " ON CONFLICT (policy) DO UPDATE SET job_id = excluded.job_id, set_at = now()",
        (policy, _int(row[0])),
    )


def migrate_lifecycle(conn: Conn, wanted: Lifecycle) -> bool:
    """Bring a hypertable's policies in line with `wanted`; True if compression
    is enabled afterwards (the writer then guards its merge, writer.py).

    A failing step is logged (`telemetry_lifecycle_failed`) and does not stop
    the daemon: telemetry is still stored, and `notip-trio check` shows what
    differs.
    """
    import psycopg

    conn.execute(_POLICY_TABLE_DDL)
    facts = read_facts(conn)
    if facts is None:  # not a hypertable after all
        return False
    plan = plan_lifecycle(facts, wanted)
    try:
        apply_plan(conn, plan)
    except psycopg.Error as exc:
        log.warning(
            "telemetry_lifecycle_failed",
            steps=[s.describe() for s in plan.steps],
            error=" ".join(str(exc).split()),
            detail="telemetry is stored as before; notip-trio check shows what differs",
        )
    else:
        if plan.steps:
            log.info("telemetry_lifecycle", steps=[s.describe() for s in plan.steps])
    for note in plan.notes:
        log.warning("telemetry_lifecycle_differs", detail=note)
    after = read_facts(conn)
    return after is not None and after.compression_enabled


def note_plain(wanted: Lifecycle) -> None:
    """One line at start on plain PostgreSQL: the policies need TimescaleDB.

    A warning when TELEMETRY_RETENTION is set (rows the operator expects dropped
    are kept), information for compression alone (the default).
    """
    if wanted.compress_after_h is None and wanted.retention_h is None:
        return
    detail = (
        "TELEMETRY_COMPRESS_AFTER and TELEMETRY_RETENTION need TimescaleDB; on plain "
        "PostgreSQL telemetry is kept uncompressed and for ever (docs/operations.md: "
        "TimescaleDB)"
    )
    if wanted.retention_h is not None:
        log.warning("telemetry_lifecycle_needs_timescaledb", detail=detail)
    else:
        log.info("telemetry_lifecycle_needs_timescaledb", detail=detail)
