"""Decommission listener (docs/contract.md Behaviour 4).

Each message on `gateway.decommissioned.{tenant}.{gateway}` removes that
gateway from liveness tracking (a tombstone in the state table, written by
whichever replica receives it; the leader forgets the gateway at its next
read); the subject is authoritative and the body is not read. While the
database cannot be written, the batch is nak'ed with a delay and comes back.
A subject of any other shape can never become valid by redelivery: it is
terminated, counted (`decommission_rejected`) and logged once.
"""

from __future__ import annotations

import datetime as dt
from typing import Final, Protocol

import trio

from .errors import DatabaseError
from .js.bridge import Acker
from .js.delivery import JsMsg
from .log import get_logger
from .metrics import Metrics
from .wire import parse_decommission_subject

log = get_logger(__name__)


NAK_DELAY_S: Final = 5.0
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class Forgetful(Protocol):
    async def decommission(self, key: tuple[str, str], at: dt.datetime) -> bool:
        """Stop tracking the gateway as of `at`; False if it was not tracked.
        DatabaseError on failure."""
        ...


async def run_decommission(
    batches: trio.MemoryReceiveChannel[list[JsMsg]],
    acker: Acker,
    tracker: Forgetful,
    metrics: Metrics,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Handle decommission batches until `batches` closes (or cancellation).

    Ready at once (the pull feeding `batches` is the caller's). A message is
    acked only after the gateway has been removed; removal is idempotent, so a
    redelivery is harmless.
    """
    task_status.started()
    async for batch in batches:
        done: list[JsMsg] = []
        rejected: list[JsMsg] = []
        for i, msg in enumerate(batch):
            ids = parse_decommission_subject(msg.subject)
            if ids is None:
                rejected.append(msg)
                log.warning("decommission_rejected", subject=msg.subject, reason="bad_subject")
                continue
            tenant_id, gateway_id = ids
            delivery = msg.delivery
            at = (
                _EPOCH + dt.timedelta(microseconds=delivery.timestamp_ns // 1000)
                if delivery is not None
                else dt.datetime.now(dt.UTC)
            )
            try:
                tracked = await tracker.decommission((tenant_id, gateway_id), at)
            except DatabaseError as exc:
                log.warning("decommission_deferred", error=str(exc)[:300], retry_in_s=NAK_DELAY_S)
                await acker.nak(batch[i:], delay_s=NAK_DELAY_S)
                break
            log.info(
                "gateway_decommissioned",
                tenant_id=tenant_id,
                gateway_id=gateway_id,
                was_tracked=tracked,
            )
            done.append(msg)
        if rejected:
            metrics.decommission_rejected.inc(len(rejected))
            await acker.term(rejected)
        if done:
            metrics.gateways_decommissioned.inc(len(done))
            await acker.ack(done)
