"""Gateway liveness: last-seen tracking, offline detection and alerts (SPEC.md Behaviour 3, 4).

Data flow: ingest sends one `Heartbeats` per batch on a memory channel;
`run_liveness` applies them with `LivenessTracker.record` (synchronous, never
waits on the management API) and, in its own task, calls `tick()` every
`HEARTBEAT_TICK_MS` on a fixed schedule. Status changes go to a `StatusSink`
(the `Dispatcher`), whose `submit` never blocks.

Per gateway the tracker keeps last-seen (Trio time for timing, wall time for
the wire) and online/offline:

- first seen, or seen again while offline: one `online` update (last_seen_at =
  that heartbeat's wall time);
- a tick finds each online gateway silent for longer than its timeout (strictly
  more, as the Go service): a candidate. No candidate is acted on during the
  grace period after start. Candidates are checked concurrently (at most
  `liveness_query_concurrency` at a time) with get-status: `paused` skips it
  silently (counted); any other state, or a failed/invalid query (counted, fail
  open), publishes the offline alert with a deterministic `Nats-Msg-Id`. Only
  after the PubAck is it marked offline and an `offline` update submitted
  (last_seen_at = last seen). A failed publish is counted and leaves it online:
  the next tick retries with the same msg id.
- a heartbeat that arrives while its gateway is being checked is never lost.
  Before publishing, a candidate whose last-seen moved (or that was removed) is
  dropped: it is not silent any more. If the heartbeat lands while the publish
  is in flight, the alert is out and stands: the gateway is reported `offline`
  (old last-seen) and at once `online` again (new last-seen), in that order, and
  stays tracked as online.
- `remove` (decommission) forgets the gateway: no alert, no update; a later
  heartbeat makes it first seen again.

Tick cost does not grow with the number of tracked gateways: online gateways
sit in insertion-ordered "lanes", one per distinct timeout, ordered by
last-seen (each heartbeat moves its gateway to the end), so a tick only looks
at the front of each lane until it meets a gateway that is not due. When the
alert-config table changes, the next tick moves only the gateways whose
timeout changed (see `_reindex`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol

import trio

from notip_trio.alertconfig import AlertConfigCache
from notip_trio.config import Settings
from notip_trio.dispatch import StatusUpdate
from notip_trio.jetstream import AlertPublisher, NatsRequestError
from notip_trio.log import get_logger
from notip_trio.metrics import Metrics
from notip_trio.mgmt import GatewayState, MgmtError, Status
from notip_trio.wire import (
    alert_subject,
    format_rfc3339,
    offline_alert_body,
    offline_alert_msg_id,
)

log = get_logger(__name__)

# The publisher waits for the PubAck itself; this only keeps a stuck publish
# from holding the tick forever.
PUBLISH_TIMEOUT_S: Final = 10.0

Key = tuple[str, str]  # (tenant_id, gateway_id)


@dataclass(frozen=True, slots=True)
class Heartbeats:
    """One ingest batch worth of heartbeats, all seen at the same moment."""

    seen_at: float  # trio.current_time() at arrival
    seen_at_wall: datetime  # aware UTC datetime at arrival (for the wire)
    gateways: Collection[Key]  # deduplicated (tenant, gateway) pairs


class StatusQuery(Protocol):
    async def get_status(self, tenant_id: str, gateway_id: str) -> GatewayState:
        """Lifecycle state; raises MgmtError when it cannot be had."""
        ...


class StatusSink(Protocol):
    def submit(self, update: StatusUpdate) -> bool:
        """Queue without blocking; False when dropped."""
        ...

    def close(self) -> None: ...


class _Lane:
    """Online gateways sharing one timeout, oldest last-seen first."""

    __slots__ = ("order", "timeout_ms", "timeout_s")

    def __init__(self, timeout_ms: int) -> None:
        self.timeout_ms = timeout_ms
        self.timeout_s = timeout_ms / 1000
        self.order: OrderedDict[Key, _Gateway] = OrderedDict()


class _Gateway:
    # Three slots and shared objects (seen/wall are the batch's): ~56 bytes each.
    __slots__ = ("lane", "seen", "wall")

    def __init__(self, seen: float, wall: datetime, lane: _Lane | None) -> None:
        self.seen = seen
        self.wall = wall
        self.lane = lane  # None while offline


@dataclass(frozen=True, slots=True)
class _Candidate:
    key: Key
    gw: _Gateway
    seen: float
    wall: datetime
    timeout_ms: int


def _by_seen(item: tuple[Key, _Gateway, int]) -> float:
    return item[1].seen


def _utcnow() -> datetime:
    return datetime.now(UTC)


class LivenessTracker:
    """Liveness state of every tracked gateway; see the module docstring.

    `record` and `remove` are synchronous and O(batch). `tick` is the periodic
    check; `run_liveness` calls it on schedule and never runs two at once.
    """

    def __init__(
        self,
        configs: AlertConfigCache,
        status: StatusQuery,
        publisher: AlertPublisher,
        sink: StatusSink,
        settings: Settings,
        metrics: Metrics,
        *,
        wall_clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._configs = configs
        self._table = configs.table  # the table the lanes were built for
        self._status = status
        self._publisher = publisher
        self._sink = sink
        self._metrics = metrics
        self._wall_clock = wall_clock
        self.tick_s = settings.heartbeat_tick_ms / 1000
        self._grace_s = settings.heartbeat_grace_period_ms / 1000
        self._concurrency = settings.liveness_query_concurrency
        self._started_at = trio.current_time()  # the grace period counts from here
        self._gateways: dict[Key, _Gateway] = {}
        self._lanes: dict[int, _Lane] = {}  # newcomers join these, by timeout
        self._moved_lanes: list[_Lane] = []  # built when a config change moved gateways
        self._online = 0
        self._latest_seen = -float("inf")
        self._ticking = False
        self._update_gauges()

    # --- state changes from heartbeats and decommission ---

    def record(self, hb: Heartbeats) -> None:
        """Apply one batch of heartbeats; submits online updates where due."""
        # Lanes must stay ordered by last-seen: clamp a batch that arrives with
        # an earlier timestamp than one already applied (at most a few ms late).
        seen = self._latest_seen = max(hb.seen_at, self._latest_seen)
        wall = hb.seen_at_wall
        gateways = self._gateways
        for key in hb.gateways:
            gw = gateways.get(key)
            if gw is not None and gw.lane is not None:
                gw.seen = seen
                gw.wall = wall
                gw.lane.order.move_to_end(key)
                continue
            lane = self._lane_for(key, self._lanes)
            if gw is None:
                gateways[key] = gw = _Gateway(seen, wall, lane)
                log.debug("gateway_first_seen", tenant_id=key[0], gateway_id=key[1])
            else:
                gw.seen, gw.wall, gw.lane = seen, wall, lane
                log.info("gateway_back_online", tenant_id=key[0], gateway_id=key[1])
            lane.order[key] = gw
            self._online += 1
            self._submit(key, "online", wall)
        self._update_gauges()

    def remove(self, tenant_id: str, gateway_id: str) -> bool:
        """Stop tracking a gateway (decommissioned); False if it was not tracked."""
        key = (tenant_id, gateway_id)
        gw = self._gateways.pop(key, None)
        if gw is None:
            return False
        if gw.lane is not None:
            del gw.lane.order[key]
            gw.lane = None
            self._online -= 1
        self._update_gauges()
        return True

    def close_updates(self) -> None:
        """Close the status sink: no more updates will come from this tracker."""
        self._sink.close()

    # --- introspection ---

    def __len__(self) -> int:
        return len(self._gateways)

    @property
    def online_count(self) -> int:
        return self._online

    def status(self, tenant_id: str, gateway_id: str) -> Status | None:
        gw = self._gateways.get((tenant_id, gateway_id))
        if gw is None:
            return None
        return "online" if gw.lane is not None else "offline"

    # --- the periodic check ---

    async def tick(self) -> None:
        """One liveness check: find due gateways, query, alert, mark offline.

        Returns when every candidate has been handled. Must not run
        concurrently with itself (RuntimeError).
        """
        if self._ticking:
            raise RuntimeError("LivenessTracker.tick is already running")
        self._ticking = True
        t0 = trio.current_time()
        try:
            if self._configs.table is not self._table:
                self._reindex()
            self._moved_lanes = [lane for lane in self._moved_lanes if lane.order]
            if t0 - self._started_at < self._grace_s:
                return
            candidates = self._due(t0)
            if not candidates:
                return
            log.debug("offline_candidates", count=len(candidates))
            # A fixed pool of workers over one shared iterator: bounded
            # concurrency without one task per candidate in a mass outage.
            pending = iter(candidates)

            async def worker() -> None:
                for candidate in pending:
                    await self._check(candidate)

            async with trio.open_nursery() as nursery:
                for _ in range(min(self._concurrency, len(candidates))):
                    nursery.start_soon(worker)
        finally:
            self._ticking = False
            self._metrics.heartbeat_tick_duration.observe(trio.current_time() - t0)

    def _due(self, now: float) -> list[_Candidate]:
        out: list[_Candidate] = []
        for lane in self._all_lanes():
            limit = now - lane.timeout_s  # due: now - seen > timeout
            for key, gw in lane.order.items():
                if gw.seen >= limit:
                    break  # the rest of this lane was seen later still
                out.append(_Candidate(key, gw, gw.seen, gw.wall, lane.timeout_ms))
        return out

    async def _check(self, c: _Candidate) -> None:
        tenant_id, gateway_id = c.key
        state: GatewayState | None
        try:
            state = await self._status.get_status(tenant_id, gateway_id)
        except MgmtError as exc:
            self._metrics.lifecycle_query_errors.inc()
            log.warning(
                "lifecycle_query_failed_alerting_anyway",
                tenant_id=tenant_id,
                gateway_id=gateway_id,
                error=str(exc),
            )
            state = None
        if state == "paused":
            self._metrics.alerts_suppressed_paused.inc()
            log.debug("offline_alert_suppressed_paused", tenant_id=tenant_id, gateway_id=gateway_id)
            return
        gw = self._gateways.get(c.key)
        if gw is not c.gw or gw.lane is None or gw.seen != c.seen:
            log.info("offline_candidate_heard_again", tenant_id=tenant_id, gateway_id=gateway_id)
            return
        last_seen = format_rfc3339(c.wall)
        try:
            subject = alert_subject(tenant_id)
            body = offline_alert_body(gateway_id, c.wall, c.timeout_ms, self._wall_clock())
            with trio.fail_after(PUBLISH_TIMEOUT_S):
                await self._publisher.publish(
                    subject, body, msg_id=offline_alert_msg_id(tenant_id, gateway_id, c.wall)
                )
        except (NatsRequestError, trio.TooSlowError, ValueError) as exc:
            self._metrics.alert_publish_errors.inc()
            log.warning(
                "offline_alert_publish_failed",
                tenant_id=tenant_id,
                gateway_id=gateway_id,
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        self._metrics.alerts_published.inc()
        log.info(
            "offline_alert_published",
            tenant_id=tenant_id,
            gateway_id=gateway_id,
            last_seen=last_seen,
            timeout_ms=c.timeout_ms,
            state=state,
        )
        self._after_publish(c)

    def _after_publish(self, c: _Candidate) -> None:
        gw = self._gateways.get(c.key)
        if gw is not c.gw or gw.lane is None:
            # Removed during the publish (and perhaps seen again, which already
            # reported it online): the alert stands, there is nothing to mark.
            return
        self._submit(c.key, "offline", c.wall)
        if gw.seen == c.seen:
            del gw.lane.order[c.key]
            gw.lane = None
            self._online -= 1
        else:
            # Heard from while the alert was in flight: it went out, so report
            # the offline it announced, then the recovery, in that order.
            log.info("gateway_back_online", tenant_id=c.key[0], gateway_id=c.key[1])
            self._submit(c.key, "online", gw.wall)
        self._update_gauges()

    # --- helpers ---

    def _lane_for(self, key: Key, lanes: dict[int, _Lane]) -> _Lane:
        timeout_ms = self._configs.timeout_ms(*key)
        lane = lanes.get(timeout_ms)
        if lane is None:
            lanes[timeout_ms] = lane = _Lane(timeout_ms)
        return lane

    def _all_lanes(self) -> list[_Lane]:
        return [*self._lanes.values(), *self._moved_lanes]

    def _reindex(self) -> None:
        """Move the online gateways whose timeout changed with the config table.

        Only tenants and gateways whose entries changed are looked at (a full
        pass only when a tenant-wide entry changed). Moved gateways go, sorted
        by last-seen, into new lanes of their own: a lane cannot take entries
        in the middle, and merging into the existing lanes would cost O(n).
        Later heartbeats keep them in their lane; lanes that empty are dropped.
        """
        old, new = self._table, self._configs.table
        self._table = new
        t0 = trio.current_time()
        tenants, keys = new.changed_since(old)
        gateways = self._gateways
        affected = [(k, gw) for k in keys if (gw := gateways.get(k)) is not None]
        if tenants:  # one pass over the plain dict: ~0.1 µs per tracked gateway
            affected += [(k, gw) for k, gw in gateways.items() if k[0] in tenants and k not in keys]
        lookup = self._configs.timeout_ms
        moved = [
            (key, gw, timeout_ms)
            for key, gw in affected
            if gw.lane is not None and (timeout_ms := lookup(*key)) != gw.lane.timeout_ms
        ]
        moved.sort(key=_by_seen)
        lanes: dict[int, _Lane] = {}
        for key, gw, timeout_ms in moved:
            assert gw.lane is not None
            del gw.lane.order[key]
            lane = lanes.get(timeout_ms)
            if lane is None:
                lanes[timeout_ms] = lane = _Lane(timeout_ms)
            gw.lane = lane
            lane.order[key] = gw
        self._moved_lanes = [lane for lane in self._moved_lanes if lane.order]
        self._moved_lanes += lanes.values()
        self._lanes = {t: lane for t, lane in self._lanes.items() if lane.order}
        log.info(
            "liveness_timeouts_changed",
            tenants=len(tenants),
            gateways=len(keys),
            moved=len(moved),
            lanes=len(self._lanes) + len(self._moved_lanes),
            seconds=round(trio.current_time() - t0, 3),
        )

    def _submit(self, key: Key, status: Status, last_seen: datetime) -> None:
        self._sink.submit(StatusUpdate(key[0], key[1], status, last_seen))

    def _update_gauges(self) -> None:
        m = self._metrics
        total = len(self._gateways)
        m.heartbeat_map_size.set(total)
        m.gateways_online.set(self._online)
        m.gateways_offline.set(total - self._online)


class TickObserver(Protocol):
    """Told when each tick begins and ends (the progress watchdog behind /livez)."""

    def tick_started(self, now: float) -> None: ...

    def tick_finished(self, now: float) -> None: ...


async def run_liveness(
    tracker: LivenessTracker,
    heartbeats: trio.MemoryReceiveChannel[Heartbeats],
    *,
    observer: TickObserver | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Apply heartbeats and tick on schedule until the heartbeat channel closes.

    Ready at once. Owns `heartbeats` (closes it). Returns when ingest closes
    its send end: without heartbeats every gateway would look silent, so the
    ticking stops with it. On return or cancellation closes the tracker's
    status sink, which lets the dispatcher drain and finish.
    """
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_tick_forever, tracker, observer)
            task_status.started()
            async with heartbeats:
                async for hb in heartbeats:
                    tracker.record(hb)
            nursery.cancel_scope.cancel()
    finally:
        tracker.close_updates()


async def _tick_forever(tracker: LivenessTracker, observer: TickObserver | None) -> None:
    tick_s = tracker.tick_s
    start = trio.current_time()
    n = 1
    while True:
        await trio.sleep_until(start + n * tick_s)
        if observer is not None:
            observer.tick_started(trio.current_time())
        await tracker.tick()
        if observer is not None:
            observer.tick_finished(trio.current_time())
        # A tick that overran (slow management API) skips the slots it missed
        # instead of running back to back; the schedule keeps its phase.
        behind = int((trio.current_time() - start) // tick_s)
        if behind > n:
            log.warning("heartbeat_tick_overran", skipped=behind - n)
        n = max(n, behind) + 1
