"""The management-API stand-in as its own process, and what it received.

The stand-in appends every get-status and update-status request it receives to
a JSON-lines file (`--record`); `Standin` reads that file back, so a test sees
exactly what the management API was told, in order.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from devstack.mgmt_standin import spawn_standin
from devstack.natsd import NatsServer
from notip_trio.mgmt import SUBJECT_GET_STATUS, SUBJECT_UPDATE_STATUS

Key = tuple[str, str]
STANDIN_READY_S = 30.0


def fold_repeats(statuses: list[str]) -> list[str]:
    """Consecutive repeats folded: online, online, offline → online, offline."""
    out: list[str] = []
    for status in statuses:
        if not out or out[-1] != status:
            out.append(status)
    return out


@dataclass(frozen=True)
class Standin:
    """What the stand-in process received, read back from its record file."""

    record: Path

    def requests(self, subject: str) -> list[dict[str, Any]]:
        try:
            text = self.record.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        # The last piece may be a line still being written: only whole lines count.
        entries = [json.loads(line) for line in text.split("\n")[:-1]]
        return [e["request"] for e in entries if e["subject"] == subject]

    def updates(self, gateway_id: str | None = None) -> list[tuple[str, str, str]]:
        """(gateway_id, status, last_seen_at) of each update-status, in arrival order."""
        return [
            (u["gateway_id"], u["status"], u["last_seen_at"])
            for u in self.requests(SUBJECT_UPDATE_STATUS)
            if gateway_id is None or u["gateway_id"] == gateway_id
        ]

    def statuses(self, gateway_id: str) -> list[str]:
        return [status for _, status, _ in self.updates(gateway_id)]

    def transitions(self, gateway_id: str) -> list[str]:
        """`statuses` with back-to-back repeats folded: an update is sent at least
        once, so one a new leader sent again shows twice."""
        return fold_repeats(self.statuses(gateway_id))

    def status_queries(self, gateway_id: str) -> int:
        return sum(r["gateway_id"] == gateway_id for r in self.requests(SUBJECT_GET_STATUS))


@asynccontextmanager
async def running_standin(
    server: NatsServer,
    workdir: Path,
    *,
    configs: list[dict[str, Any]] | None = None,
    paused: Iterable[Key] = (),
    invalid_status: Iterable[Key] = (),
    delay_ms: int = 0,
) -> AsyncIterator[Standin]:
    """The stand-in as its own process ("mgmt-api") until the block ends;
    `delay_ms` delays every reply."""
    standin = Standin(workdir / "mgmt-requests.jsonl")
    child = await trio.to_thread.run_sync(
        functools.partial(
            spawn_standin,
            server,
            workdir / "mgmt-standin.log",
            configs=configs or [],
            paused=paused,
            invalid_status=invalid_status,
            record=standin.record,
            delay_ms=delay_ms,
            timeout_s=STANDIN_READY_S,
        )
    )
    try:
        yield standin
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(child.stop, 5.0)
