"""The replay rate: `python -m benchmarks.replay [--messages N]` (not part of `scripts/bench`).

Starts its own PostgreSQL (fsync on) and mTLS nats-server (`benchmarks.stack`),
publishes N envelopes from the benchmark fleet into TELEMETRY, then runs
`python -m notip_trio replay --from-seq 1` as a process three times on one
database:

1. into an empty `telemetry` (every row new: the restore case),
2. again (every row already stored: a window replayed twice),
3. after deleting every other row (half new, half already stored).

Prints each run's messages/s (the command's own summary: from its start,
connections and migration included, to the last commit) and wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.common import make_message_file
from benchmarks.stack import Stack
from devstack.proc import PROJECT_ROOT, child_env

RUNS = (
    ("empty table (all new)", None),
    ("all rows already stored", None),
    # The fleet's times step by one microsecond: every other row goes.
    (
        "half already stored",
        "DELETE FROM telemetry WHERE extract(microseconds FROM time)::bigint % 2 = 0",
    ),
)


def _replay(env: dict[str, str]) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "notip_trio", "replay", "--from-seq", "1"],
        env=child_env(env),
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"replay exited {done.returncode}: {done.stderr.strip()}")
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary, wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replay", description=__doc__)
    p.add_argument("--messages", type=int, default=200_000, help="envelopes (200000)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="notip-bench-replay-"))
    messages = make_message_file(work / "messages.txt", args.messages)
    stack = Stack.start(work)
    results = []
    try:
        with stack.nats(messages) as server, stack.database() as dbname:
            env = stack.env(server, dbname)
            conninfo = stack.admin_conninfo(dbname)
            for label, before in RUNS:
                if before is not None:
                    with psycopg.connect(conninfo, autocommit=True) as conn:
                        conn.execute(before)
                        conn.execute("VACUUM ANALYZE telemetry")
                summary, wall = _replay(env)
                row = {
                    "run": label,
                    "messages": summary["messages"],
                    "new": summary["new"],
                    "already_stored": summary["already_stored"],
                    "messages_per_s": summary["messages_per_s"],
                    "seconds": summary["seconds"],
                    "wall_seconds": round(wall, 2),
                }
                results.append(row)
                print(
                    f"{label:<26} {row['messages']:>8} msgs  new {row['new']:>8}  "
                    f"already {row['already_stored']:>8}  {row['messages_per_s']:>7} msgs/s  "
                    f"({row['seconds']:.1f} s; process {row['wall_seconds']:.1f} s)",
                    flush=True,
                )
    finally:
        stack.close()
    print(json.dumps({"replay": results, "postgres": "fsync on"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
