"""Liveness on the leader: offline alerts and status updates (docs/contract.md Behaviour 3, 4, 8).

The state lives in PostgreSQL (`livestate.py`): every replica's ingest records
each gateway's last-seen there before it acknowledges the gateway's messages
(`ingest.py`). One replica, the leader (`leader.py`), runs a `LivenessTracker`:

- `take_over()` loads every tracked gateway once; then each `tick()` reads only
  the rows changed since the last one (O(changed)), keeps the online gateways
  in a `LaneIndex` (O(due) to find the silent ones), and acts:
- a gateway `new`, or `offline` and heard since its alert (by a message
  younger than its timeout: an old message processed late, say redelivered from
  a replica that died, does not bring it back), becomes online through a
  conditional update that queues its report in the same statement; only the
  update that wins reports `online` (last_seen_at = its last-seen);
- an online gateway whose last-seen + timeout (strictly) lies before the alert
  horizon is a candidate, once the grace period after start is over.
  The candidates are handled by `alerting.OfflineAlerts`, in chunks of
  `BULK_ROWS`. A chunk's get-status
  queries run concurrently (at most `concurrency` in flight, through a circuit
  breaker, `breaker.py`, that fails the rest of the tick open once the API
  keeps failing): `paused` skips it silently (counted; asked again only after
  a back-off, 1 min doubling to `paused_recheck_max_s`); any other state, or a
  failed/invalid query (counted, fail open), goes on. Then, while the next
  chunk is asked, the chunk's last-seen is read again in one statement (a
  message that arrived meanwhile cancels the alert), the offline alerts are
  published concurrently with a `Nats-Msg-Id` from (tenant, gateway,
  last-seen), so an old and a new leader publishing one store it once, and
  only the acknowledged ones are marked offline, conditionally, with their
  reports queued, in one statement; only the winners report `offline`
  (last_seen_at = last-seen). A failed publish is counted and leaves the
  gateway online: the next tick retries with the same msg id.
- the alert horizon (`horizon.py`) is read at the start of each tick, before
  the changes: the stream time of the first message the durable has not had
  acknowledged (everything before it is stored), in stream time, so a
  backlog, a replica that died holding messages, a nak'ed batch or a clock
  running ahead never makes a live gateway look silent. It never trails
  stream-now by more than LIVENESS_CATCHUP_MAX_MS.
- reports are sent by the dispatcher from the outbox (`dispatch.py`); the
  tracker only wakes it.

Decommission is a tombstone in the table (any replica writes it); the leader
forgets the gateway at its next read.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from itertools import repeat
from typing import Final, Protocol

import trio

from .alertconfig import AlertConfigCache
from .alerting import OfflineAlerts, StatusQuery, StatusSink
from .errors import DatabaseError, NatsRequestError
from .horizon import Horizon, HorizonError
from .js.bridge import AlertPublisher
from .lanes import Key, LaneIndex
from .livestate import GatewayRow, LoadChunk, LoadPosition, StateStore
from .log import get_logger
from .metrics import Metrics
from .mgmt import ReportedStatus

log = get_logger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class AlertHorizon(Protocol):
    async def read(self) -> Horizon:
        """Up to which stream time silences may be judged (`horizon.py`); raises
        HorizonError or NatsRequestError when it cannot be read."""
        ...


# A tick runs early, before its slot, when a gateway that was not due at the last
# tick's horizon becomes due (`LivenessTracker.wake_at`): this long after the
# horizon should have passed its due time (the ack floor moves in steps), and
# never sooner than this after the last tick began.
WAKE_SLACK_S: Final = 0.1
WAKE_MIN_GAP_S: Final = 0.25

# Alerts held back by a horizon trailing stream-now by more than this are logged
# (once, when it starts and when it ends).
DEFER_LOG_LAG_S: Final = 5.0


class LivenessTracker:
    """The leader's view of every tracked gateway; see the module docstring.

    `take_over` once, then `tick` on schedule (never two at once).
    """

    def __init__(
        self,
        store: StateStore,
        configs: AlertConfigCache,
        status: StatusQuery,
        publisher: AlertPublisher,
        sink: StatusSink,
        metrics: Metrics,
        horizon: AlertHorizon,
        *,
        grace_until: float,
        concurrency: int,
        paused_recheck_max_s: float = 120.0,
        wall_clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._store = store
        self._configs = configs
        self._table = configs.table  # the table the index was built for
        self._sink = sink
        self._metrics = metrics
        self._horizon = horizon
        self._grace_until = grace_until  # Trio time: no alerts before it
        self._wall_clock = wall_clock
        self._index = LaneIndex()  # online gateways
        self._offline: set[Key] = set()
        self._alerts = OfflineAlerts(
            store,
            status,
            publisher,
            sink,
            metrics,
            index=self._index,
            offline=self._offline,
            changed=self._update_gauges,
            concurrency=concurrency,
            paused_recheck_max_s=paused_recheck_max_s,
            wall_clock=wall_clock,
        )
        self._cursor: int | None = None
        self._wake_at: float | None = None
        self._last_horizon = -float("inf")
        self._ticking = False
        self._deferring = False  # alerts held back by a trailing horizon (for the log)
        self._horizon_failing = False

    # --- introspection ---

    def __len__(self) -> int:
        return len(self._index) + len(self._offline)

    def status(self, tenant_id: str, gateway_id: str) -> ReportedStatus | None:
        key = (tenant_id, gateway_id)
        if key in self._index:
            return "online"
        return "offline" if key in self._offline else None

    @property
    def wake_at(self) -> float | None:
        """Trio time at which the next gateway becomes due, judged by the last
        tick's horizon and assuming it moves on with the clock; None when no
        early tick is called for (no horizon, the horizon stood still since the
        tick before, or nobody left to become due)."""
        return self._wake_at

    # --- reading the state ---

    async def take_over(self) -> None:
        """Load the whole state (once, when this replica becomes the leader).

        Chunk by chunk (`StateStore.load_chunk`, each round trip under its own
        deadline), the next chunk read while this one is taken in: its online
        gateways go into the index's key dict at once (`LaneIndex.stage`), and
        into their lanes' order, oldest first, at the end (`settle`), with a
        checkpoint between slices (the lock check must not starve). A
        DatabaseError leaves the tracker empty, ready for another try.
        """
        t0 = trio.current_time()
        others: list[GatewayRow] = []
        cursor: int | None = None
        chunks = 0
        failed: DatabaseError | None = None
        tenant_timeout = self._configs.tenant_timeouts()
        send, receive = trio.open_memory_channel[LoadChunk | DatabaseError](1)
        with _gc_paused():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_chunks, send)
                async with receive:
                    async for chunk in receive:
                        if isinstance(chunk, DatabaseError):
                            failed = chunk
                            break
                        chunks += 1
                        if chunk.cursor is not None:
                            cursor = chunk.cursor
                        for tenant, gateways, seen in chunk.online:
                            self._stage(tenant_timeout(tenant), tenant, gateways, seen)
                        others += chunk.rows
            if failed is not None:
                self._index.clear()
                raise failed
            assert cursor is not None
            for _ in self._index.settle():
                await trio.lowlevel.checkpoint()
        loaded = len(self._index) + len(others)
        await self._apply(others)
        self._cursor = cursor
        log.info(
            "liveness_state_loaded",
            gateways=loaded,
            online=len(self._index),
            offline=len(self._offline),
            chunks=chunks,
            seconds=round(trio.current_time() - t0, 3),
        )

    def _stage(
        self, timeout_ms: int | None, tenant: str, gateways: list[str], seen: list[float]
    ) -> None:
        """One tenant's online gateways into the index (`LaneIndex.stage`): all
        at once when they share the tenant's timeout, else by timeout."""
        if timeout_ms is not None:
            self._index.stage(timeout_ms, list(zip(repeat(tenant), gateways)), seen)
            return
        by_timeout: dict[int, tuple[list[Key], list[float]]] = {}
        for gateway, at in zip(gateways, seen, strict=True):
            keys, seens = by_timeout.setdefault(self._configs.timeout_ms(tenant, gateway), ([], []))
            keys.append((tenant, gateway))
            seens.append(at)
        for timeout, (keys, seens) in by_timeout.items():
            self._index.stage(timeout, keys, seens)

    async def _read_chunks(self, send: trio.MemorySendChannel[LoadChunk | DatabaseError]) -> None:
        """Every chunk of the state in order, then the end of `send`; a
        DatabaseError is sent as the last item (not raised: it must reach
        `take_over` as itself, not inside an ExceptionGroup)."""
        async with send:
            after: LoadPosition | None = None
            while True:
                try:
                    chunk = await self._store.load_chunk(after)
                except DatabaseError as exc:
                    await send.send(exc)
                    return
                await send.send(chunk)
                if chunk.resume is None:
                    return
                after = chunk.resume

    def forget_retired(self, keys: Iterable[Key]) -> int:
        """Drop offline gateways whose rows the janitor purged (`janitor.py`);
        returns how many were tracked. Online ones are not touched: a purge
        deletes only rows that are offline or tombstones."""
        dropped = 0
        for key in keys:
            if key in self._offline:
                self._offline.discard(key)
                dropped += 1
        if dropped:
            self._update_gauges()
        return dropped

    async def _sync(self) -> None:
        if self._cursor is None:
            raise RuntimeError("LivenessTracker.tick before take_over")
        changes = await self._store.changes(self._cursor)
        # The cursor moves only once the rows it covers were applied: rows whose
        # apply failed (say, mark_online) are read again at the next tick.
        await self._apply(changes.rows)
        self._cursor = changes.cursor

    async def _apply(self, rows: Iterable[GatewayRow]) -> None:
        to_online: list[Key] = []
        # Into the index together, oldest first (`LaneIndex.set_many`): the order
        # the rows were read in must not delay any gateway.
        online: list[tuple[Key, float, int]] = []
        for row in rows:
            key = row.key
            if self._alerts.paused:
                self._alerts.paused.pop(key, None)  # heard (or gone): asked afresh when due
            if row.status == "decommissioned":
                if self._index.discard(key) or key in self._offline:
                    self._offline.discard(key)
                    log.info("gateway_forgotten", tenant_id=key[0], gateway_id=key[1])
            elif row.status == "online":
                self._offline.discard(key)
                online.append((key, row.last_seen.timestamp(), self._configs.timeout_ms(*key)))
            elif row.status == "new" or (
                row.status_last_seen is not None
                and row.last_seen > row.status_last_seen
                and not self._stale(row)
            ):
                to_online.append(key)
            else:  # offline, and not heard since (or only by a message already too old)
                self._index.discard(key)
                self._offline.add(key)
        if to_online:
            for key, last_seen in await self._store.mark_online(to_online):
                back = key in self._offline
                self._offline.discard(key)
                online.append((key, last_seen.timestamp(), self._configs.timeout_ms(*key)))
                if back:
                    log.info("gateway_back_online", tenant_id=key[0], gateway_id=key[1])
                else:
                    log.debug("gateway_first_seen", tenant_id=key[0], gateway_id=key[1])
            self._sink.wake()  # their reports were queued with the transitions
        self._index.set_many(online)
        self._update_gauges()

    def _stale(self, row: GatewayRow) -> bool:
        """An offline gateway's newer last-seen that is itself older than its timeout:
        a message that reached the stream before the alert but was processed late (a
        replica died holding it, a backlog). The gateway is still silent: it stays
        offline until a message says it is alive now."""
        timeout_s = self._configs.timeout_ms(*row.key) / 1000
        return row.last_seen.timestamp() + timeout_s < self._wall_clock().timestamp()

    # --- the periodic check ---

    async def tick(self) -> None:
        """One liveness check: read changes, report onlines, alert the silent.

        Returns when every candidate has been handled. A database error ends
        this tick at once, the checks still running included (logged once); the
        next tick starts over. A management-API or NATS error ends only the
        candidate it happened to. Must not run concurrently with itself
        (RuntimeError).
        """
        if self._ticking:
            raise RuntimeError("LivenessTracker.tick is already running")
        self._ticking = True
        t0 = trio.current_time()
        self._wake_at = None
        try:
            # The horizon first: every message below it is stored before the
            # changes are read, so the read sees all of them.
            horizon = await self._read_horizon() if t0 >= self._grace_until else None
            await self._sync()
            if self._configs.table is not self._table:
                self._retime()
            if horizon is None:
                return
            candidates = self._index.due(horizon)
            if candidates:
                log.debug("offline_candidates", count=len(candidates))
                await self._alerts.handle(candidates, t0)
            self._plan_wake(horizon, t0)
        except DatabaseError as exc:
            log.warning("liveness_tick_database_error", error=str(exc)[:300])
        finally:
            self._ticking = False
            self._metrics.heartbeat_tick_duration.observe(trio.current_time() - t0)

    async def _read_horizon(self) -> float | None:
        """The horizon's stream time; None (no alerts this tick) when unreadable."""
        try:
            horizon = await self._horizon.read()
        except (HorizonError, NatsRequestError) as exc:
            if not self._horizon_failing:
                log.warning("alert_horizon_unavailable", error=str(exc)[:300])
            self._horizon_failing = True
            return None
        if self._horizon_failing:
            log.info("alert_horizon_available")
            self._horizon_failing = False
        lag = horizon.lag_s
        self._metrics.alert_horizon_lag.set(lag)
        behind = lag > DEFER_LOG_LAG_S
        if behind != self._deferring:
            self._deferring = behind
            if behind:
                log.warning(
                    "offline_alerts_deferred_consumer_behind",
                    alert_horizon_lag_s=round(lag, 3),
                    bounded=horizon.bounded,
                )
            else:
                log.info("offline_alerts_resumed_consumer_caught_up")
        return horizon.at

    def _plan_wake(self, horizon: float, read_at: float) -> None:
        """Set `wake_at` from the horizon read at Trio time `read_at`. A horizon
        that stood still (a floor held by a message not yet stored) would call
        for the same early tick again and again: the next slot serves instead."""
        moved = horizon > self._last_horizon
        self._last_horizon = horizon
        due_at = self._index.next_due_after(horizon) if moved else None
        if due_at is not None:
            self._wake_at = read_at + (due_at - horizon) + WAKE_SLACK_S

    # --- helpers ---

    def _retime(self) -> None:
        """Move the online gateways whose timeout changed with the config table.

        Only tenants and gateways whose entries changed are looked at (a full
        pass over the online gateways only when a tenant-wide entry changed).
        """
        old, new = self._table, self._configs.table
        self._table = new
        tenants, keys = new.changed_since(old)
        affected = [k for k in keys if k in self._index]
        if tenants:
            affected += [k for k in self._index if k[0] in tenants and k not in keys]
        lookup = self._configs.timeout_ms
        moved = self._index.retime((key, lookup(*key)) for key in affected)
        log.info(
            "liveness_timeouts_changed",
            tenants=len(tenants),
            gateways=len(keys),
            moved=moved,
            lanes=self._index.lane_count(),
        )

    def clear_gauges(self) -> None:
        m = self._metrics
        for gauge in (m.heartbeat_map_size, m.gateways_online, m.gateways_offline):
            gauge.set(0)

    def _update_gauges(self) -> None:
        m = self._metrics
        m.heartbeat_map_size.set(len(self))
        m.gateways_online.set(len(self._index))
        m.gateways_offline.set(len(self._offline))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a takeover reads the state and fills
    the index: a million new long-lived objects set off full collections again
    and again (measured: 2.3 s against 0.8 s for 1,000,000 gateways). Nothing
    it creates is garbage. At the end every object is frozen (`gc.freeze`,
    O(1)): the collector ignores them until `ticking.lead_liveness` ends, which
    unfreezes them (a tracker and its cycles are then collected as usual). Else
    the first young collection after would traverse them all, blocking the Trio
    thread (0.7 s measured at 1,000,000), and every full collection during the
    leadership would traverse the index's containers again (2.6 s in 16
    collections during one 100,000-alert tick). What was alive at the freeze
    and later becomes cyclic garbage waits for the unfreeze: bounded by what
    existed then."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
