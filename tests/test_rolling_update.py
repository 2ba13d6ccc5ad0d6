"""A rolling update with mixed versions (docs/operations.md, "Rolling updates and
mixed versions"), as real processes.

One replica of release 0.1.0 (installed from its commit, in its own venv) and
one of this code share the NATS durable and the database; the liveness lock is
handed over in both directions by SIGTERM, as a rollout does:

1. 0.1.0 leads, this code follows: a gateway falls silent.
2. 0.1.0 is stopped, this code takes over, 0.1.0 comes back as a follower:
   another gateway falls silent.
3. This code is stopped, 0.1.0 takes over, this code comes back as a
   follower: a third gateway falls silent.

A second test leaves reports in the outbox for 0.1.0 to lead over: it sends
none of them; the next leader of this code sends those still due and gives up
the one a newer transition (made by 0.1.0) superseded.

Exact counts: every message stored once, each silent gateway alerted once,
update-status calls online then offline for the silent ones and online only
for the others (a report repeated back to back is allowed: reports are at
least once), never an older one after a newer; and each handover happened
(the leader gauge of each side, `liveness_leader_acquired` in its log).
Times are printed, never asserted.

The old release: `git worktree add --detach` of its commit into a temporary
directory and `pip install -c constraints.txt` of that worktree into a venv
cached under `.cache/old-release-0.1.0` in the checkout (gitignored), so only
the first run builds it. A clone without that commit (a shallow one) skips
the test, and fails it under CI=true. The old daemon runs as `python -I -m
notip_trio` from its venv: `-I` keeps this checkout (on PYTHONPATH for the
new daemon) out of its import path.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from devstack import js as _js
from devstack.natsd import NatsServer
from devstack.postgres import PgDatabase, PgServer
from devstack.proc import Child
from notip_trio import config as new_config

from ._standin import Standin, fold_repeats, running_standin
from .fix_daemon import DaemonProcess, liveness_env, spawn_daemon, until
from .fix_servers import drained, in_ci, require, scalar, telemetry_rows
from .sim_gateways import TENANT, Gateways

# Two releases as processes, each stopped and started again; the first run builds a venv.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
OLD_VERSION = "0.1.0"
OLD_COMMIT = "29d14469ebb81a50403227456c874b93abfbb03f"  # release 0.1.0
OLD_CACHE = ROOT / ".cache" / f"old-release-{OLD_VERSION}"
TIMEOUT_MS = 3000
LEADER = "notip_consumer_liveness_leader"


# --- the old release, installed once -------------------------------------------------


@dataclass(frozen=True)
class OldRelease:
    python: Path
    required: frozenset[str]  # its config.REQUIRED_VARIABLES
    known: frozenset[str]  # its config.ENV_VARS


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
    )


def _build_old_venv(venv: Path) -> None:
    """`git worktree add` of the old commit, its own venv, `pip install` of the worktree."""
    with tempfile.TemporaryDirectory(prefix="notip-old-release-") as tmp:
        src = Path(tmp) / "src"
        added = _git("worktree", "add", "--detach", str(src), OLD_COMMIT)
        assert added.returncode == 0, f"git worktree add failed: {added.stderr}"
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run(
                [
                    str(venv / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "-c",
                    str(src / "constraints.txt"),
                    str(src),
                ],
                check=True,
            )
        finally:
            _git("worktree", "remove", "--force", str(src))
            _git("worktree", "prune")


def _describe(python: Path) -> dict[str, object]:
    probe = (
        "import importlib.util, json; from notip_trio import config; print(json.dumps({"
        "'file': config.__file__, 'required': list(config.REQUIRED_VARIABLES), "
        "'known': list(config.ENV_VARS), "
        "'horizon': importlib.util.find_spec('notip_trio.horizon') is not None}))"
    )
    out = subprocess.run(
        [str(python), "-I", "-c", probe], capture_output=True, text=True, check=True, cwd="/"
    )
    described: dict[str, object] = json.loads(out.stdout)
    return described


@pytest.fixture(scope="session")
def old_release() -> OldRelease:
    if shutil.which("git") is None or _git("rev-parse", "--git-dir").returncode != 0:
        require("not a git checkout: the old release is built from its commit")
    if _git("cat-file", "-e", f"{OLD_COMMIT}^{{commit}}").returncode != 0:
        message = (
            f"commit {OLD_COMMIT[:7]} (release {OLD_VERSION}) is not in this clone's history "
            "(a shallow clone?): fetch it, e.g. `git fetch --unshallow`"
        )
        if in_ci():
            pytest.fail(f"{message}; CI=true: the rolling-update test needs it")
        pytest.skip(message)
    OLD_CACHE.mkdir(parents=True, exist_ok=True)
    venv = OLD_CACHE / "venv"
    marker = OLD_CACHE / "installed"  # written last: the commit the venv holds
    started = time.monotonic()
    with (OLD_CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time, even across test runs
        cached = marker.exists() and marker.read_text().strip() == OLD_COMMIT
        if not cached:
            marker.unlink(missing_ok=True)
            shutil.rmtree(venv, ignore_errors=True)
            _build_old_venv(venv)
            marker.write_text(OLD_COMMIT + "\n")
    python = venv / "bin" / "python"
    described = _describe(python)
    took = time.monotonic() - started
    print(
        f"old release {OLD_VERSION} ({OLD_COMMIT[:7]}): "
        f"{'cached venv' if cached else 'venv built'} in {took:.1f} s ({venv})"
    )
    # It is the old code, from its venv, not this checkout.
    assert str(described["file"]).startswith(str(venv)), described["file"]
    assert described["horizon"] is False, "the venv holds the new code"
    return OldRelease(
        python,
        frozenset(map(str, described["required"])),  # type: ignore[call-overload]
        frozenset(map(str, described["known"])),  # type: ignore[call-overload]
    )


@contextlib.contextmanager
def spawn_old_daemon(
    release: OldRelease, env: dict[str, str], log_path: Path
) -> Iterator[DaemonProcess]:
    """The old release's daemon, like `spawn_daemon` (same environment rules)."""
    argv = [str(release.python), "-I", "-m", "notip_trio"]
    child = Child.spawn(f"daemon-{OLD_VERSION}", argv, log_path, env=env, cwd=log_path.parent)
    host, _, port = env["METRICS_ADDR"].rpartition(":")
    try:
        yield DaemonProcess(child, f"http://{host or '127.0.0.1'}:{port}")
    finally:
        child.stop(grace_s=5, sig=signal.SIGKILL)


# --- helpers ---------------------------------------------------------------------------


def _env(nats: NatsServer, pg: PgServer, db: PgDatabase, **overrides: str) -> dict[str, str]:
    return liveness_env(nats, pg, db, **overrides)


def _check_env(release: OldRelease, env: dict[str, str]) -> None:
    """Both releases find every variable they require; print what 0.1.0 ignores."""
    missing = release.required - env.keys()
    assert not missing, f"variables 0.1.0 requires that the test does not set: {sorted(missing)}"
    assert not set(new_config.REQUIRED_VARIABLES) - env.keys()
    unknown_to_old = sorted(env.keys() - release.known)
    print(f"variables 0.1.0 does not know (it ignores them): {unknown_to_old or 'none'}")


async def _leads(daemon: DaemonProcess, what: str) -> None:
    await until(lambda: daemon.metric(LEADER) == 1.0, 30, what)


async def _stop(daemon: DaemonProcess) -> float:
    """SIGTERM; the exit code must be 0 (a clean drain). Returns how long it took."""
    daemon.signal(signal.SIGTERM)
    code, took = await daemon.wait_exit(60)
    assert code == 0, daemon.tail()
    return took


async def _falls_silent(gateways: Gateways, standin: Standin, name: str) -> float:
    """Silence `name`; seconds until its offline update arrived."""
    gateways.silence(name)
    silenced_at = time.monotonic()
    await until(lambda: "offline" in standin.statuses(name), 60, f"{name} reported offline")
    return time.monotonic() - silenced_at


def _acquired(daemon: DaemonProcess) -> int:
    return [e["event"] for e in daemon.json_logs()].count("liveness_leader_acquired")


# --- the test -------------------------------------------------------------------------


async def test_old_and_new_replicas_hand_the_lock_over_both_ways(
    old_release: OldRelease,
    private_nats_server: NatsServer,
    pg_server: PgServer,
    pg_database: PgDatabase,
    tmp_path: Path,
) -> None:
    nats = private_nats_server
    names = [f"g{i:02d}" for i in range(12)]
    silent = {"0.1.0 leads": "g00", "new leads": "g01", "0.1.0 leads again": "g02"}
    gateways = Gateways(nats, names)
    configs = [{"tenant_id": TENANT, "timeout_ms": TIMEOUT_MS}]
    env = functools.partial(_env, nats, pg_server, pg_database)  # a fresh metrics port each
    _check_env(old_release, env())
    conninfo = pg_database.conninfo
    times: dict[str, float] = {}
    with trio.fail_after(420):
        async with running_standin(nats, tmp_path, configs=configs) as standin:
            gateways.start()
            try:
                with contextlib.ExitStack() as stack:
                    old1 = stack.enter_context(
                        spawn_old_daemon(old_release, env(), tmp_path / "old1.log")
                    )
                    await old1.wait_ready()
                    await _leads(old1, "0.1.0 leads")
                    new1 = stack.enter_context(spawn_daemon(env(), tmp_path / "new1.log"))
                    await new1.wait_ready()
                    await until(
                        lambda: all(standin.statuses(g) for g in names), 60, "every gateway online"
                    )
                    for daemon in (old1, new1):
                        await until(
                            lambda: daemon.metric("notip_consumer_messages_received_total") > 0,  # noqa: B023
                            30,
                            "both replicas ingest",
                        )
                    assert new1.metric(LEADER) == 0.0

                    # 1. 0.1.0 leads beside this code.
                    times["0.1.0 leads"] = await _falls_silent(gateways, standin, "g00")

                    # 2. 0.1.0 stopped: this code takes over; 0.1.0 comes back.
                    stopped_at = time.monotonic()
                    times["0.1.0 drained"] = await _stop(old1)
                    await _leads(new1, "the new replica takes over")
                    times["takeover by new"] = time.monotonic() - stopped_at
                    old2 = stack.enter_context(
                        spawn_old_daemon(old_release, env(), tmp_path / "old2.log")
                    )
                    await old2.wait_ready()
                    await until(
                        lambda: old2.metric("notip_consumer_messages_received_total") > 0,
                        30,
                        "the restarted 0.1.0 ingests",
                    )
                    assert old2.metric(LEADER) == 0.0
                    times["new leads"] = await _falls_silent(gateways, standin, "g01")

                    # 3. This code stopped: 0.1.0 takes over; this code comes back.
                    stopped_at = time.monotonic()
                    times["new drained"] = await _stop(new1)
                    await _leads(old2, "0.1.0 takes over")
                    times["takeover by 0.1.0"] = time.monotonic() - stopped_at
                    new2 = stack.enter_context(spawn_daemon(env(), tmp_path / "new2.log"))
                    await new2.wait_ready()
                    await until(
                        lambda: new2.metric("notip_consumer_messages_received_total") > 0,
                        30,
                        "the restarted new replica ingests",
                    )
                    times["0.1.0 leads again"] = await _falls_silent(gateways, standin, "g02")

                    await trio.sleep(2 * TIMEOUT_MS / 1000)  # a false or repeated alert shows now
                    await trio.to_thread.run_sync(gateways.stop)
                    sent = gateways.sent
                    await until(
                        lambda: drained(nats) and telemetry_rows(conninfo) >= sent,
                        60,
                        "every message stored and acked",
                    )
                    leaders = {d: d.metric(LEADER) for d in (old2, new2)}
                    for daemon in (new2, old2):  # the follower first: no third takeover
                        await _stop(daemon)
                    pending = await trio.to_thread.run_sync(
                        scalar, conninfo, "SELECT count(*) FROM gateway_status_outbox"
                    )
            finally:
                await trio.to_thread.run_sync(gateways.stop)
        alerts = await trio.to_thread.run_sync(_js.stream_messages, nats, "ALERTS")

    print(
        "rolling update: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
        + f" (offline = after the gateway's silence, timeout {TIMEOUT_MS / 1000:g} s)"
    )
    print(f"{sent} messages; updates: {len(standin.updates())}; alerts: {len(alerts)}")

    # The handovers happened: each side led in its phase, and only then.
    assert leaders == {old2: 1.0, new2: 0.0}
    assert (_acquired(old1), _acquired(new1), _acquired(old2), _acquired(new2)) == (1, 1, 1, 0)
    # Every row once; each silent gateway alerted once, no live one ever.
    assert telemetry_rows(conninfo) == sent
    assert sorted(body["gatewayId"] for _, body, _ in alerts) == sorted(silent.values())
    # Updates: online, then offline for the silent ones; never an older after a newer.
    for name in names:
        updates = standin.updates(name)
        expected = ["online", "offline"] if name in silent.values() else ["online"]
        assert fold_repeats([status for _, status, _ in updates]) == expected, (name, updates)
        seen = [dt.datetime.fromisoformat(at) for _, _, at in updates]
        assert seen == sorted(seen), (name, updates)
    assert pending == 0  # no report left behind in the outbox


def _outbox(conninfo: str) -> list[str]:
    """The gateways with a report pending in the outbox, in queue order."""
    import psycopg

    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        rows = conn.execute("SELECT gateway_id FROM gateway_status_outbox ORDER BY id").fetchall()
    return [str(row[0]) for row in rows]


async def test_reports_a_new_leader_left_wait_for_the_next_new_leader(
    old_release: OldRelease,
    private_nats_server: NatsServer,
    pg_server: PgServer,
    pg_database: PgDatabase,
    tmp_path: Path,
) -> None:
    """update-status takes 2 s. This code leads and five gateways fall silent: it
    alerts them and queues their offline reports in the outbox, and is stopped
    (SIGTERM, a 1 s drain) with reports still queued. 0.1.0 takes over: it
    does not send them (it knows no outbox). One of those gateways comes back:
    0.1.0 reports it online. This code takes over again: it sends the reports
    still due and gives up the one a newer transition superseded, so the
    management API never hears an older update after a newer one."""
    nats = private_nats_server
    silent = [f"s{i:02d}" for i in range(5)]
    live = ["l00", "l01"]
    gateways = Gateways(nats, silent + live)
    configs = [{"tenant_id": TENANT, "timeout_ms": TIMEOUT_MS}]
    env = functools.partial(_env, nats, pg_server, pg_database, SHUTDOWN_DRAIN_MS="1000")
    _check_env(old_release, env())
    conninfo = pg_database.conninfo
    with trio.fail_after(300):
        async with running_standin(nats, tmp_path, configs=configs, delay_ms=2000) as standin:
            gateways.start()
            try:
                with contextlib.ExitStack() as stack:
                    new1 = stack.enter_context(spawn_daemon(env(), tmp_path / "new1.log"))
                    await new1.wait_ready()
                    await _leads(new1, "the new replica leads")
                    old1 = stack.enter_context(
                        spawn_old_daemon(old_release, env(), tmp_path / "old1.log")
                    )
                    await old1.wait_ready()
                    await until(
                        lambda: all(standin.statuses(g) for g in silent + live),
                        60,
                        "every gateway online",
                    )
                    for name in silent:
                        gateways.silence(name)
                    await until(
                        lambda: any("offline" in standin.statuses(g) for g in silent),
                        60,
                        "the first offline update under way",
                    )
                    await _stop(new1)
                    await _leads(old1, "0.1.0 takes over")
                    left = await trio.to_thread.run_sync(_outbox, conninfo)
                    await trio.sleep(3)  # 0.1.0 leads: would it send them?
                    still = await trio.to_thread.run_sync(_outbox, conninfo)
                    unsent = [g for g in left if "offline" not in standin.statuses(g)]
                    assert len(unsent) >= 2, (left, standin.updates())
                    back = unsent[0]
                    gateways.resume(back)
                    await until(
                        lambda: standin.statuses(back) == ["online", "online"],
                        30,
                        f"{back} reported online again by 0.1.0",
                    )
                    new2 = stack.enter_context(spawn_daemon(env(), tmp_path / "new2.log"))
                    await new2.wait_ready()
                    await _stop(old1)
                    await _leads(new2, "the new replica takes over again")
                    gone = [g for g in silent if g != back]
                    await until(
                        lambda: all("offline" in standin.statuses(g) for g in gone),
                        60,
                        "every gateway still silent reported offline",
                    )
                    await until(lambda: not _outbox(conninfo), 30, "the outbox empty")
                    await trio.sleep(3)  # a stray update or alert would come now
                    await trio.to_thread.run_sync(gateways.stop)
                    sent = gateways.sent
                    await until(
                        lambda: drained(nats) and telemetry_rows(conninfo) >= sent,
                        60,
                        "every message stored and acked",
                    )
                    await _stop(new2)
            finally:
                await trio.to_thread.run_sync(gateways.stop)
        alerts = await trio.to_thread.run_sync(_js.stream_messages, nats, "ALERTS")

    dropped = [e for e in new2.json_logs() if e["event"] == "status_update_dropped"]
    print(f"outbox at the handover to 0.1.0: {left}; {back} came back; "
          f"given up by the next new leader: {[e['gateway_id'] for e in dropped]}")  # fmt: skip
    assert still == left  # 0.1.0 sent none of them, and cleared none
    assert [(e["gateway_id"], e["reason"]) for e in dropped] == [(back, "superseded")]
    assert sorted(body["gatewayId"] for _, body, _ in alerts) == silent
    assert standin.statuses(back) == ["online", "online"]  # its offline was superseded
    for name in gone:
        assert standin.transitions(name) == ["online", "offline"], name
    for name in live:
        assert standin.statuses(name) == ["online"], name
    for name in silent + live:
        seen = [dt.datetime.fromisoformat(at) for _, _, at in standin.updates(name)]
        assert seen == sorted(seen), (name, standin.updates(name))
    assert telemetry_rows(conninfo) == sent
