"""Small helpers shared by the devstack modules: errors, ports, deadlines."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path


class DevstackError(RuntimeError):
    """A throwaway server could not be made, started or stopped."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, then release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, step: float = 0.05) -> None:
    """Call `check` until it returns True; raise DevstackError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() >= deadline:
            raise DevstackError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def port_accepts(host: str, port: int) -> bool:
    """True if a TCP connection to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages ('' if unreadable)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` so the child gets SIGTERM when this process dies (Linux only).

    Keeps a killed test run from leaving servers behind. Linux delivers the signal
    when the *thread* that forked exits, so this is only offered on the main
    thread (a server started from a worker thread, e.g. `trio.to_thread`, would
    otherwise die with that thread); elsewhere it returns None.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def preexec() -> None:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            return
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return preexec
