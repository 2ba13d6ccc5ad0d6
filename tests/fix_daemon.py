"""pytest plugin: the daemon under test, in the test's nursery or as its own
process, and waiting on real state.

In process (the integration tests): `daemon_settings(env, monkeypatch)` gives
Settings from exactly `env`; `running_daemon(settings, metrics)` runs the daemon
in the test's nursery and stops it through its `stop` event (what SIGTERM
does), so the drain path runs at the end of each test.

As a process (`python -m notip_trio`): `spawn_daemon(env, log_path)` starts it
through the toolkit's one process wrapper (`devstack.proc.Child`): exactly the
variables of `env` (every daemon variable inherited from the test's own
environment is dropped first), output in a log file (no pipe to fill up), killed
on exit from the `with` block if it is still running, and SIGTERM'd if the test
process dies. HTTP and log helpers read what an operator would see. Blocking
helpers take their own timeouts; from Trio call them through
`trio.to_thread.run_sync`.

`until(check, limit_s, what)` polls real state (a blocking check, in a thread)
with a deadline: the one way the integration tests wait.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from devstack.env import daemon_env
from devstack.natsd import NatsServer
from devstack.postgres import PgDatabase, PgServer
from devstack.proc import Child, python_module
from notip_trio.app import run_daemon
from notip_trio.config import Settings, load_settings
from notip_trio.metrics import Metrics


async def until(check: Callable[[], bool], limit_s: float, what: str) -> None:
    """Poll real state (`check`, blocking, in a thread) until it holds; fail after `limit_s`."""
    with trio.move_on_after(limit_s):
        while not await trio.to_thread.run_sync(check):  # noqa: ASYNC110 - external state
            await trio.sleep(0.1)
        return
    pytest.fail(f"timed out after {limit_s} s waiting for {what}")


# --- in process -------------------------------------------------------------------

_OURS = (
    "NATS_",
    "DB_",
    "HEARTBEAT_",
    "TELEMETRY_",
    "ALERT_CONFIG_",
    "GATEWAY_",
    "LIVENESS_",
    "SHUTDOWN_",
    "METRICS_",
)


def daemon_settings(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, **overrides: str
) -> Settings:
    """Settings from exactly `env` + `overrides` (nothing inherited from the shell)."""
    for key in [k for k in os.environ if k.startswith(_OURS)]:
        monkeypatch.delenv(key)
    for key, value in {**env, **overrides}.items():
        monkeypatch.setenv(key, value)
    return load_settings()


@asynccontextmanager
async def running_daemon(settings: Settings, metrics: Metrics) -> AsyncIterator[int]:
    """The daemon in this test's nursery; yields the metrics port."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(run_daemon, settings, metrics, stop)
        try:
            yield port
        finally:
            stop.set()


# --- as a process -----------------------------------------------------------------


@dataclass(eq=False)
class DaemonProcess:
    child: Child
    metrics_url: str
    signalled_at: float | None = None  # time.monotonic() of the last `signal()`

    @property
    def running(self) -> bool:
        return self.child.running

    @property
    def returncode(self) -> int | None:
        return self.child.returncode

    def signal(self, sig: signal.Signals) -> None:
        self.signalled_at = time.monotonic()
        self.child.proc.send_signal(sig)

    def log_text(self) -> str:
        return self.child.log_text()

    def log_lines(self) -> list[str]:
        return [line for line in self.log_text().splitlines() if line.strip()]

    def json_logs(self) -> list[dict[str, Any]]:
        """Every stderr line as a JSON object; fails the test on a line that is not."""
        out = []
        for line in self.log_lines():
            try:
                obj = json.loads(line)
            except ValueError:
                raise AssertionError(f"stderr line is not JSON: {line!r}") from None
            assert isinstance(obj, dict), line
            assert {"time", "level", "event"} <= obj.keys(), line
            out.append(obj)
        return out

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_lines()[-lines:])

    def get(self, path: str) -> tuple[int, str]:
        """(status, body) of GET `path` on the metrics server; raises OSError if unreachable."""
        try:
            with urllib.request.urlopen(self.metrics_url + path, timeout=5) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def try_get(self, path: str) -> tuple[int, str] | None:
        """Like `get`, but None while nothing answers (not yet listening)."""
        try:
            return self.get(path)
        except (urllib.error.URLError, OSError):
            return None

    def metric(self, name: str) -> float:
        """A sample of /metrics by its full name (no labels); NaN while nothing answers."""
        answer = self.try_get("/metrics")
        if answer is None or answer[0] != 200:
            return float("nan")
        for line in answer[1].splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not on /metrics")

    async def sigkill(self) -> None:
        """SIGKILL it and wait for it to be gone (exit code -9 asserted)."""
        self.signal(signal.SIGKILL)
        code, _ = await self.wait_exit(10)
        assert code == -signal.SIGKILL, code

    async def wait_ready(self, limit_s: float = 60.0) -> None:
        """Poll /readyz until 200; fail with the log tail if it exits or takes too long."""
        with trio.move_on_after(limit_s):
            while True:
                if not self.running:
                    raise AssertionError(
                        f"daemon exited with {self.returncode} before ready:\n{self.tail()}"
                    )
                answer = await trio.to_thread.run_sync(self.try_get, "/readyz")
                if answer is not None and answer[0] == 200:
                    return
                await trio.sleep(0.1)
        raise AssertionError(f"daemon not ready within {limit_s} s:\n{self.tail()}")

    async def wait_exit(self, limit_s: float) -> tuple[int, float]:
        """(exit code, seconds from the last `signal()` or from now) once it exits.

        Polls every 10 ms, so the figure is at most that much late. Fails with
        the log tail after `limit_s`; teardown then kills the process.
        """
        since = self.signalled_at if self.signalled_at is not None else time.monotonic()
        with trio.move_on_after(limit_s):
            while (code := self.child.returncode) is None:  # noqa: ASYNC110 - a child process
                await trio.sleep(0.01)
            return code, time.monotonic() - since
        raise AssertionError(f"daemon still running after {limit_s} s:\n{self.tail()}")


def liveness_env(
    nats: NatsServer, pg: PgServer, db: PgDatabase, **overrides: str
) -> dict[str, str]:
    """The daemon's environment for the real-process liveness tests: 250 ms ticks,
    no grace period, a default timeout long enough that a test whose alert config
    was not applied fails instead of passing; a fresh metrics port each call."""
    return daemon_env(
        nats,
        pg,
        db.name,
        **{
            "HEARTBEAT_TICK_MS": "250",
            "HEARTBEAT_GRACE_PERIOD_MS": "0",
            "ALERT_CONFIG_DEFAULT_TIMEOUT_MS": "600000",
            "ALERT_CONFIG_REFRESH_MS": "600000",
            "SHUTDOWN_DRAIN_MS": "5000",
        }
        | overrides,
    )


@contextmanager
def spawn_daemon(env: dict[str, str], log_path: Path) -> Iterator[DaemonProcess]:
    """Run `python -m notip_trio` with `env` (from daemon_env); kill it on exit."""
    child = Child.spawn("daemon", python_module("notip_trio"), log_path, env=env)
    host, _, port = env["METRICS_ADDR"].rpartition(":")
    try:
        yield DaemonProcess(child, f"http://{host or '127.0.0.1'}:{port}")
    finally:
        child.stop(grace_s=5, sig=signal.SIGKILL)


def assert_logs_clean(daemon: DaemonProcess, secrets: set[str]) -> int:
    """Every stderr line is a JSON object and none contains any of `secrets`.

    Returns the number of lines checked.
    """
    lines = daemon.log_lines()
    daemon.json_logs()
    for line in lines:
        leaked = [s for s in secrets if s in line]
        assert not leaked, f"log line leaks {leaked[:3]}: {line[:300]}"
    return len(lines)
