"""Shared pieces of the benchmark (`benchmarks`).

- The message set: `make_message_file` writes N valid envelopes from 1,000
  gateways (10 tenants x 100) to a file, one `subject body` line each, with
  timestamps far in the past (2021) so they never collide with live ones.
  Every measurement replays the same file.
- `publish_file` publishes such a file to a NatsServer (core publishes, the
  TELEMETRY stream captures them) and returns once the stream holds them all
  (`devstack.js.publish`, the toolkit's one publish-and-wait).
- `run_child` runs one measurement in a fresh `python -m ...` process and
  returns the JSON object it prints last: the harness never shares a process
  with the code it measures.

Nothing here imports trio_asyncio or psycopg at module level: the harness
process stays a plain synchronous program.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from devstack import js
from devstack.natsd import NatsServer
from devstack.proc import PROJECT_ROOT, child_env, python_module
from devstack.simulator import make_envelope, make_fleet

TENANTS = 10
GATEWAYS = 1000
BURST_EPOCH = dt.datetime(2021, 1, 1, tzinfo=dt.UTC)
DURABLE = "data-consumer-telemetry"
_MICROSECOND = dt.timedelta(microseconds=1)


class BenchError(RuntimeError):
    """A measurement could not be made (a child failed, a wait timed out)."""


def make_message_file(path: Path, count: int, *, seed: int = 7) -> Path:
    """Write `count` envelopes (round-robin over the fleet) unless the file has them."""
    if path.exists() and sum(1 for _ in path.open("rb")) == count:
        return path
    fleet = make_fleet(TENANTS, GATEWAYS)
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as out:
        for i in range(count):
            gw = fleet[i % len(fleet)]
            sensor_id, sensor_type = gw.sensors[(i // len(fleet)) % len(gw.sensors)]
            body = make_envelope(
                gw.gateway_id, sensor_id, sensor_type, BURST_EPOCH + i * _MICROSECOND, rng=rng
            )
            out.write(gw.subject.encode() + b" " + body + b"\n")
    tmp.replace(path)
    return path


def read_messages(path: Path) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    with path.open("rb") as f:
        for line in f:
            subject, _, body = line.rstrip(b"\n").partition(b" ")
            out.append((subject.decode(), body))
    return out


def publish_file(server: NatsServer, path: Path) -> int:
    """Publish every message of `path`; return once TELEMETRY holds them all."""
    return js.publish(server, read_messages(path), name="gateway-sim", flush_every=5000)


def run_child(
    module: str,
    spec: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 600,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Run `python -m module '<spec json>'`; return the JSON object of its last stdout line."""
    proc = subprocess.run(
        python_module(module, json.dumps(spec)),
        env=child_env(env),
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if log_path is not None:
        log_path.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr, encoding="utf-8")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        raise BenchError(f"{module} {spec.get('mode')} failed ({proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def child_main(argv: Sequence[str], modes: dict[str, Any]) -> int:
    """Entry point of a measurement child: dispatch on spec['mode'], print the result."""
    spec: dict[str, Any] = json.loads(argv[0])
    result = modes[spec["mode"]](spec)
    print(json.dumps(result), flush=True)
    return 0


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
