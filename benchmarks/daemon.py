"""The daemon end to end: `python -m notip_trio` as a subprocess, as in production.

Throughput: the stream already holds the message file; the daemon (and the
management-API stand-in, each its own process) starts against a fresh server
and an empty database. Consumption starts at the daemon's `started` log line
(its pull tasks run from then on; start-up is not counted) and ends at the
first poll of the daemon's own metrics that shows every message committed
(messages_written) and none still waiting for its ack (consumer_ack_pending:
the daemon acks once a message's last-seen is stored too); the server's consumer state
(num_pending == 0 == num_ack_pending, ack floor at the last message) and the
row count are then checked. Polls come at half the predicted remaining
time, down to 20 ms (each scrape costs the daemon's loop ~2.5 ms); the error
is at most one poll, against us.

The consumer state is NOT polled during the run: on nats-server 2.9.10,
polling `/jsz?consumers=true` every 10-200 ms while a pull consumer drains a
backlog made delivery trickle (about 200 msgs/s instead of tens of
thousands), in 7 of 9 trials; without the polling 3 of 3 ran at full speed.

Latency (optional, same daemon afterwards): `benchmarks.publisher` publishes live
envelopes at a fixed rate whose `timestamp` is the publish wall time. When the
consumer has drained again, each row's publish-to-commit latency is
`pg_xact_commit_timestamp(xmin) - time` (PostgreSQL runs with
track_commit_timestamp = on, same host clock); the first `warmup_s` seconds
are left out. Exact per row, no polling error, no extra column.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.common import DURABLE, BenchError, run_child
from benchmarks.stack import Stack
from devstack import js
from devstack.mgmt_standin import spawn_standin
from devstack.natsd import NatsServer
from devstack.proc import Child, python_module
from notip_trio.horizon import parse_stream_time

POLL_S = 0.02
_LATENCY_SQL = """
SELECT count(*),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY lat),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY lat),
       max(lat)
  FROM (SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - time) AS lat
          FROM telemetry WHERE time >= %s) s
"""
_WRITTEN = "notip_consumer_messages_written_total "
_ACK_PENDING = "notip_consumer_consumer_ack_pending_messages "


def _check_alive(daemon: Child) -> None:
    if not daemon.running:
        raise BenchError(f"daemon exited with {daemon.returncode}:\n{daemon.tail()}")


def _started_at(daemon: Child, timeout_s: float) -> float:
    """Wall time (epoch s) of the daemon's `started` log line: pulling begins then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _check_alive(daemon)
        for line in daemon.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if '"event": "started"' in line:
                stamp = json.loads(line)["time"]
                return dt.datetime.fromisoformat(stamp).timestamp()
        time.sleep(POLL_S)
    raise BenchError(f"the daemon did not start within {timeout_s:g} s:\n{daemon.tail()}")


def _written(metrics_url: str) -> int:
    """Messages committed and acked: the committed count, held at 0 below the
    total while any delivered message still waits for its ack (a release that
    acks after last-seen is stored increments the counter at the commit)."""
    written = ack_pending = 0
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        for raw in resp:
            line = raw.decode()
            if line.startswith(_WRITTEN):
                written = int(float(line[len(_WRITTEN) :]))
            elif line.startswith(_ACK_PENDING):
                ack_pending = int(float(line[len(_ACK_PENDING) :]))
    return written - ack_pending


def _wait_written(
    server: NatsServer, daemon: Child, metrics_url: str, total: int, timeout_s: float
) -> float:
    """Wall time of the first poll where the daemon has committed and acked `total`.

    Polls the daemon's own metrics (committed, less what still awaits its ack),
    then confirms with the server (/jsz) that nothing is pending or unacked.
    """
    deadline = time.monotonic() + timeout_s
    first = (time.time(), _written(metrics_url))
    while True:
        now = time.time()
        done = _written(metrics_url)
        if done >= total:
            break
        _check_alive(daemon)
        if time.monotonic() > deadline:
            raise BenchError(f"only {done} of {total} written in {timeout_s:g} s")
        # Each scrape costs the daemon ~2.5 ms of its event loop: sleep for half
        # the predicted remaining time (at least POLL_S), so there are few polls.
        rate = (done - first[1]) / max(now - first[0], 1e-3)
        time.sleep(min(max((total - done) / max(rate, 1.0) / 2, POLL_S), 0.25))
    for _ in range(100):
        state = js.consumer_state(server, "TELEMETRY", DURABLE)
        if state.drained and state.ack_floor >= total:
            return now
        time.sleep(POLL_S)
    raise BenchError(f"written but not drained on the server: {state}")


def _query(conninfo: str, sql: str, *params: Any) -> tuple[Any, ...]:
    import psycopg

    with psycopg.connect(conninfo) as conn:
        row = conn.execute(sql, params).fetchone()
    assert row is not None
    return tuple(row)


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_daemon_bench(
    stack: Stack,
    messages: Path,
    total: int,
    *,
    overrides: dict[str, str],
    latency_s: float = 0.0,
    light_rate: float = 0.0,
    warmup_s: float = 2.0,
    profile: Path | None = None,
) -> dict[str, Any]:
    """One daemon run: throughput on the pre-published file, then, if `latency_s`,
    latency at half that throughput and (if `light_rate`) at `light_rate` msgs/s."""
    logs = stack.workdir / "logs"
    logs.mkdir(exist_ok=True)
    tag = "-".join(f"{v}" for v in overrides.values()) or "default"
    tag = tag.replace("/", "_")
    for old in (logs / f"mgmt-{tag}.log", logs / f"daemon-{tag}.log"):
        old.unlink(missing_ok=True)  # Child.spawn appends
    with stack.nats(messages) as server, stack.database() as dbname:
        env = stack.env(server, dbname, **overrides)
        standin = spawn_standin(server, logs / f"mgmt-{tag}.log")
        argv = python_module("notip_trio")
        if profile is not None:
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            argv = [spy, "record", "-r", "250", "-f", "raw", "-o", str(profile), "--", *argv]
        daemon = Child.spawn("daemon", argv, logs / f"daemon-{tag}.log", env=env)
        try:
            metrics_url = f"http://{env['METRICS_ADDR']}/metrics"
            t0 = _started_at(daemon, timeout_s=60)
            t1 = _wait_written(server, daemon, metrics_url, total, timeout_s=600)
            conninfo = stack.admin_conninfo(dbname)
            (rows,) = _query(conninfo, "SELECT count(*) FROM telemetry")
            if rows != total:
                raise BenchError(f"{rows} rows committed, {total} expected")
            rate = total / (t1 - t0)
            result: dict[str, Any] = {"msgs": total, "seconds": t1 - t0, "rate": rate}
            if latency_s > 0:
                result["latency"] = _latency(
                    server, daemon, metrics_url, conninfo, total, rate / 2, latency_s, warmup_s
                )
                if light_rate > 0:
                    done = total + result["latency"]["sent"]
                    result["light"] = _latency(
                        server, daemon, metrics_url, conninfo, done, light_rate, latency_s,
                        warmup_s,
                    )  # fmt: skip
            result["daemon_peak_rss_mib"] = (_vm_hwm_kib(daemon.proc.pid) or 0) / 1024
        finally:
            # How fast it exits, idle, after the signal: measured here, not asserted
            # in the tests (tests/test_daemon_process.py checks the clean drain).
            stopping = time.monotonic()
            code = daemon.stop(30.0, signal.SIGTERM if profile is None else signal.SIGINT)
            exit_s = time.monotonic() - stopping
            standin.stop(10.0)
        result["exit_code"] = code
        result["exit_s"] = exit_s
        return result


class _AckLagSampler:
    """How old the oldest unacknowledged message is, sampled every `every_s` from
    the server (consumer info, then the message get of ack floor + 1): what the
    liveness horizon trails now by. Runs in a thread during the live phase."""

    def __init__(self, server: NatsServer, every_s: float = 0.1) -> None:
        self.server, self.every_s = server, every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _AckLagSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        async def sample(nc: Any) -> None:
            info_subject = f"$JS.API.CONSUMER.INFO.TELEMETRY.{DURABLE}"
            while not self._stop.is_set():
                now = time.time()
                info = json.loads((await nc.request(info_subject, b"", timeout=5)).data)
                if info.get("num_ack_pending", 0) or info.get("num_pending", 0):
                    get = json.dumps(
                        {"seq": info["ack_floor"]["stream_seq"] + 1, "next_by_subj": ">"}
                    ).encode()
                    reply = json.loads(
                        (await nc.request("$JS.API.STREAM.MSG.GET.TELEMETRY", get, timeout=5)).data
                    )
                    if "message" in reply:
                        sent = parse_stream_time(reply["message"]["time"])
                        self.samples.append(max(0.0, now - sent))
                else:
                    self.samples.append(0.0)
                await asyncio.sleep(self.every_s)

        js.run_nats(self.server, sample, "test-client", timeout_s=3600)


def _latency(
    server: NatsServer,
    daemon: Child,
    metrics_url: str,
    conninfo: str,
    already: int,
    rate: float,
    seconds: float,
    warmup_s: float,
) -> dict[str, Any]:
    client = server.client("gateway-sim")
    started = dt.datetime.now(dt.UTC)
    with _AckLagSampler(server) as lag:
        pub = run_child(
            "benchmarks.publisher",
            {"url": server.url, "ca": str(client.ca), "cert": str(client.cert),
             "key": str(client.key), "rate": rate, "seconds": seconds},
        )  # fmt: skip
    _wait_written(server, daemon, metrics_url, already + int(pub["sent"]), timeout_s=120)
    lags = sorted(lag.samples[int(len(lag.samples) * warmup_s / max(seconds, 1e-3)) :])
    count, p50, p99, worst = _query(
        conninfo, _LATENCY_SQL, started + dt.timedelta(seconds=warmup_s)
    )
    return {
        "target_rate": rate,
        "published_rate": pub["rate"],
        "sent": pub["sent"],
        "measured_rows": count,
        "p50_ms": float(p50) * 1000,
        "p99_ms": float(p99) * 1000,
        "max_ms": float(worst) * 1000,
        # The oldest unacknowledged message's age, sampled every 100 ms.
        "ack_lag_p50_ms": lags[len(lags) // 2] * 1000 if lags else None,
        "ack_lag_p99_ms": lags[min(len(lags) - 1, int(0.99 * len(lags)))] * 1000 if lags else None,
        "ack_lag_max_ms": lags[-1] * 1000 if lags else None,
    }
