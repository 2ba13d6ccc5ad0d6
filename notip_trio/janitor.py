"""The leader's janitor: nothing the daemon keeps grows for ever (docs/operations.md: Retention).

While this replica leads (`app._Parts.lead`), one run every `JANITOR_INTERVAL_S`
(the first `JANITOR_FIRST_RUN_S` after taking over, once the load and the
first ticks are done) deletes, `PURGE_BATCH` rows per statement with
`PURGE_PAUSE_S` between them, so a purge never holds many locks or one long
transaction:

- `gateway_liveness` rows that are offline or decommission tombstones, whose
  last transition and last message are both older than LIVENESS_RETENTION.
  The tracker forgets them too (`forget`). A purged gateway that sends again
  is *first seen*: a new row, reported `online` like a gateway never heard
  before (`gateway_first_seen`, not `gateway_back_online`). The status outbox
  is not touched: a report still pending is sent as it is.
- `telemetry_rejected` rows received more than REJECTED_RETENTION ago.

A retention of 0 keeps those rows for ever. A database error ends the run
(logged and counted); the next run starts over. Each run is logged with what
it deleted and counted in `notip_purged_rows_total{table}`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final, NoReturn

import trio

from .errors import DatabaseError
from .lanes import Key
from .livestate import PURGE_BATCH, Purger
from .log import get_logger
from .metrics import Metrics

log = get_logger(__name__)

JANITOR_INTERVAL_S: Final = 3600.0
JANITOR_FIRST_RUN_S: Final = 60.0
PURGE_PAUSE_S: Final = 0.1


@dataclass(frozen=True, slots=True)
class Purged:
    retired: int  # offline rows and tombstones deleted from gateway_liveness
    rejected: int  # rows deleted from telemetry_rejected


async def purge_once(
    purger: Purger,
    metrics: Metrics,
    *,
    liveness_retention_s: float,
    rejected_retention_s: float,
    forget: Callable[[Iterable[Key]], object],
    batch: int = PURGE_BATCH,
    pause_s: float = PURGE_PAUSE_S,
) -> Purged:
    """One run: batches until a batch comes back short; DatabaseError ends it."""

    async def drain(table: str, step: Callable[[], Awaitable[int]]) -> int:
        total = 0
        while True:
            n = await step()
            total += n
            metrics.purged_rows.labels(table).inc(n)
            if n < batch:
                return total
            await trio.sleep(pause_s)

    async def retired() -> int:
        rows = await purger.purge_retired(liveness_retention_s, batch)
        forget(key for key, _ in rows)
        return len(rows)

    async def rejected() -> int:
        return await purger.purge_rejected(rejected_retention_s, batch)

    return Purged(
        await drain("gateway_liveness", retired) if liveness_retention_s > 0 else 0,
        await drain("telemetry_rejected", rejected) if rejected_retention_s > 0 else 0,
    )


async def run_janitor(
    purger: Purger,
    metrics: Metrics,
    *,
    liveness_retention_s: float,
    rejected_retention_s: float,
    forget: Callable[[Iterable[Key]], object],
    interval_s: float = JANITOR_INTERVAL_S,
    first_run_s: float = JANITOR_FIRST_RUN_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Purge on schedule until cancelled (when leadership ends); never returns."""
    task_status.started()
    await trio.sleep(first_run_s)
    while True:
        t0 = trio.current_time()
        try:
            purged = await purge_once(
                purger,
                metrics,
                liveness_retention_s=liveness_retention_s,
                rejected_retention_s=rejected_retention_s,
                forget=forget,
            )
        except DatabaseError as exc:
            metrics.janitor_errors.inc()
            log.warning("janitor_run_failed", error=str(exc)[:300], retry_in_s=interval_s)
        else:
            log.info(
                "janitor_run",
                retired_gateways=purged.retired,
                rejected_messages=purged.rejected,
                seconds=round(trio.current_time() - t0, 3),
            )
        await trio.sleep(interval_s)
