"""All the preflight's checks in order, printed one line each."""

from __future__ import annotations

# trio_asyncio must be imported before psycopg (docs/pitfalls.md).
import trio_asyncio  # isort: split

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

import trio

from ..config import Settings
from .database import check_database
from .nats import check_nats
from .result import Emit, Result


def run_check(settings: Settings, out: TextIO | None = None) -> int:
    """Run every check, print one line each to `out` (stdout); return the exit code."""
    stream = out if out is not None else sys.stdout
    failed = False

    def emit(result: Result) -> None:
        nonlocal failed
        failed = failed or result.status == "FAILED"
        print(result.line(), file=stream, flush=True)

    with _quiet_logs():
        trio.run(check_all, settings, emit)
    return 1 if failed else 0


@contextmanager
def _quiet_logs() -> Iterator[None]:
    # The lines are the report; the daemon's warnings (nats_error, ...) would only
    # repeat them, and unconfigured logging would print them without context.
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


async def check_all(settings: Settings, emit: Emit) -> None:
    emit(
        Result(
            "ok",
            "configuration",
            f"loaded (NATS {settings.nats_url}, PostgreSQL {settings.db_host}:"
            f"{settings.db_port}/{settings.db_name} as {settings.db_user})",
        )
    )
    async with trio_asyncio.open_loop():
        await check_nats(settings, emit)
    await check_database(settings, emit)
