"""Status updates from the outbox: every transition reported, in order, at least once.

Liveness decides *that* a gateway went online or offline; the transition and
its report commit together (`livestate.py`: the report is a row of
`gateway_status_outbox`). The dispatcher runs on the leader only, beside the
ticks: it reads the oldest pending reports (at most `batch`, i.e.
GATEWAY_BUFFER_SIZE, in memory at once), sends each with update-status in
queue order, and deletes the delivered ones. So nothing the leader decided is
lost when it dies, and a full queue only delays an update:

- a new leader sends what its predecessor left pending, first thing;
- a leader that loses the lock is cancelled before it lets go of it (`leader.py`),
  so two leaders never send at once; an update sent but not yet deleted when
  it dies is sent again by the next (at least once);
- an update that fails after the client's own retries (no answer, no
  responders) stays queued: the dispatcher stops the round there, so nothing
  behind it overtakes it, and tries again after a back-off (1 s doubling to
  30 s), counted in `status_update_errors`;
- an update the management API answers but refuses (`success: false`, an
  invalid reply) is given up for good, as is a report `superseded` by a newer
  transition reported without the outbox (a release before it): both counted
  in `status_update_dropped`, with the reason in the log. An older update is
  never sent after a newer one.

Shutdown: `drain(deadline)` waits (bounded) until the outbox is empty before
the task tree stops leading; what is left is sent by the next leader.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final, NoReturn, Protocol

import trio

from .errors import DatabaseError, MgmtError
from .livestate import Report, Reports
from .log import get_logger
from .metrics import Metrics
from .mgmt import ReportedStatus

log = get_logger(__name__)

BACKOFF_INITIAL_S: Final = 1.0
BACKOFF_MAX_S: Final = 30.0
# Delivered reports are deleted in groups of this many (and at the end of a round).
CLEAR_EVERY: Final = 100


class StatusUpdater(Protocol):
    async def update_status(
        self, gateway_id: str, status: ReportedStatus, last_seen_at: datetime
    ) -> None:
        """Deliver one update; raises MgmtError when it finally fails."""
        ...


class ReportStore(Protocol):
    async def pending_reports(self, limit: int) -> Reports: ...

    async def clear_reports(self, ids: Sequence[int]) -> None: ...


class Dispatcher:
    """Sender of the outbox; `run` is its task on the leader."""

    def __init__(
        self,
        store: ReportStore,
        updater: StatusUpdater,
        metrics: Metrics,
        *,
        batch: int,
        poll_s: float,
    ) -> None:
        self._store = store
        self._updater = updater
        self._metrics = metrics
        self._batch = batch
        self._poll_s = poll_s
        self._wake = trio.Event()
        self._empty = trio.Event()  # set when a read found the outbox empty
        self._running = False
        self._pending = 0  # as the last read found it
        metrics.dispatch_queue_capacity.set(batch)

    def wake(self) -> None:
        """New reports were committed: read the outbox now. Never blocks."""
        self._wake.set()

    async def drain(self, deadline: float) -> None:
        """Wait until the outbox was found empty, or `deadline` (Trio time).

        Returns at once where no dispatcher runs (a follower)."""
        if not self._running:
            return
        self._empty = trio.Event()
        self.wake()
        with trio.move_on_at(deadline) as scope:
            await self._empty.wait()
        if scope.cancelled_caught:
            # Left in the outbox: the next leader sends them.
            log.warning("status_updates_drain_timeout", left=self._pending)
        else:
            log.info("status_updates_drained")

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Send pending reports until cancelled (when leading ends). Ready at once."""
        self._running = True
        backoff = 0.0
        reading_failed = False
        task_status.started()
        try:
            while True:
                self._wake = trio.Event()  # a wake during this round starts another
                try:
                    pending = await self._store.pending_reports(self._batch)
                except DatabaseError as exc:
                    if not reading_failed:
                        log.warning("status_outbox_read_failed", error=str(exc)[:300])
                    reading_failed = True
                    await trio.sleep(self._poll_s)
                    continue
                reading_failed = False
                self._pending = pending.pending
                self._metrics.dispatch_queue_length.set(pending.pending)
                if not pending.reports:
                    self._empty.set()
                    with trio.move_on_after(self._poll_s):
                        await self._wake.wait()
                    continue
                if await self._send(pending.reports):
                    if backoff:
                        log.info("status_updates_resumed")
                    backoff = 0.0
                    continue
                backoff = min(max(2 * backoff, BACKOFF_INITIAL_S), BACKOFF_MAX_S)
                log.warning("status_updates_paused", retry_in_s=backoff, pending=pending.pending)
                await trio.sleep(backoff)
        finally:
            self._running = False
            self._metrics.dispatch_queue_length.set(0)

    async def _send(self, reports: Sequence[Report]) -> bool:
        """Send in order, clearing what is done; False at the first update that
        could not be delivered (it and those behind it stay queued)."""
        done: list[int] = []
        ok = True
        try:
            for report in reports:
                if report.superseded:
                    self._give_up(report, "superseded", "a newer transition was reported")
                elif not await self._deliver(report):
                    ok = False
                    break
                done.append(report.id)
                if len(done) >= CLEAR_EVERY:
                    await self._clear(done)
                    done = []
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                await self._clear(done)
        return ok

    async def _deliver(self, report: Report) -> bool:
        tenant_id, gateway_id = report.key
        try:
            await self._updater.update_status(gateway_id, report.status, report.last_seen)
        except MgmtError as exc:
            self._metrics.status_update_errors.inc()
            if exc.refused:
                self._give_up(report, "refused", str(exc))
                return True
            log.warning(
                "status_update_failed",
                tenant_id=tenant_id,
                gateway_id=gateway_id,
                status=report.status,
                error=str(exc),
            )
            return False
        self._metrics.status_updates_sent.inc()
        log.debug(
            "status_update_sent", tenant_id=tenant_id, gateway_id=gateway_id, status=report.status
        )
        return True

    def _give_up(self, report: Report, reason: str, detail: str) -> None:
        self._metrics.status_update_dropped.inc()
        log.warning(
            "status_update_dropped",
            reason=reason,
            detail=detail[:300],
            tenant_id=report.key[0],
            gateway_id=report.key[1],
            status=report.status,
        )

    async def _clear(self, ids: list[int]) -> None:
        if not ids:
            return
        try:
            await self._store.clear_reports(ids)
        except DatabaseError as exc:
            # Delivered but still queued: the next round sends them again (at least once).
            log.warning("status_outbox_clear_failed", error=str(exc)[:300], reports=len(ids))
