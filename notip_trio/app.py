"""The task tree: one root nursery supervising every part of the daemon.

Start order (each `nursery.start` returns only when its task is truly ready):

    metrics/health server ─ alert configs ─ signal watcher ─ leadership
      (ticks + outbox dispatcher, while leading) ─ last-seen writer
      ─ ingest (writer ready) ─ telemetry pull ─ decommission pull

Channels (all bounded):

    telemetry pull ──list[JsMsg] (pipeline depth)──▶ ingest ──▶ COPY
    ingest ──committed batch──▶ SeenBuffer ──(at most every 100 ms)──▶ last-seen ──▶ ack
    leader (liveness) ──transition + its report (one txn)──▶ outbox table ──▶ dispatcher
    decommission pull ──list[JsMsg] (1)──▶ decommission ──▶ tombstone in the state table

Liveness runs only while this replica holds the advisory lock (`leader.py`);
it reads the state every replica's ingest writes (`livestate.py`), up to the
horizon the durable's ack floor gives (`horizon.py`), and its dispatcher sends
the status reports queued with the transitions (`dispatch.py`).

The tree is wired in `_wire` and run in four layers, one nursery each
(`_root_layer` > `_liveness_layer` > `_ingest_layer` > `_intake_layer`).

Shutdown (SIGTERM/SIGINT): stop pulling, let ingest write what it holds
(bounded by SHUTDOWN_DRAIN_MS), write its last-seen and ack, send what the
outbox holds (on the leader; until the same deadline, or one second should
ingest use it all), stop leading (the lock is released: a follower takes over
and sends what is left), close NATS and the pool, return. Any unexpected
exception cancels the whole tree and propagates to `__main__`, which exits
non-zero.
"""

from __future__ import annotations

# trio_asyncio must be imported before psycopg (docs/pitfalls.md).
import trio_asyncio  # isort: split

import functools
import gc
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from . import wire
from .alertconfig import AlertConfigCache, FetchPolicy, run_alert_configs
from .config import Settings
from .db.lifecycle import Lifecycle
from .db.liveness import PgStateStore
from .db.writer import Storage
from .decommission import run_decommission
from .dispatch import Dispatcher
from .errors import DatabaseError, StartupError
from .horizon import AckFloorHorizon, JsConsumerPosition, StreamClock
from .http import run_http_server
from .ingest import IngestState, SeenBuffer, flush_seen, run_ingest, run_seen_flusher
from .janitor import run_janitor
from .js.bridge import Acker, NatsBridge
from .js.delivery import JsMsg
from .js.specs import decommission_spec, telemetry_spec
from .leader import AdvisoryLock, Lock, run_leadership
from .liveness import LivenessTracker
from .livestate import StateStore
from .log import get_logger, setup_logging
from .metrics import Metrics
from .mgmt import MgmtClient
from .progress import ProgressWatchdog
from .ticking import lead_liveness

log = get_logger(__name__)


@dataclass(eq=False)
class Health:
    """What /readyz looks at."""

    storage: Storage
    bridge: NatsBridge
    ingest: IngestState

    async def reasons(self) -> list[str]:
        out: list[str] = []
        if not self.bridge.connected:
            out.append("nats: not connected")
        if not self.ingest.running:
            out.append("ingest: not running")
        try:
            await self.storage.ping(timeout_s=1.5)
        except DatabaseError as exc:
            out.append(f"database: {exc}")
        return out


async def run_daemon(
    settings: Settings,
    metrics: Metrics | None = None,
    stop: trio.Event | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM/SIGINT or `stop` is set (then drain and return), or a
    failure (then raise). `task_status.started(metrics_port)` once everything runs.
    """
    metrics = metrics if metrics is not None else Metrics()
    metrics.heartbeat_tick_interval.set(settings.heartbeat_tick_s)
    metrics.alert_cache_refresh_interval.set(settings.alert_config_refresh_s)
    stop = stop if stop is not None else trio.Event()
    async with trio_asyncio.open_loop():
        storage = Storage.from_settings(settings)
        await storage.open(timeout_s=30.0)
        try:
            schema = await storage.migrate(Lifecycle.from_settings(settings))
            log.info(
                "database_ready",
                storage="timescaledb hypertable" if schema.hypertable else "plain PostgreSQL",
                dedup_index=schema.dedup_index,
                host=settings.db_host,
                database=settings.db_name,
            )
            bridge = await NatsBridge.from_settings(settings, metrics=metrics)
            try:
                await bridge.require_streams(list(wire.STREAMS))
                await bridge.ensure_pull_consumer(telemetry_spec(settings))
                await bridge.ensure_pull_consumer(decommission_spec())
                log.info("nats_ready", url=settings.nats_url)
                await _serve(
                    settings,
                    metrics,
                    storage,
                    bridge,
                    stop,
                    task_status,
                    store=PgStateStore(storage),
                    lock=AdvisoryLock(settings.db_conninfo(keepalives=True)),
                )
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await bridge.close()
        finally:
            with trio.CancelScope(shield=True):
                await storage.close()
    log.info("stopped")


@dataclass(eq=False)
class _Parts:
    """Everything the task tree runs, wired together (`_wire`), nothing started."""

    settings: Settings
    metrics: Metrics
    storage: Storage
    bridge: NatsBridge
    store: StateStore
    lock: Lock
    watchdog: ProgressWatchdog
    ingest_state: IngestState
    health: Health
    mgmt: MgmtClient
    cache: AlertConfigCache
    dispatcher: Dispatcher
    clock: StreamClock
    horizon: AckFloorHorizon
    grace_until: float
    seen: SeenBuffer
    pulled_tx: trio.MemorySendChannel[list[JsMsg]]
    pulled_rx: trio.MemoryReceiveChannel[list[JsMsg]]
    decom_tx: trio.MemorySendChannel[list[JsMsg]]
    decom_rx: trio.MemoryReceiveChannel[list[JsMsg]]

    def live(self) -> list[str]:
        """What /livez reports (empty: alive)."""
        now = trio.current_time()
        self.watchdog.nats_connected(self.bridge.connected, now)
        return self.watchdog.problems(now)

    async def lead(self) -> None:
        """Liveness, while this replica holds the lock (`run_leadership` runs it)."""
        tracker = LivenessTracker(
            self.store,
            self.cache,
            self.mgmt,
            self.bridge,
            self.dispatcher,
            self.metrics,
            self.horizon,
            grace_until=self.grace_until,
            concurrency=self.settings.liveness_query_concurrency,
            paused_recheck_max_s=self.settings.alert_config_refresh_ms / 1000,
        )
        # The dispatcher sends reports, and the janitor purges, only while this
        # replica leads: both are cancelled with the ticks, before the lock is let go.
        async with trio.open_nursery() as leading:
            await leading.start(self.dispatcher.run)
            await leading.start(
                functools.partial(
                    run_janitor,
                    self.store,
                    self.metrics,
                    liveness_retention_s=self.settings.liveness_retention_s,
                    rejected_retention_s=self.settings.rejected_retention_s,
                    forget=tracker.forget_retired,
                )
            )
            await lead_liveness(tracker, self.settings.heartbeat_tick_s, observer=self.watchdog)


def _wire(
    settings: Settings,
    metrics: Metrics,
    storage: Storage,
    bridge: NatsBridge,
    *,
    store: StateStore,
    lock: Lock,
) -> _Parts:
    """Build every part of the tree and connect them; start nothing."""
    watchdog = ProgressWatchdog(
        stall_s=settings.livez_stall_s,
        tick_s=settings.heartbeat_tick_s,
        started_at=trio.current_time(),
    )
    ingest_state = IngestState(progress=watchdog.ingest)
    mgmt = MgmtClient(bridge)
    pulled_tx, pulled_rx = trio.open_memory_channel[list[JsMsg]](settings.telemetry_pipeline_depth)
    decom_tx, decom_rx = trio.open_memory_channel[list[JsMsg]](1)
    clock = StreamClock()
    position = JsConsumerPosition(
        bridge, wire.TELEMETRY_STREAM, settings.nats_consumer_durable_name, wire.TELEMETRY_SUBJECTS
    )
    return _Parts(
        settings=settings,
        metrics=metrics,
        storage=storage,
        bridge=bridge,
        store=store,
        lock=lock,
        watchdog=watchdog,
        ingest_state=ingest_state,
        health=Health(storage, bridge, ingest_state),
        mgmt=mgmt,
        cache=AlertConfigCache(settings.alert_config_default_timeout_ms),
        dispatcher=Dispatcher(
            store,
            mgmt,
            metrics,
            batch=settings.gateway_buffer_size,
            poll_s=max(1.0, settings.heartbeat_tick_s),
        ),
        clock=clock,
        horizon=AckFloorHorizon(
            position, clock, max_lag_s=settings.liveness_catchup_max_s, wall=time.time
        ),
        grace_until=trio.current_time() + settings.heartbeat_grace_period_s,
        seen=SeenBuffer(),
        pulled_tx=pulled_tx,
        pulled_rx=pulled_rx,
        decom_tx=decom_tx,
        decom_rx=decom_rx,
    )


async def _serve(
    settings: Settings,
    metrics: Metrics,
    storage: Storage,
    bridge: NatsBridge,
    stop: trio.Event,
    task_status: trio.TaskStatus[int],
    *,
    store: StateStore,
    lock: Lock,
) -> None:
    """The task tree, once the database and NATS are ready; returns after the
    shutdown. Four layers, each one nursery, started outside in and stopped
    inside out: root (HTTP, alert configs, signals) > liveness (leadership with
    its dispatcher, last-seen flusher) > ingest > intake (the pulls, decommission).
    """
    parts = _wire(settings, metrics, storage, bridge, store=store, lock=lock)
    await _root_layer(parts, stop, task_status)


async def _root_layer(parts: _Parts, stop: trio.Event, task_status: trio.TaskStatus[int]) -> None:
    """HTTP, alert configs and the signal watcher around the rest. Its drain: none
    of its own (the layers inside have drained when it stops)."""
    settings = parts.settings
    async with trio.open_nursery() as root:
        port = await root.start(
            functools.partial(run_http_server, liveness=parts.live),
            settings.metrics_host,
            settings.metrics_port,
            parts.metrics.registry,
            parts.health.reasons,
        )
        await root.start(
            run_alert_configs,
            parts.mgmt,
            parts.cache,
            FetchPolicy.from_settings(settings),
            parts.metrics,
        )
        root.start_soon(_watch_signals, stop)
        await _liveness_layer(parts, stop, port, task_status)
        root.cancel_scope.cancel()


async def _liveness_layer(
    parts: _Parts, stop: trio.Event, port: int, task_status: trio.TaskStatus[int]
) -> None:
    """Leadership (liveness and the outbox dispatcher while leading) and the
    last-seen flusher around ingest. Its drain: write the last-seen of what ingest
    committed last and ack it; on the leader, send what the outbox holds (until
    the ingest deadline, or one second should ingest use it all); then stop
    leading (the lock is released at once: a follower takes over and sends what
    is left)."""
    tick_s = parts.settings.heartbeat_tick_s
    with trio.CancelScope() as liveness_scope:
        async with trio.open_nursery() as liveness:
            await liveness.start(
                functools.partial(
                    run_leadership,
                    parts.lock,
                    parts.lead,
                    parts.metrics,
                    retry_s=min(1.0, tick_s / 2),
                    check_s=min(1.0, tick_s / 2),
                )
            )
            await liveness.start(
                run_seen_flusher, parts.seen, parts.store, parts.bridge, parts.metrics
            )
            deadline = await _ingest_layer(parts, stop, port, task_status)
            # What ingest committed last reaches the state table too, and is
            # acked (bounded).
            await _flush_seen_at_shutdown(
                parts.seen, parts.store, parts.bridge, max(deadline, trio.current_time() + 0.5)
            )
            await parts.dispatcher.drain(max(deadline, trio.current_time() + 1.0))
            # Stop leading (releases the lock at once: a follower takes over).
            liveness_scope.cancel()


async def _ingest_layer(
    parts: _Parts, stop: trio.Event, port: int, task_status: trio.TaskStatus[int]
) -> float:
    """Ingest around the intake. Its drain: once the intake stopped, ingest writes
    and acks what it holds within SHUTDOWN_DRAIN_MS; returns that deadline."""
    settings = parts.settings
    drain_s = settings.shutdown_drain_s
    with trio.CancelScope() as ingest_scope:
        async with trio.open_nursery() as ingest:
            await ingest.start(
                functools.partial(
                    run_ingest,
                    max_body=settings.telemetry_max_body_bytes,
                    rejected_body_max=settings.rejected_body_max_bytes,
                    clock=parts.clock,
                    probe=parts.storage.answers,
                ),
                parts.pulled_rx,
                parts.storage,
                parts.bridge,
                parts.metrics,
                parts.ingest_state,
                parts.seen,
            )
            await _intake_layer(parts, stop, port, task_status)
            # One drain budget for the whole shutdown: ingest first, then the
            # status outbox until then too (the liveness layer).
            deadline = trio.current_time() + drain_s
            ingest_scope.deadline = deadline
    if ingest_scope.cancelled_caught:
        log.warning("ingest_drain_timeout", drain_s=drain_s)
    return deadline


async def _intake_layer(
    parts: _Parts, stop: trio.Event, port: int, task_status: trio.TaskStatus[int]
) -> None:
    """The two pulls and the decommission listener; the tree is started once they
    run. Its drain: none of its own: on `stop` it stops fetching, and the closed
    pull channel drains ingest."""
    settings, bridge = parts.settings, parts.bridge
    async with trio.open_nursery() as intake:
        intake.start_soon(
            functools.partial(
                bridge.run_pull,
                telemetry_spec(settings),
                parts.pulled_tx,
            )
        )
        intake.start_soon(bridge.run_pull, decommission_spec(), parts.decom_tx)
        intake.start_soon(run_decommission, parts.decom_rx, bridge, parts.store, parts.metrics)
        log.info(
            "started",
            metrics_port=port,
            durable=settings.nats_consumer_durable_name,
            batch_min=settings.telemetry_batch_min,
            batch_max=settings.telemetry_batch_size,
            flush_ms=settings.telemetry_flush_ms,
        )
        task_status.started(port)
        await stop.wait()
        log.info("shutdown_requested", drain_s=settings.shutdown_drain_s)
        # Stop fetching; the closed pull channel drains ingest.
        intake.cancel_scope.cancel()


async def _flush_seen_at_shutdown(
    seen: SeenBuffer, store: StateStore, acker: Acker, deadline: float
) -> None:
    with trio.move_on_at(deadline) as scope:
        try:
            await flush_seen(seen, store, acker)
        except DatabaseError as exc:
            log.warning("last_seen_flush_failed", error=str(exc)[:300], gateways=len(seen))
    if scope.cancelled_caught:
        log.warning("last_seen_flush_timeout", gateways=len(seen))


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal_received", signal=signal.Signals(signum).name)
            stop.set()


GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Fewer cyclic-GC passes: ingest allocates a few objects per message (nats-py's
    Msg, our tuple, the decoded row), nearly none of them in cycles, and at the
    default threshold (700 allocations) the collector ran every few dozen messages.
    Objects from start-up are frozen out of every pass. Measured (BENCHMARKS.md):
    +8-10 % backlog throughput, peak RSS unchanged.
    """
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def run_app(settings: Settings) -> int:
    """Run the daemon in a fresh Trio run; return the process exit code."""
    setup_logging(settings.log_level)
    tune_gc()
    return run_logged(functools.partial(run_daemon, settings))


def run_logged(daemon: Callable[..., Awaitable[None]]) -> int:
    """Run `daemon(task_status=...)` in a fresh Trio run and log how it ended.

    A database or NATS failure before `task_status.started()` is `startup_failed`;
    any failure after it is `fatal` (the daemon was running).
    """
    started = False

    async def main() -> None:
        nonlocal started
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon)
            started = True

    code = 0
    try:
        trio.run(main)
    except* (StartupError, DatabaseError) as group:
        if started:
            log.error("fatal", error=_describe(group), exc_info=True)
        else:
            log.error("startup_failed", error=_describe(group))
        code = 1
    except* KeyboardInterrupt:
        code = 130
    except* BaseException as group:  # the one place that reports a crash
        log.error("fatal", error=_describe(group), exc_info=True)
        code = 1
    return code


def _describe(group: BaseExceptionGroup[BaseException]) -> str:
    """The leaf exceptions of a group, as one line."""
    leaves: list[str] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(reversed(exc.exceptions))
        else:
            leaves.append(f"{type(exc).__name__}: {exc}")
    return "; ".join(leaves)
