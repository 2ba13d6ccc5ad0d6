"""Decommission listener (SPEC.md Behaviour 4).

Each message on `gateway.decommissioned.{tenant}.{gateway}` removes that
gateway from liveness tracking; the subject is authoritative and the body is
not read. A subject of any other shape can never become valid by redelivery:
it is terminated, counted (`decommission_rejected`) and logged once.
"""

from __future__ import annotations

from typing import Protocol

import trio

from notip_trio.jetstream import Acker, JsMsg
from notip_trio.log import get_logger
from notip_trio.metrics import Metrics
from notip_trio.wire import parse_decommission_subject

log = get_logger(__name__)


class Forgetful(Protocol):
    def remove(self, tenant_id: str, gateway_id: str) -> bool:
        """Stop tracking the gateway; False if it was not tracked."""
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

    Ready at once (the pull feeding `batches` is the caller's). A message is acked only
    after the gateway has been removed; removal is idempotent, so a redelivery
    is harmless.
    """
    task_status.started()
    async for batch in batches:
        done: list[JsMsg] = []
        rejected: list[JsMsg] = []
        for msg in batch:
            ids = parse_decommission_subject(msg.subject)
            if ids is None:
                rejected.append(msg)
                log.warning("decommission_rejected", subject=msg.subject, reason="bad_subject")
                continue
            tenant_id, gateway_id = ids
            tracked = tracker.remove(tenant_id, gateway_id)
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
