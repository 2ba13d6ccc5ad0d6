"""Offline candidates on the leader, in bulk: asked, re-read, alerted, marked offline.

`LivenessTracker.tick` (liveness.py) finds the due gateways; `OfflineAlerts.handle`
deals with them, `BULK_ROWS` (livestate.py) at a time:

- a chunk's get-status queries run concurrently (at most `concurrency` in
  flight) behind a circuit breaker (`breaker.py`): `paused` skips a gateway
  silently and asks it again with back-off (1 min doubling to the alert-config
  refresh interval, not at every tick); any other state, or a failed query
  (fail open), goes on;
- the chunk is then settled while the next one is asked: last-seen is read
  again for the whole chunk in one statement (a message that arrived meanwhile
  cancels the alert), the alerts are published concurrently (PubAcks awaited
  together) with a `Nats-Msg-Id` from (tenant, gateway, last-seen), and only
  the acknowledged ones are marked offline, their reports queued, in one
  statement; only the rows that change report;
- a failed publish leaves the gateway online (the next tick retries with the
  same msg id); a DatabaseError ends every stage at once and is raised.

It changes the tracker's index and offline set it is handed (the tracker owns
them) and calls `changed()` after marking gateways offline.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Final, Protocol, TypeVar

import trio

from .breaker import Breaker
from .errors import DatabaseError, MgmtError, NatsRequestError
from .js.bridge import AlertPublisher
from .lanes import Due, Key, LaneIndex
from .livestate import BULK_ROWS, StateStore
from .log import get_logger
from .metrics import Metrics
from .mgmt import CallGate, GatewayState
from .wire import alert_subject, format_rfc3339, offline_alert_body_of, offline_alert_msg_id_of

log = get_logger(__name__)

# The publisher waits for the PubAck itself; this only keeps a stuck publish
# from holding the tick forever.
PUBLISH_TIMEOUT_S: Final = 10.0
# Alerts in flight at once (their PubAcks are awaited together).
PUBLISH_CONCURRENCY: Final = 256
# Chunks settled at once (re-read, publish, mark offline): one in the database
# while the other publishes.
SETTLE_WORKERS: Final = 2
# A silent paused gateway is asked again after this, then after twice as long
# each time, up to ALERT_CONFIG_REFRESH_MS.
PAUSED_RECHECK_FIRST_S: Final = 60.0
# Gateways named in a chunk's `offline_alerts_published` line (the first ones).
LOG_GATEWAYS: Final = 10

T = TypeVar("T")
R = TypeVar("R")
Asked = list[tuple[Due, "GatewayState | None"]]


class StatusQuery(Protocol):
    async def get_status(
        self, tenant_id: str, gateway_id: str, *, gate: CallGate | None = None
    ) -> GatewayState:
        """Lifecycle state; raises MgmtError when it cannot be had (`skipped`:
        ended by the gate)."""
        ...


class StatusSink(Protocol):
    def wake(self) -> None:
        """Reports were queued in the outbox: send them (never blocks)."""
        ...


class OfflineAlerts:
    """The candidates' part of a tick; see the module docstring."""

    def __init__(
        self,
        store: StateStore,
        status: StatusQuery,
        publisher: AlertPublisher,
        sink: StatusSink,
        metrics: Metrics,
        *,
        index: LaneIndex,
        offline: set[Key],
        changed: Callable[[], None],
        concurrency: int,
        paused_recheck_max_s: float,
        wall_clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._status = status
        self._publisher = publisher
        self._sink = sink
        self._metrics = metrics
        self._index = index
        self._offline = offline
        self._changed = changed
        self._concurrency = concurrency
        self._paused_recheck_max_s = paused_recheck_max_s
        self._wall_clock = wall_clock
        self._breaker = Breaker(metrics)
        # Silent paused gateways: (when to ask again, the last delay), Trio time.
        # The tracker drops a gateway from it when it is heard or gone.
        self.paused: dict[Key, tuple[float, float]] = {}

    async def handle(self, candidates: list[Due], t0: float) -> None:
        """Ask, re-read, alert and mark the candidates, `BULK_ROWS` at a time.

        A chunk's get-status queries run concurrently (at most `concurrency` in
        flight, the breaker in front); then the chunk is settled (`_settle`)
        while the next chunk is asked. A DatabaseError ends every stage at once
        and is raised (one, not a group).
        """
        asks = [c for c in candidates if self._paused_until(c.key) <= t0]
        if len(asks) < len(candidates):
            log.debug("offline_candidates_paused_not_asked", count=len(candidates) - len(asks))
        if not asks:
            return
        self._breaker.next_round()
        failed: list[DatabaseError] = []
        send, receive = trio.open_memory_channel[Asked](1)

        async def ask_chunks(send: trio.MemorySendChannel[Asked]) -> None:
            async with send:
                for i in range(0, len(asks), BULK_ROWS):
                    chunk = asks[i : i + BULK_ROWS]
                    states = await _each(chunk, self._concurrency, self._ask)
                    asked: Asked = []
                    for c, state in zip(chunk, states, strict=True):
                        if state == "paused":
                            self._pause(c.key, t0)
                        else:
                            self.paused.pop(c.key, None)
                            asked.append((c, state))
                    if asked:
                        await send.send(asked)

        async def settle_chunks(
            receive: trio.MemoryReceiveChannel[Asked], scope: trio.CancelScope
        ) -> None:
            async with receive:
                async for asked in receive:
                    try:
                        await self._settle(asked)
                    except DatabaseError as exc:
                        # Every other chunk needs the database too: end the tick
                        # now rather than one deadline per chunk later.
                        failed.append(exc)
                        scope.cancel()
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask_chunks, send)
            for _ in range(SETTLE_WORKERS):
                nursery.start_soon(settle_chunks, receive.clone(), nursery.cancel_scope)
            await receive.aclose()
        if failed:
            raise failed[0]

    async def _ask(self, c: Due) -> GatewayState | None:
        """get-status through the breaker; None when it failed (fail open)."""
        tenant_id, gateway_id = c.key
        try:
            state = await self._status.get_status(tenant_id, gateway_id, gate=self._breaker)
        except MgmtError as exc:
            if exc.skipped:  # the breaker is open: logged once there
                self._metrics.lifecycle_queries_skipped.inc()
                return None
            self._metrics.lifecycle_query_errors.inc()
            log.warning(
                "lifecycle_query_failed_alerting_anyway",
                tenant_id=tenant_id,
                gateway_id=gateway_id,
                error=str(exc),
            )
            return None
        if state == "paused":
            self._metrics.alerts_suppressed_paused.inc()
            log.debug("offline_alert_suppressed_paused", tenant_id=tenant_id, gateway_id=gateway_id)
        return state

    async def _settle(self, asked: Asked) -> None:
        """Re-read last-seen (one statement), publish the alerts of those still
        silent (concurrently, PubAcks awaited together), then mark the acked
        ones offline (one statement; only the winners report)."""
        current = await self._store.current_last_seen_many([c.key for c, _ in asked])
        silent: list[tuple[Due, GatewayState | None, datetime]] = []
        for c, state in asked:
            seen = current.get(c.key)
            if seen is None or seen.timestamp() > c.seen or self._index.seen(c.key) != c.seen:
                if seen is not None:
                    self._index.set(c.key, seen.timestamp(), c.timeout_ms)
                log.info("offline_candidate_heard_again", tenant_id=c.key[0], gateway_id=c.key[1])
                continue
            silent.append((c, state, seen))
        if not silent:
            return
        detected_at = format_rfc3339(self._wall_clock())  # once for the chunk
        acked = await _each(
            silent, PUBLISH_CONCURRENCY, lambda item: self._publish(item, detected_at)
        )
        alerted = {c.key: seen for (c, _, seen), ok in zip(silent, acked, strict=True) if ok}
        self._metrics.alerts_published.inc(len(alerted))
        if not alerted:
            return
        won = await self._store.mark_offline_many(alerted)
        for key in alerted:
            if key not in won:
                # Decommissioned, or another leader made the change: it reports it.
                log.info("offline_transition_not_ours", tenant_id=key[0], gateway_id=key[1])
                continue
            # Heard while the alert was in flight (won > alerted): the alert stands;
            # the next tick reads the newer last-seen and reports `online` after this.
            self._index.discard(key)
            self._offline.add(key)
        # One line per chunk (a mass outage must not flood the log; each alert
        # is on the ALERTS stream, and in the log at DEBUG).
        log.info(
            "offline_alerts_published",
            count=len(alerted),
            marked_offline=len(won),
            gateways=[f"{t}/{g}" for t, g in list(alerted)[:LOG_GATEWAYS]],
        )
        if won:
            self._sink.wake()  # their reports were queued with the transitions
            self._changed()

    async def _publish(
        self, item: tuple[Due, GatewayState | None, datetime], detected_at: str
    ) -> bool:
        """The offline alert; True once JetStream acknowledged it."""
        c, state, last_seen = item
        tenant_id, gateway_id = c.key
        try:
            subject = alert_subject(tenant_id)
            seen = format_rfc3339(last_seen)
            body = offline_alert_body_of(gateway_id, seen, c.timeout_ms, detected_at)
            msg_id = offline_alert_msg_id_of(tenant_id, gateway_id, seen)
            # A bare scope (cheaper than fail_after, and this runs per alert).
            with trio.CancelScope(deadline=trio.current_time() + PUBLISH_TIMEOUT_S) as scope:
                await self._publisher.publish(subject, body, msg_id=msg_id)
            if scope.cancelled_caught:
                raise trio.TooSlowError(f"no PubAck within {PUBLISH_TIMEOUT_S:g} s")
        except (NatsRequestError, trio.TooSlowError, ValueError) as exc:
            self._metrics.alert_publish_errors.inc()
            log.warning(
                "offline_alert_publish_failed",
                tenant_id=tenant_id,
                gateway_id=gateway_id,
                error=f"{type(exc).__name__}: {exc}",
            )
            return False
        log.debug(
            "offline_alert_published",
            tenant_id=tenant_id,
            gateway_id=gateway_id,
            last_seen=seen,
            timeout_ms=c.timeout_ms,
            state=state,
        )
        return True

    # --- paused gateways ---

    def _paused_until(self, key: Key) -> float:
        entry = self.paused.get(key)
        return -math.inf if entry is None else entry[0]

    def _pause(self, key: Key, asked_at: float) -> None:
        """Ask a silent paused gateway again after 1 min, then doubling to the cap."""
        entry = self.paused.get(key)
        delay = PAUSED_RECHECK_FIRST_S if entry is None else entry[1] * 2
        delay = min(delay, self._paused_recheck_max_s)
        self.paused[key] = (asked_at + delay, delay)


async def _each(items: Sequence[T], limit: int, fn: Callable[[T], Awaitable[R]]) -> list[R]:
    """`fn` on every item, at most `limit` at a time, results in item order.

    A fixed pool of workers over one shared iterator: bounded concurrency
    without one task per item in a mass outage; items start in order.
    """
    results: list[R | None] = [None] * len(items)
    pending = iter(enumerate(items))

    async def worker() -> None:
        for i, item in pending:
            results[i] = await fn(item)

    async with trio.open_nursery() as nursery:
        for _ in range(min(limit, len(items))):
            nursery.start_soon(worker)
    return results  # type: ignore[return-value]
