"""Issue 20's database outage, for real: the daemon as a process, PostgreSQL stopped.

The daemon (`python -m notip_trio`, leader and ingest, the management-API
stand-in beside it) runs against a table of `gateways` online gateways, all
heard just now and tracked by the leader. Then PostgreSQL is stopped for
`outage_s` (pg_ctl stop: every connection of the daemon breaks, new ones are
refused). During the outage each gateway publishes one telemetry message,
from `publish_at` of the outage on, as fast as the publisher goes. PostgreSQL
is started again; timed from the moment it accepts connections:

- `written_s`: every telemetry row committed (the daemon's messages_written);
- `settled_s`: every message acked, i.e. every last-seen stored (the daemon
  acks a message only once its gateway's last-seen committed: messages
  written less those awaiting their ack);
- `flushed_s`: the table confirms it: every gateway's `last_seen` is the new
  one (polled after `settled_s`; the goal's figure).

The alert timeout is shorter than the outage (11/12 of it), so a leader that
judged by the wall clock, not by the durable's ack floor (horizon.py), would
alert the whole fleet at the return; and longer than any gateway's real
silence by stream time (from the fill to its message, and from its message to
the end of the checks: the messages come in the middle of the outage, and the
result says how much margin was left). False alerts are checked after the
flush plus three ticks: no alert published (the daemon's metric), no row
offline. That the fault happened is checked too: failed batch writes and
failed last-seen flushes on the daemon's metrics, and its leadership lost.

The samples (every `SAMPLE_S` after the return: telemetry committed, last-seen
settled) show where the time goes. Runs in the harness (like
`benchmarks.daemon`); `run_db_outage_bench` returns the result dict.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError
from benchmarks.stack import Stack
from devstack import js
from devstack.mgmt_standin import spawn_standin
from devstack.proc import Child, python_module
from devstack.simulator import envelope_fields, subject_for

_P = "notip_consumer_"
SAMPLE_S = 0.1
TICK_MS = 1000
_TEMPLATE_GW = "GW-PLACEHOLDER"


def _metrics(url: str) -> dict[str, float]:
    """Every unlabelled sample of the daemon's /metrics by name (prefix dropped)."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(url, timeout=5) as resp:
        for raw in resp:
            line = raw.decode()
            if line.startswith(_P) and "{" not in line:
                name, _, value = line.partition(" ")
                out[name.removeprefix(_P)] = float(value)
    return out


def _try_metrics(url: str) -> dict[str, float] | None:
    try:
        return _metrics(url)
    except OSError:
        return None


def _metric(url: str, name: str) -> float | None:
    m = _try_metrics(url)
    return None if m is None else m.get(name)


def _spawn_daemon(env: dict[str, str], logs: Path) -> Child:
    return Child.spawn("daemon", python_module("notip_trio"), logs / "dbdown-daemon.log", env=env)


def _wait(what: str, check: Any, daemon: Child, timeout_s: float, every_s: float = 0.1) -> float:
    """Poll `check()` until true; returns the wall time it was first seen true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not daemon.running:
            raise BenchError(f"daemon exited with {daemon.returncode}:\n{daemon.tail()}")
        if check():
            return time.time()
        time.sleep(every_s)
    raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}:\n{daemon.tail()}")


def _messages(keys: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
    """One valid envelope per gateway (one body template, the gateway id put in)."""
    fields = envelope_fields(_TEMPLATE_GW, "s1", "temperature", dt.datetime.now(dt.UTC))
    head, _, tail = (
        json.dumps(fields, separators=(",", ":")).encode().partition(_TEMPLATE_GW.encode())
    )
    return [(subject_for(t, g), head + g.encode() + tail) for t, g in keys]


def _hold_lock(conninfo: str) -> Any:
    """A session holding the liveness lock (a leader elsewhere), or BenchError."""
    import psycopg

    from notip_trio.leader import LIVENESS_LOCK

    conn = psycopg.connect(conninfo, autocommit=True)
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LIVENESS_LOCK,)).fetchone()
    if not row or not row[0]:
        conn.close()
        raise BenchError("the liveness lock is taken")
    return conn


class _LockGrab(threading.Thread):
    """Takes the liveness lock the moment the database accepts connections
    again (tries every 10 ms; the daemon's leader tries every 0.5 s)."""

    def __init__(self, conninfo: str) -> None:
        super().__init__(daemon=True)
        self.conninfo = conninfo
        self.conn: Any = None

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while self.conn is None and time.monotonic() < deadline:
            try:
                self.conn = _hold_lock(self.conninfo)
            except BenchError:  # the daemon was first
                return
            except Exception:  # refused while it starts
                time.sleep(0.01)


def _grab_lock_when_back(conninfo: str) -> _LockGrab:
    grab = _LockGrab(conninfo)
    grab.start()
    return grab


def _count(conninfo: str, sql: str, *params: Any) -> int:
    import psycopg

    with psycopg.connect(conninfo) as conn:
        row = conn.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


def run_db_outage_bench(
    stack: Stack,
    *,
    gateways: int,
    outage_s: float,
    publish_at: float = 0.35,
    timeout_frac: float = 11 / 12,
    leader: bool = True,
) -> dict[str, Any]:
    """One run; see the module docstring. `publish_at` and `timeout_frac` are
    fractions of `outage_s`. `leader=False` (a diagnosis: ingest alone) has the
    harness hold the liveness lock, so the daemon never leads: nothing is
    alerted and no false alert can be checked."""
    from benchmarks.liveness import fill_state, fleet_keys

    logs = stack.workdir / "logs"
    logs.mkdir(exist_ok=True)
    timeout_ms = int(outage_s * timeout_frac * 1000)
    keys = fleet_keys(gateways)
    msgs = _messages(keys)
    for old in (logs / "dbdown-mgmt.log", logs / "dbdown-daemon.log"):
        old.unlink(missing_ok=True)  # Child.spawn appends
    with stack.nats(None) as server, stack.database() as dbname:
        env = stack.env(
            server,
            dbname,
            HEARTBEAT_TICK_MS=str(TICK_MS),
            HEARTBEAT_GRACE_PERIOD_MS="0",
            ALERT_CONFIG_DEFAULT_TIMEOUT_MS=str(timeout_ms),
            ALERT_CONFIG_REFRESH_MS="600000",
        )
        conninfo = stack.admin_conninfo(dbname)
        url = f"http://{env['METRICS_ADDR']}/metrics"
        standin = spawn_standin(server, logs / "dbdown-mgmt.log")
        daemon = _spawn_daemon(env, logs)
        holder = None
        try:
            # The first run only migrates; the fleet is filled while no daemon
            # runs, so the second one's takeover loads it (seconds; the change
            # read of a million rows filled under a running leader takes minutes).
            _wait("leadership", lambda: _metric(url, "liveness_leader") == 1, daemon, 60)
            daemon.stop(30.0)
            # Every gateway heard at `filled_at` (no spread): a gateway alerted on
            # that last-seen is then a false alert, its message came sooner.
            filled_at = fill_state(conninfo, keys, 0, spread_s=0.0)
            holder = None if leader else _hold_lock(conninfo)
            daemon = _spawn_daemon(env, logs)
            tracked_at = _wait(
                "the leader to track the fleet" if leader else "ingest",
                lambda: _metric(url, "heartbeat_map_size") == (gateways if leader else 0),
                daemon,
                120,
            )
            before = _metrics(url)
            stack.pg.stop(mode="fast")
            cut_at = time.time()
            time.sleep(max(0.0, cut_at + outage_s * publish_at - time.time()))
            publish_started = time.time()
            js.publish(server, msgs, name="gateway-sim", flush_every=5000, timeout_s=outage_s)
            published_at = time.time()
            del msgs
            if published_at > cut_at + outage_s:
                raise BenchError(f"publishing outlasted the outage ({published_at - cut_at:.1f} s)")
            during = _try_metrics(url)
            time.sleep(max(0.0, cut_at + outage_s - time.time()))
            grab = None if holder is None else _grab_lock_when_back(conninfo)
            stack.pg.start()
            back_at = time.time()
            if grab is not None and holder is not None:
                grab.join(timeout=30)
                holder.close()  # broken by the stop
                holder = grab.conn  # None if the daemon was first: checked below
            samples: list[tuple[float, float, float]] = []
            state = {"written": 0.0, "settled": 0.0}

            def sample() -> bool:
                m = _try_metrics(url)
                if m is None:
                    return False
                written = m.get("messages_written_total", 0.0)
                settled = written - m.get("consumer_ack_pending_messages", 0.0)
                samples.append((time.time() - back_at, written, settled))
                if not state["written"] and written >= gateways:
                    state["written"] = time.time()
                return settled >= gateways

            settled_at = _wait("every message acked", sample, daemon, 600, SAMPLE_S)
            new_seen = "SELECT count(*) FROM gateway_liveness WHERE last_seen > %s"
            flushed_at = _wait(
                "every last-seen new",
                lambda: _count(conninfo, new_seen, filled_at) == gateways,
                daemon,
                60,
            )
            time.sleep(3 * TICK_MS / 1000)
            checked_at = time.time()
            after = _metrics(url)
            offline = _count(
                conninfo, "SELECT count(*) FROM gateway_liveness WHERE status <> 'online'"
            )
            # Alerted on the last-seen from before the outage: its message was in the backlog.
            false_alerts = _count(
                conninfo,
                "SELECT count(*) FROM gateway_liveness"
                " WHERE status = 'offline' AND status_last_seen <= %s",
                filled_at,
            )
            rows = _count(conninfo, "SELECT count(*) FROM telemetry")
            if not leader and after.get("liveness_leader") != 0:
                raise BenchError("the daemon took the lock the harness was to hold")
        finally:
            daemon.stop(30.0)
            standin.stop(10.0)
            if holder is not None:
                holder.close()
    # Each gateway's real silence by stream time: from the fill to its message
    # (at most the last publish), and from its message (at least the first) to the check.
    silence_before = published_at - filled_at.timestamp()
    silence_after = checked_at - publish_started
    result: dict[str, Any] = {
        "leader": leader,
        "gateways": gateways,
        "outage_s": outage_s,
        "alert_timeout_ms": timeout_ms,
        "tick_ms": TICK_MS,
        "fill_to_cut_s": cut_at - filled_at.timestamp(),
        "tracked_to_cut_s": cut_at - tracked_at,
        "publish_s": published_at - publish_started,
        "published_from_s": publish_started - cut_at,
        "written_s": state["written"] - back_at,
        "settled_s": settled_at - back_at,
        "flushed_s": flushed_at - back_at,
        "telemetry_rows": rows,
        "write_errors": after.get("write_errors_total", 0) - before.get("write_errors_total", 0),
        "last_seen_flush_errors": after.get("last_seen_flush_errors_total", 0)
        - before.get("last_seen_flush_errors_total", 0),
        "takeovers": after.get("liveness_takeovers_total", 0)
        - before.get("liveness_takeovers_total", 0),
        "leader_during_outage": (during or {}).get("liveness_leader"),
        "alerts_published": after.get("alerts_published_total", 0),
        "offline_rows": offline,
        "false_alerts": false_alerts,
        "silence_margin_s": timeout_ms / 1000 - max(silence_before, silence_after),
        "samples": [s for i, s in enumerate(samples) if i % 5 == 0 or i == len(samples) - 1],
    }
    if rows != gateways:
        raise BenchError(f"{rows} telemetry rows, {gateways} expected: {result}")
    return result
