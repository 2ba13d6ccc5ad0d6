"""The daemon's database: `Storage`, the pool plus the migration and the COPY writer.

Effectively once: a unique index on (tenant_id, gateway_id, sensor_id, time)
(schema.py) and `INSERT ... SELECT FROM <staging> ON CONFLICT DO NOTHING` after
a COPY into a temporary staging table, so a redelivered message never makes a
second row. A batch without redeliveries goes the fast way: COPY straight into
the table.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import psycopg

from ..envelope import Row
from .lifecycle import Lifecycle
from .pool import Conn, Database
from .schema import COLUMNS, SchemaInfo, migrate

_COPY_TYPES: Final = ("timestamptz", "text", "text", "text", "text", "text", "text", "text", "int4")
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
# On a hypertable with compression: rows already stored, and repeats within the
# batch, are left out before the insert, so ON CONFLICT only settles races with
# another replica. TimescaleDB 2.17.2 was reported to end an INSERT ... ON CONFLICT
# DO NOTHING into compressed chunks at its first conflict, dropping the rows after
# it (timescale/timescaledb#7672, fixed by #7673); with the conflicts filtered out,
# that path is not taken.
_MERGE_GUARDED: Final = _MERGE_NOT_EXISTS + "ON CONFLICT DO NOTHING\n"
_INSERT_REJECTED: Final = """
INSERT INTO telemetry_rejected (received_at, subject, reason, detail, body, body_length, stream_seq)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (stream_seq) DO NOTHING
"""


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


class Storage(Database):
    """The pool (`Database`) plus the start-up migration and the batched writer."""

    # What the start-up migration found (schema.migrate): False when the unique
    # index was impossible; True when compression is on (lifecycle.py: guard the merge).
    _dedup_index: bool = True
    _compression: bool = False

    async def migrate(self, lifecycle: Lifecycle | None = None) -> SchemaInfo:
        """The start-up migration (schema.migrate); with `lifecycle`, the
        compression and retention policies too."""
        return await self._run(
            lambda: self._migrate_sync(lifecycle), timeout_s=self._migrate_timeout_s
        )

    async def write_batch(
        self, rows: Sequence[Row], rejected: Sequence[RejectedRecord]
    ) -> WriteResult:
        """Write good rows and rejected records in one transaction."""
        return await self._run(lambda: self._write_sync(rows, rejected))

    # ---- sync internals (worker thread) ---------------------------------

    def _migrate_sync(self, lifecycle: Lifecycle | None) -> SchemaInfo:
        with self._pool.connection(timeout=10.0) as conn:
            conn.autocommit = True
            try:
                info = migrate(conn, lifecycle)
                self._dedup_index = info.dedup_index
                self._compression = info.compression
                return info
            finally:
                conn.autocommit = False

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
                    cur = conn.execute(self._merge())
                    inserted = max(cur.rowcount, 0)
                self._insert_rejected(conn, rejected)
        return WriteResult(inserted=inserted, duplicates=len(rows) - inserted)

    def _merge(self) -> str:
        if not self._dedup_index:
            return _MERGE_NOT_EXISTS
        return _MERGE_GUARDED if self._compression else _MERGE_ON_CONFLICT

    @staticmethod
    def _copy(conn: Conn, stmt: str, rows: Sequence[Row]) -> None:
        with conn.cursor().copy(stmt) as copy:
            copy.set_types(_COPY_TYPES)
            for row in rows:
                copy.write_row(row)

    @staticmethod
    def _insert_rejected(conn: Conn, rejected: Sequence[RejectedRecord]) -> None:
        if not rejected:
            return
        conn.cursor().executemany(
            _INSERT_REJECTED,
            [
                (r.received_at, r.subject, r.reason, r.detail, r.body, r.body_length, r.stream_seq)
                for r in rejected
            ],
        )
