"""Running the daemon inside a Trio test, and waiting on real state.

Shared by the in-process integration tests. The daemon stops through its
`stop` event (what SIGTERM does), so the drain path runs at the end of each test.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from notip_trio.app import run_daemon
from notip_trio.config import Settings, load_settings
from notip_trio.metrics import Metrics

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


async def until(check: Callable[[], bool], limit_s: float, what: str) -> None:
    """Poll real state (in a thread) until `check` holds; fail after `limit_s`."""
    with trio.move_on_after(limit_s):
        while not await trio.to_thread.run_sync(check):  # noqa: ASYNC110 - external state
            await trio.sleep(0.1)
        return
    pytest.fail(f"timed out after {limit_s} s waiting for {what}")
