"""The daemon as a real process (`python -m notip_trio`) for tests.

`spawn_daemon(env, log_path)` starts it with exactly the variables of `env`
(every daemon variable inherited from the test's own environment is dropped
first), stdout and stderr each in a file (no pipe to fill up), and kills it on
exit from the `with` block if it is still running, so a failed test never leaves
one behind. On Linux the child also gets SIGTERM if the test process dies
(`die_with_parent`). HTTP and log helpers read what an operator would see.

Blocking helpers take their own timeouts; from Trio call them through
`trio.to_thread.run_sync`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from devstack._common import die_with_parent
from devstack.natsd import NatsServer

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Everything notip_trio.config reads (SPEC.md names and our own additions).
_DAEMON_VAR_PREFIXES = (
    "NATS_",
    "DB_",
    "GATEWAY_",
    "HEARTBEAT_",
    "ALERT_CONFIG_",
    "METRICS_",
    "TELEMETRY_",
    "REJECTED_",
    "LIVENESS_",
    "SHUTDOWN_",
    "LOG_LEVEL",
)


def process_env(env: dict[str, str]) -> dict[str, str]:
    """os.environ without any daemon variable, then `env` on top."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(_DAEMON_VAR_PREFIXES)}
    return {**base, **env}


@dataclass(eq=False)
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    metrics_url: str
    signalled_at: float | None = None  # time.monotonic() of the last `signal()`

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        self.signalled_at = time.monotonic()
        self.proc.send_signal(sig)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

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

    async def wait_ready(self, limit_s: float = 60.0) -> None:
        """Poll /readyz until 200; fail with the log tail if it exits or takes too long."""
        with trio.move_on_after(limit_s):
            while True:
                if not self.running:
                    raise AssertionError(
                        f"daemon exited with {self.proc.returncode} before ready:\n{self.tail()}"
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
            while (code := self.proc.poll()) is None:  # noqa: ASYNC110 - a child process
                await trio.sleep(0.01)
            return code, time.monotonic() - since
        raise AssertionError(f"daemon still running after {limit_s} s:\n{self.tail()}")


def _popen(args: list[str], env: dict[str, str], out: Path, err: Path) -> subprocess.Popen[bytes]:
    # Started from the calling (main) thread: die_with_parent() binds to it.
    with out.open("wb") as stdout, err.open("wb") as stderr:
        return subprocess.Popen(
            args,
            env=process_env(env),
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=die_with_parent(),
        )


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


@contextmanager
def spawn_daemon(env: dict[str, str], log_path: Path) -> Iterator[DaemonProcess]:
    """Run `python -m notip_trio` with `env` (from daemon_env); kill it on exit."""
    proc = _popen(
        [sys.executable, "-m", "notip_trio"], env, log_path.with_suffix(".stdout"), log_path
    )
    host, _, port = env["METRICS_ADDR"].rpartition(":")
    try:
        yield DaemonProcess(proc, log_path, f"http://{host or '127.0.0.1'}:{port}")
    finally:
        _reap(proc)


@contextmanager
def spawn_mgmt_standin(nats: NatsServer, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The management-API stand-in as its own process; yields once it answers."""
    client = nats.client("mgmt-api")
    args = [sys.executable, "-m", "devstack.mgmt_standin", "--url", nats.url]
    args += ["--ca", str(client.ca), "--cert", str(client.cert), "--key", str(client.key)]
    proc = _popen(args, {}, log_path.with_suffix(".stdout"), log_path)
    try:
        deadline = time.monotonic() + 30
        while "mgmt_standin_ready" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mgmt stand-in did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        _reap(proc)


def run_nats(server: NatsServer, fn: Callable[[Any], Any], name: str = "test-client") -> Any:
    """Run `await fn(nc)` on a fresh nats-py client in a plain asyncio loop (blocking)."""

    async def main() -> Any:
        nc = await server.connect(name, allow_reconnect=False)
        try:
            async with asyncio.timeout(120):
                return await fn(nc)
        finally:
            await nc.close()

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main())


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
