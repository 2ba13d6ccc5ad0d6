"""The benchmark: `scripts/bench` (or `python -m benchmarks`).

One run starts its own servers (PostgreSQL with fsync on, a fresh mTLS
nats-server per measurement), publishes the same message set from 1,000
gateways for every measurement, and prints one table:

0. N0: the bare thin pull on plain asyncio, no Trio, no bridge (`benchmarks.bare`).
1. Ceiling N: NatsBridge.run_pull + bulk ack, no database (`benchmarks.pull`).
2. Ceiling P: Storage.write_batch (binary COPY), no NATS (`benchmarks.pg`).
3. Baseline G: the Go service's strategy, 100 INSERTs per transaction (`benchmarks.pull`).
4. Naive port: pull_subscribe + fetch + 100 INSERTs (`benchmarks.pull`).
5. The daemon end to end as a subprocess, throughput and latency (`benchmarks.daemon`).
6. Liveness with its state in PostgreSQL: takeover, tick, memory (`benchmarks.liveness`).

plus the two decision benchmarks (`benchmarks.pg` copy-compare, `benchmarks.decode`).
Every measurement runs in a process of its own; this one only orchestrates.
`--quick` uses small counts (a smoke run in under a minute).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.common import make_message_file, run_child
from benchmarks.daemon import run_daemon_bench
from benchmarks.report import render
from benchmarks.stack import Stack, nats_server_version

SECTIONS = ("n0", "n", "p", "g", "naive", "daemon", "liveness", "decisions")
DEFAULT_CONFIG = (1000, 2)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run, < 60 s")
    p.add_argument("--messages", type=int, help="pre-published messages (200000; quick 20000)")
    p.add_argument(
        "--configs",
        help="daemon TELEMETRY_BATCH_SIZE x TELEMETRY_PIPELINE_DEPTH to try, e.g. 1000x2,2000x2 "
        "(the first is the one the ratios use; default 1000x2,2000x2,5000x2,1000x4; quick 1000x2)",
    )
    p.add_argument("--latency-seconds", type=float, help="live publishing time (20; quick 4)")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--profile", action="store_true", help="run the daemon under py-spy (raw)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/notip-bench"),
        help="message file, logs, results JSON",
    )
    p.add_argument("--json", type=Path, help="also write the results here as JSON")
    return p.parse_args(argv)


def _configs(text: str | None, quick: bool) -> list[tuple[int, int]]:
    if not text:
        return [DEFAULT_CONFIG] if quick else [DEFAULT_CONFIG, (2000, 2), (5000, 2), (1000, 4)]
    out = []
    for item in text.split(","):
        batch, _, depth = item.strip().partition("x")
        out.append((int(batch), int(depth or 2)))
    return out


def _versions(stack: Stack) -> dict[str, str]:
    def v(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"

    return {
        "python": platform.python_version(),
        "nats-server": nats_server_version(),
        "PostgreSQL": stack.pg_version(),
        "nats-py": v("nats-py"),
        "psycopg": v("psycopg"),
        "trio": v("trio"),
        "trio-asyncio": v("trio-asyncio"),
        "msgspec": v("msgspec"),
    }


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} / {five:.2f}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    total = args.messages or (20_000 if quick else 200_000)
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    configs = _configs(args.configs, quick)
    latency_s = (
        args.latency_seconds if args.latency_seconds is not None else (4.0 if quick else 20.0)
    )
    workdir: Path = args.workdir.resolve()
    started = time.monotonic()
    results: dict[str, Any] = {"quick": quick, "messages": total, "cores": os.cpu_count()}
    results["load_before"] = _load()
    messages = make_message_file(workdir / f"messages-{total}.txt", total)
    stack = Stack.start(workdir)
    step = _stepper(started)
    try:
        results["versions"] = _versions(stack)
        batch, depth = configs[0]
        base_env = {"TELEMETRY_BATCH_SIZE": str(batch), "TELEMETRY_PIPELINE_DEPTH": str(depth)}
        results["settings"] = {"batch": batch, "depth": depth, "flush_ms": 200}
        for name, module, mode in (
            ("n0", "bare", "bare-n"),
            ("n", "pull", "ceiling-n"),
            ("g", "pull", "baseline-g"),
            ("naive", "pull", "naive"),
            ("p", "pg", "ceiling-p"),
        ):
            if name not in only:
                continue
            step(mode)
            with stack.nats(messages if name != "p" else None) as server, stack.database() as db:
                results[name] = run_child(
                    f"benchmarks.{module}",
                    {"mode": mode, "total": total, "file": str(messages), "batch": batch},
                    env=stack.env(server, db, **base_env),
                    log_path=workdir / "logs" / f"{mode}.log",
                )
        if "daemon" in only:
            results["daemon"] = []
            for i, (b, d) in enumerate(configs):
                step(f"daemon {b}x{d}")
                env = {"TELEMETRY_BATCH_SIZE": str(b), "TELEMETRY_PIPELINE_DEPTH": str(d)}
                run = run_daemon_bench(
                    stack,
                    messages,
                    total,
                    overrides=env,
                    latency_s=latency_s if i == 0 else 0.0,
                    warmup_s=1.0 if quick else 2.0,
                    profile=workdir / f"profile-{b}x{d}.txt" if args.profile else None,
                )
                results["daemon"].append({"batch": b, "depth": d, **run})
        if "liveness" in only:
            step("liveness")
            sizes = [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000]
            with stack.nats(None) as server, stack.database() as db:
                env = stack.env(server, db)
                results["tick"] = run_child(
                    "benchmarks.liveness", {"mode": "tick", "sizes": sizes}, env=env
                )
                results["rss"] = run_child(
                    "benchmarks.liveness", {"mode": "rss", "count": sizes[-1]}, env=env
                )
        if "decisions" in only:
            step("decisions")
            with stack.nats(None) as server, stack.database() as db:
                results["copy"] = run_child(
                    "benchmarks.pg",
                    {"mode": "copy-compare", "file": str(messages),
                     "rows": min(total, 50_000), "batches": [1000, 5000]},
                    env=stack.env(server, db),
                )  # fmt: skip
            results["decode"] = run_child(
                "benchmarks.decode", {"mode": "decode", "file": str(messages)}
            )
    finally:
        stack.close()
    results["load_after"] = _load()
    results["wall_seconds"] = time.monotonic() - started
    return results


def _stepper(started: float) -> Any:
    def step(what: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {what}", file=sys.stderr, flush=True)

    return step


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so PostgreSQL (pg_ctl-daemonised) is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # asyncio warns about eof_received() on every TLS close: noise, not news.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    (args.workdir / "logs").mkdir(parents=True, exist_ok=True)
    results = run(args)
    out = args.json or args.workdir / ("last-quick.json" if args.quick else "last.json")
    out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
