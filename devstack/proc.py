"""Child processes for tests, the benchmark and the dev stack: the toolkit's one wrapper.

- `python_module(module, *args)` is the argv of `python -m module` in this
  interpreter; `child_env(env)` is this environment without any of the daemon's
  variables (`notip_trio.config.ENV_VARS`, so nothing leaks from the shell),
  with `env` on top and this checkout on PYTHONPATH (devstack/ and benchmarks/
  are not installed).
- `Child` runs a command in a new session (so a terminal's Ctrl-C does not reach
  it behind our back), with its output in a log file, and stops it by signalling
  its whole process group: SIGTERM, a bounded wait, then SIGKILL. The child also
  gets SIGTERM if this process dies (`die_with_parent`).
- `run_supervised` re-runs a command in a new session and forwards SIGINT,
  SIGTERM and SIGHUP to it. The stack runs under it, so that a
  Ctrl-C reaches only the stack, which then stops its children in its own order
  (servers such as nats-server would otherwise stop at once with the terminal's
  process group).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from devstack._common import DevstackError, die_with_parent, log_tail, wait_until
from notip_trio.config import ENV_VARS

_SUPERVISED_STOP_S = 60.0  # the stack stops its children in order within this
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def python_module(module: str, *args: str) -> list[str]:
    """argv of `python -m module args...` in this interpreter."""
    return [sys.executable, "-m", module, *args]


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without the daemon's variables, then `env`; this checkout importable."""
    base = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    path = [str(PROJECT_ROOT), *filter(None, base.get("PYTHONPATH", "").split(os.pathsep))]
    base["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    return {**base, **(env or {})}


@dataclass(eq=False)
class Child:
    """One child process (a process-group leader) with its log file.

    As a context manager it is stopped (`stop(grace_s=5)`) on the way out.
    """

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @classmethod
    def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        """Start `argv` in a new session, stdout and stderr appended to `log_path`.

        The environment is `child_env(env)`; the working directory `cwd` or the
        checkout's root.
        """
        log = log_path.open("ab")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(env),
                cwd=cwd if cwd is not None else PROJECT_ROOT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        except BaseException:
            log.close()
            raise
        return cls(name, proc, log_path, log)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(grace_s=5)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_line(self, needle: str, *, timeout_s: float) -> None:
        """Until `needle` appears in the log; DevstackError if the child exits first."""

        def seen() -> bool:
            if needle in self.log_text():
                return True
            if not self.running:
                raise DevstackError(
                    f"{self.name} exited with status {exit_status(self.returncode or 0)} "
                    f"before {needle!r}:\n{self.tail()}"
                )
            return False

        wait_until(seen, timeout=timeout_s, what=f"{needle!r} from {self.name}")

    def stop(self, grace_s: float, sig: signal.Signals = signal.SIGTERM) -> int:
        """Signal the process group, wait up to `grace_s`, then SIGKILL it; return the exit code.

        Idempotent. Whatever is left in the group afterwards is killed too, so
        nothing the child started outlives it.
        """
        pgid = self.proc.pid  # leader of its own session, so pgid == pid
        if self.proc.poll() is None:
            _killpg(pgid, sig)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _killpg(pgid, signal.SIGKILL)
                self.proc.wait()
        _killpg(pgid, signal.SIGKILL)  # stragglers of the group, if any
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def exit_status(returncode: int) -> int:
    """A shell-style exit status: 128 + signal number for a child killed by a signal."""
    return 128 - returncode if returncode < 0 else returncode


def run_supervised(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Run `argv` in a new session, forwarding stop signals to it; return its status."""
    proc = subprocess.Popen(
        list(argv), env=dict(env), start_new_session=True, preexec_fn=die_with_parent()
    )

    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        return exit_status(proc.wait())  # PEP 475: wait() resumes after each handler
    finally:
        if proc.poll() is None:  # only if we are dying of something unexpected
            proc.terminate()
            try:
                proc.wait(timeout=_SUPERVISED_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
