"""Test support, as pytest plugins (tests/fix_*.py), in the style of psycopg's:

- fix_servers: real, throwaway nats-server and PostgreSQL (and the CI rule: a
  missing server fails under CI=true instead of skipping); `DURABLE`,
  `telemetry_rows`, `drained`.
- fix_relay: a TCP relay (devstack.relay) in front of PostgreSQL or NATS, to
  freeze or slow a connection.
- fix_daemon: the daemon in the test's nursery or as its own process, and
  `until` to wait on real state.

Fakes stay plain modules (ingest_fakes.py, liveness_fakes.py).
"""

from __future__ import annotations

# trio_asyncio must be imported before psycopg (NOTES.md).
import trio_asyncio  # isort: split

from collections.abc import AsyncIterator

import pytest

pytest_plugins = ["tests.fix_servers", "tests.fix_relay", "tests.fix_daemon"]


@pytest.fixture
async def aio_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    """A trio_asyncio loop open around the (trio) test."""
    async with trio_asyncio.open_loop() as loop:
        yield loop
