"""The telemetry lifecycle on TimescaleDB: compression ratio, one gateway's
last-day query before and after compression, and the cost of the policies at
start. Needs a PostgreSQL with TimescaleDB installed and preloaded; it is not
part of `scripts/bench` (whose servers have no TimescaleDB).

    python -m benchmarks.lifecycle --dsn 'host=... dbname=scratch user=...' \\
        [--gateways 50] [--sensors 4] [--days 8] [--interval-s 60]

The database must be a scratch one: `telemetry` is dropped and recreated. Rows
are realistic envelopes: every sensor of every gateway reports every
`interval-s` seconds; `encrypted_data` is random bytes (AES-GCM ciphertext of
a small reading, 24-64 bytes) in base64, `iv` 12 and `auth_tag` 16 random bytes
in base64: the blobs do not compress, times and keys do. Prints one JSON object:

- rows, bytes before and after compressing every chunk but the newest, ratio;
- the query time (median of 5, warm) of one gateway's last day, `SELECT *`
  ordered by time, before and after compression;
- the migration with TELEMETRY_COMPRESS_AFTER / TELEMETRY_RETENTION set: the
  first start (policies added), a second start (nothing to do), a changed value
  (one policy replaced).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg

from notip_trio.db.lifecycle import Lifecycle
from notip_trio.db.schema import COLUMNS, migrate
from notip_trio.envelope import Row

_COPY = f"COPY telemetry ({', '.join(COLUMNS)}) FROM STDIN (FORMAT BINARY)"
_TYPES = ("timestamptz", "text", "text", "text", "text", "text", "text", "text", "int4")
_SIZE = "SELECT hypertable_size('telemetry')"
_LAST_DAY = """
SELECT * FROM telemetry
 WHERE tenant_id = %s AND gateway_id = %s AND time > %s - INTERVAL '1 day' AND time <= %s
 ORDER BY time DESC
"""


def _b64(n: int) -> str:
    return base64.b64encode(os.urandom(n)).decode()


def envelopes(
    gateways: int, sensors: int, days: int, interval_s: int, end: dt.datetime
) -> Iterator[Row]:
    start = end - dt.timedelta(days=days)
    steps = days * 86400 // interval_s
    sizes = (24, 32, 48, 64)
    for step in range(steps):
        at = start + dt.timedelta(seconds=step * interval_s)
        for g in range(gateways):
            tenant = f"tenant-{g % 10:02d}"
            gateway = f"gw-{g:05d}"
            for s in range(sensors):
                yield Row(
                    at,
                    tenant,
                    gateway,
                    f"{gateway}-s{s}",
                    ("temperature", "humidity", "pressure", "co2")[s % 4],
                    _b64(sizes[(g + s) % len(sizes)]),
                    _b64(12),
                    _b64(16),
                    1,
                )


def _timed(conn: psycopg.Connection[Any], sql: str, params: tuple[object, ...]) -> float:
    runs = []
    for _ in range(6):
        t0 = time.perf_counter()
        conn.execute(sql, params).fetchall()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs[1:]) * 1000  # the first one warms the cache


def run(args: argparse.Namespace) -> dict[str, Any]:
    end = dt.datetime.now(dt.UTC).replace(microsecond=0)
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS telemetry, telemetry_policies CASCADE")
        info = migrate(conn)
        if not info.hypertable:
            raise SystemExit("this server has no usable TimescaleDB: telemetry is a plain table")
        t0 = time.perf_counter()
        rows = 0
        with conn.cursor().copy(_COPY) as copy:
            copy.set_types(_TYPES)
            for row in envelopes(args.gateways, args.sensors, args.days, args.interval_s, end):
                copy.write_row(row)
                rows += 1
        load_s = time.perf_counter() - t0
        conn.execute("ANALYZE telemetry")
        before = int(conn.execute(_SIZE).fetchone()[0])  # type: ignore[index]
        probe = ("tenant-07", "gw-00007", end, end)
        query_before = _timed(conn, _LAST_DAY, probe)

        # The first start with the lifecycle settings: compression enabled, policies added.
        wanted = Lifecycle(args.compress_after_h, args.retention_h)
        t0 = time.perf_counter()
        migrate(conn, wanted)
        first_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        migrate(conn, wanted)
        second_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        migrate(conn, Lifecycle(args.compress_after_h + 24, args.retention_h))
        changed_start = time.perf_counter() - t0

        # Compress every chunk (what the policy does over time), then measure again.
        t0 = time.perf_counter()
        conn.execute(
            "SELECT compress_chunk(c, if_not_compressed => true) FROM show_chunks('telemetry') c"
        )
        compress_s = time.perf_counter() - t0
        conn.execute("ANALYZE telemetry")
        after = int(conn.execute(_SIZE).fetchone()[0])  # type: ignore[index]
        query_after = _timed(conn, _LAST_DAY, probe)
        version = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        ).fetchone()
    return {
        "timescaledb": None if version is None else version[0],
        "rows": rows,
        "load_s": round(load_s, 1),
        "bytes_before": before,
        "bytes_after": after,
        "ratio": round(before / after, 2) if after else None,
        "compress_all_s": round(compress_s, 1),
        "last_day_one_gateway_ms_before": round(query_before, 2),
        "last_day_one_gateway_ms_after": round(query_after, 2),
        "start_first_ms": round(first_start * 1000, 1),
        "start_again_ms": round(second_start * 1000, 1),
        "start_changed_ms": round(changed_start * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lifecycle", description=__doc__)
    parser.add_argument("--dsn", required=True, help="libpq DSN of a scratch database")
    parser.add_argument("--gateways", type=int, default=50)
    parser.add_argument("--sensors", type=int, default=4)
    parser.add_argument("--days", type=int, default=8)
    parser.add_argument("--interval-s", type=int, default=60)
    parser.add_argument("--compress-after-h", type=int, default=7 * 24)
    parser.add_argument("--retention-h", type=int, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
