"""The status-update queue: one bounded FIFO served in order by one worker.

Liveness decides *that* a gateway went online or offline; this module delivers
the decision to the management API (update-status) without ever making the
decider wait. `Dispatcher.submit` is synchronous and never blocks: when the
queue (`GATEWAY_BUFFER_SIZE`) is full the update is dropped and counted
(`status_update_dropped`). One worker sends the updates in submission order,
so an `offline` followed by an `online` for the same gateway arrives in that
order. A failed update (after the client's own retries) is counted
(`status_update_errors`) and not retried again: the next transition of that
gateway sends a fresh one.

Shutdown: `close()` ends the input. The worker then sends what is still queued,
for at most `drain_s` after the close, and never past a deadline the task tree
may set beforehand (`drain_by`, the daemon's one shutdown budget); whatever is
left when that time is up is counted as dropped and logged with its number.
This module is the only owner of that bound and that count.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import trio

from .errors import MgmtError
from .log import get_logger
from .metrics import Metrics
from .mgmt import ReportedStatus

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    tenant_id: str  # for logs; update-status itself carries no tenant
    gateway_id: str
    status: ReportedStatus
    last_seen_at: datetime


class StatusUpdater(Protocol):
    async def update_status(
        self, gateway_id: str, status: ReportedStatus, last_seen_at: datetime
    ) -> None:
        """Deliver one update; raises MgmtError when it finally fails."""
        ...


class Dispatcher:
    """Owner of the status-update queue; `run` is its worker task."""

    def __init__(
        self, updater: StatusUpdater, metrics: Metrics, *, capacity: int, drain_s: float
    ) -> None:
        self._updater = updater
        self._metrics = metrics
        self._capacity = capacity
        self._drain_s = drain_s
        self._send, self._receive = trio.open_memory_channel[StatusUpdate](capacity)
        self._closed = trio.Event()
        self._worker = trio.CancelScope()
        self._drain_deadline = float("inf")  # the latest the drain may end (drain_by)
        self._dropping = 0  # drops in the current overflow episode (for the log)
        metrics.dispatch_queue_capacity.set(self._capacity)

    def submit(self, update: StatusUpdate) -> bool:
        """Queue `update` without blocking; False (and counted) if it was dropped."""
        try:
            self._send.send_nowait(update)
        except trio.WouldBlock:
            reason = "queue_full"
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            reason = "closed"
        else:
            if self._dropping:
                log.info("status_update_queue_recovered", dropped=self._dropping)
                self._dropping = 0
            self._set_gauge()
            return True
        self._metrics.status_update_dropped.inc()
        if not self._dropping:
            # Once per overflow episode: a flood must not turn into a flood of logs.
            log.warning(
                "status_update_dropped",
                reason=reason,
                tenant_id=update.tenant_id,
                gateway_id=update.gateway_id,
                status=update.status,
                capacity=self._capacity,
            )
        self._dropping += 1
        return False

    def close(self) -> None:
        """End the input: the worker drains the queue (bounded) and returns. Idempotent."""
        self._send.close()
        self._closed.set()

    def drain_by(self, deadline: float) -> None:
        """The drain after `close()` ends by `deadline` (Trio time) at the latest."""
        self._drain_deadline = min(self._drain_deadline, deadline)
        if self._closed.is_set():
            self._worker.deadline = min(self._worker.deadline, deadline)

    def queued(self) -> int:
        return self._receive.statistics().current_buffer_used

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send queued updates in order until `close()`, then drain within the bound.

        Returns after the drain (complete or timed out). Ready at once.
        """
        in_flight = 0
        left = 0
        worker = self._worker
        async with trio.open_nursery() as nursery:

            async def arm_drain_deadline() -> None:
                # The deadline starts when the input closes, not when the
                # worker next looks: it may be deep in a retrying request.
                await self._closed.wait()
                end = min(trio.current_time() + self._drain_s, self._drain_deadline)
                worker.deadline = min(worker.deadline, end)

            nursery.start_soon(arm_drain_deadline)
            task_status.started()
            with worker:
                async with self._receive:
                    try:
                        async for update in self._receive:
                            self._set_gauge()
                            in_flight = 1
                            await self._deliver(update)
                            in_flight = 0
                    finally:
                        # Count before the channel closes: closing discards the buffer.
                        left = in_flight + self.queued()
            nursery.cancel_scope.cancel()

        if worker.cancelled_caught and left:
            self._metrics.status_update_dropped.inc(left)
            log.warning("status_updates_drain_timeout", left=left, drain_s=self._drain_s)
        else:
            log.info("status_updates_drained")
        self._metrics.dispatch_queue_length.set(0)

    async def _deliver(self, update: StatusUpdate) -> None:
        try:
            await self._updater.update_status(update.gateway_id, update.status, update.last_seen_at)
        except MgmtError as exc:
            self._metrics.status_update_errors.inc()
            log.warning(
                "status_update_failed",
                tenant_id=update.tenant_id,
                gateway_id=update.gateway_id,
                status=update.status,
                error=str(exc),
            )
        else:
            log.debug(
                "status_update_sent",
                tenant_id=update.tenant_id,
                gateway_id=update.gateway_id,
                status=update.status,
            )

    def _set_gauge(self) -> None:
        self._metrics.dispatch_queue_length.set(self.queued())
