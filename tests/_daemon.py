"""The daemon as a real process (`python -m notip_trio`) for tests.

`spawn_daemon(env, log_path)` starts it through the toolkit's one process
wrapper (`devstack.proc.Child`): exactly the variables of `env` (every daemon
variable inherited from the test's own environment is dropped first), output in
a log file (no pipe to fill up), killed on exit from the `with` block if it is
still running, and SIGTERM'd if the test process dies. HTTP and log helpers
read what an operator would see.

Blocking helpers take their own timeouts; from Trio call them through
`trio.to_thread.run_sync`.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from devstack.proc import Child, python_module


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
