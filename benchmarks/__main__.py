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
7. A database outage under the daemon: last-seen after the return (`benchmarks.dbdown`).

plus the two decision benchmarks (`benchmarks.pg` copy-compare, `benchmarks.decode`).
Every measurement runs in a process of its own; this one only orchestrates.
`--quick` uses small counts (a smoke run of a few minutes).
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

from benchmarks.common import BenchError, make_message_file, run_child
from benchmarks.daemon import run_daemon_bench
from benchmarks.dbdown import run_db_outage_bench
from benchmarks.replicas import run_replicas_bench
from benchmarks.report import render
from benchmarks.stack import Stack, nats_server_version
from notip_trio.config import DEFAULTS

SECTIONS = (
    "n0", "n", "p", "g", "naive", "daemon", "replicas", "liveness", "dbdown", "decisions",
)  # fmt: skip
DEFAULT_CONFIG = "default"
FULL_CONFIGS = (DEFAULT_CONFIG, "1000x2", "2000x2", "5000x2", "10000x2")
LIGHT_RATE = 500.0  # msgs/s: the light-load latency measurement


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run, a few minutes")
    p.add_argument("--messages", type=int, help="pre-published messages (200000; quick 20000)")
    p.add_argument(
        "--configs",
        help="daemon settings to try: 'default' (the daemon's defaults: adaptive batch), "
        "BxD (a fixed batch B: TELEMETRY_BATCH_MIN = TELEMETRY_BATCH_SIZE = B, depth D) or "
        "LO-HIxD (adaptive between LO and HI); the first is the one the ratios and the "
        f"latency use (default {','.join(FULL_CONFIGS)}; quick default)",
    )
    p.add_argument("--latency-seconds", type=float, help="live publishing time (20; quick 4)")
    p.add_argument(
        "--outage-gateways", type=int, help="gateways of the database outage (1000000; quick 10000)"
    )
    p.add_argument(
        "--outage-seconds", type=float, help="length of the database outage (60; quick 20)"
    )
    p.add_argument(
        "--outage-no-leader",
        action="store_true",
        help="database outage: the harness holds the liveness lock (ingest alone; a diagnosis)",
    )
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


def _configs(text: str | None, quick: bool) -> list[dict[str, Any]]:
    """Each daemon setting to run: its label, its environment, its batch bounds."""
    items = text.split(",") if text else [DEFAULT_CONFIG] if quick else list(FULL_CONFIGS)
    out = []
    for item in (i.strip() for i in items):
        if item == DEFAULT_CONFIG:
            low, high, depth = (
                int(DEFAULTS["TELEMETRY_BATCH_MIN"]),
                int(DEFAULTS["TELEMETRY_BATCH_SIZE"]),
                int(DEFAULTS["TELEMETRY_PIPELINE_DEPTH"]),
            )
            out.append({"label": "default", "env": {}, "min": low, "max": high, "depth": depth})
            continue
        sizes, _, depth_s = item.partition("x")
        low_s, _, high_s = sizes.partition("-")
        low, high, depth = int(low_s), int(high_s or low_s), int(depth_s or 2)
        env = {
            "TELEMETRY_BATCH_MIN": str(low),
            "TELEMETRY_BATCH_SIZE": str(high),
            "TELEMETRY_PIPELINE_DEPTH": str(depth),
        }
        out.append({"label": item, "env": env, "min": low, "max": high, "depth": depth})
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
        first = configs[0]
        base_env = first["env"]
        batch = first["max"]
        results["settings"] = {
            "label": first["label"],
            "batch_min": first["min"],
            "batch": first["max"],
            "depth": first["depth"],
            "flush_ms": int(DEFAULTS["TELEMETRY_FLUSH_MS"]),
        }
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
            for i, cfg in enumerate(configs):
                step(f"daemon {cfg['label']}")
                run = run_daemon_bench(
                    stack,
                    messages,
                    total,
                    overrides=cfg["env"],
                    latency_s=latency_s if i == 0 else 0.0,
                    light_rate=LIGHT_RATE,
                    warmup_s=1.0 if quick else 2.0,
                    profile=workdir / f"profile-{cfg['label']}.txt" if args.profile else None,
                )
                results["daemon"].append(
                    {
                        "label": cfg["label"],
                        "batch_min": cfg["min"],
                        "batch": cfg["max"],
                        "depth": cfg["depth"],
                        **run,
                    }
                )
        if "replicas" in only:
            results["replicas"] = []
            for n in (1, 2):
                step(f"{n} replica(s)")
                results["replicas"].append(run_replicas_bench(stack, messages, total, n))
        if "liveness" in only:
            step("liveness")
            sizes = [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000]
            try:
                with stack.nats(None) as server, stack.database() as db:
                    env = stack.env(server, db)
                    results["tick"] = run_child(
                        "benchmarks.liveness", {"mode": "tick", "sizes": sizes}, env=env
                    )
                    results["rss"] = run_child(
                        "benchmarks.liveness", {"mode": "rss", "count": sizes[-1]}, env=env
                    )
                    results["flush"] = run_child(
                        "benchmarks.liveness", {"mode": "flush", "count": sizes[-1]}, env=env
                    )
                    results["outage"] = run_child(
                        "benchmarks.liveness", {"mode": "outage", "size": sizes[-1]}, env=env
                    )
            except BenchError as exc:  # the table still shows what was measured
                _failed(results, "liveness", exc)
        if "dbdown" in only:
            step("database outage")
            try:
                results["dbdown"] = run_db_outage_bench(
                    stack,
                    gateways=args.outage_gateways or (10_000 if quick else 1_000_000),
                    outage_s=args.outage_seconds or (20.0 if quick else 60.0),
                    leader=not args.outage_no_leader,
                )
            except BenchError as exc:
                _failed(results, "dbdown", exc)
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


def _failed(results: dict[str, Any], section: str, exc: Exception) -> None:
    results.setdefault("errors", {})[section] = str(exc).splitlines()[-1][:300]
    print(f"{section} FAILED: {exc}", file=sys.stderr, flush=True)


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
