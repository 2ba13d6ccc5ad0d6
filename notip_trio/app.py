"""The task tree: one root nursery supervising every part of the daemon.

Start order (each `nursery.start` returns only when its task is truly ready):

    metrics/health server ─ alert configs ─ status dispatcher ─ leadership
      ─ ingest (writer ready) ─ telemetry pull ─ decommission pull
      ─ signal watcher

Channels (all bounded):

    telemetry pull ──list[JsMsg] (pipeline depth)──▶ ingest ──▶ COPY + last-seen (one txn)
    leader (liveness) ──StatusUpdate (GATEWAY_BUFFER_SIZE, never blocks)──▶ dispatcher
    decommission pull ──list[JsMsg] (1)──▶ decommission ──▶ tombstone in the state table

Liveness runs only while this replica holds the advisory lock (`leader.py`);
it reads the state every replica's ingest writes (`livestate.py`). The pull
path tells the catch-up horizon how far behind the consumer is.

Shutdown (SIGTERM/SIGINT): stop pulling, let ingest write and ack what it
holds (bounded by SHUTDOWN_DRAIN_MS), stop leading (the lock is released: a
follower takes over), drain the status queue (bounded), close NATS and the
pool, return. Any unexpected exception cancels the whole tree and propagates
to `__main__`, which exits non-zero.
"""

from __future__ import annotations

# trio_asyncio must be imported before psycopg (NOTES.md).
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
from .decommission import run_decommission
from .dispatch import Dispatcher
from .http import run_http_server
from .ingest import SEEN_FLUSH_S, IngestState, run_ingest, run_seen_flusher
from .jetstream import JsMsg, NatsBridge, PullSpec, StartupError
from .leader import AdvisoryLock, Lock, run_leadership
from .liveness import CatchUp, LivenessTracker, lead_liveness
from .livestate import PgStateStore, SeenBuffer, StateStore, flush_seen
from .log import get_logger, setup_logging
from .metrics import Metrics
from .mgmt import MgmtClient
from .progress import ProgressWatchdog
from .storage import DatabaseError, Storage

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


def telemetry_spec(settings: Settings) -> PullSpec:
    batch = settings.telemetry_batch_size
    depth = settings.telemetry_pipeline_depth
    return PullSpec(
        stream=wire.TELEMETRY_STREAM,
        durable=settings.nats_consumer_durable_name,
        filter_subject=wire.TELEMETRY_SUBJECTS,
        batch=batch,
        batch_min=settings.telemetry_batch_min,
        expires_s=settings.telemetry_flush_ms / 1000,
        depth=depth,
        # Slots + the pulled channel + the decode stage + the write stage hold batches
        # (at most `batch` each: the adaptive size never exceeds it).
        max_ack_pending=max(1000, batch * (2 * depth + 3)),
    )


def decommission_spec() -> PullSpec:
    return PullSpec(
        stream=wire.DECOMMISSION_STREAM,
        durable=wire.DECOMMISSION_DURABLE,
        filter_subject=wire.DECOMMISSION_SUBJECTS,
        batch=100,
        # A decommission is acted on within about a second, even when it comes alone.
        expires_s=1.0,
        depth=1,
        max_ack_pending=1000,
    )


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
    metrics.heartbeat_tick_interval.set(settings.heartbeat_tick_ms / 1000)
    metrics.alert_cache_refresh_interval.set(settings.alert_config_refresh_ms / 1000)
    stop = stop if stop is not None else trio.Event()
    async with trio_asyncio.open_loop():
        storage = Storage.create(
            settings.db_conninfo(),
            min_size=settings.db_min_conns,
            max_size=settings.db_max_conns,
            write_timeout_s=settings.db_write_timeout_ms / 1000,
            migrate_timeout_s=settings.db_migrate_timeout_ms / 1000,
        )
        await storage.open(timeout_s=30.0)
        try:
            schema = await storage.migrate()
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
    watchdog = ProgressWatchdog(
        stall_s=settings.livez_stall_ms / 1000,
        tick_s=settings.heartbeat_tick_ms / 1000,
        started_at=trio.current_time(),
    )
    ingest_state = IngestState(progress=watchdog.ingest)
    health = Health(storage, bridge, ingest_state)

    def live() -> list[str]:
        now = trio.current_time()
        watchdog.nats_connected(bridge.connected, now)
        return watchdog.problems(now)

    mgmt = MgmtClient(bridge)
    cache = AlertConfigCache(settings.alert_config_default_timeout_ms)
    drain_s = settings.shutdown_drain_ms / 1000
    tick_s = settings.heartbeat_tick_ms / 1000
    dispatcher = Dispatcher(mgmt, metrics, capacity=settings.gateway_buffer_size, drain_s=drain_s)
    catch_up = CatchUp(
        threshold=settings.liveness_catchup_pending,
        # Batches delivered before the consumer was seen caught up may still be
        # in flight on some replica: give them this long to commit, and their
        # last-seen to reach the table (written once a second).
        settle_s=max(1.0, 2 * settings.telemetry_flush_ms / 1000) + SEEN_FLUSH_S,
        max_lag_s=settings.liveness_catchup_max_ms / 1000,
        wall=time.time,
    )
    grace_until = trio.current_time() + settings.heartbeat_grace_period_ms / 1000
    seen = SeenBuffer()

    async def lead() -> None:
        tracker = LivenessTracker(
            store,
            cache,
            mgmt,
            bridge,
            dispatcher,
            metrics,
            catch_up,
            grace_until=grace_until,
            concurrency=settings.liveness_query_concurrency,
        )
        await lead_liveness(tracker, tick_s, observer=watchdog)

    pulled_tx, pulled_rx = trio.open_memory_channel[list[JsMsg]](settings.telemetry_pipeline_depth)
    decom_tx, decom_rx = trio.open_memory_channel[list[JsMsg]](1)

    async with trio.open_nursery() as root:
        port = await root.start(
            functools.partial(run_http_server, liveness=live),
            settings.metrics_host,
            settings.metrics_port,
            metrics.registry,
            health.reasons,
        )
        await root.start(
            run_alert_configs, mgmt, cache, FetchPolicy.from_settings(settings), metrics
        )
        dispatch_done = trio.Event()
        root.start_soon(_run_then_set, dispatcher.run, dispatch_done)
        root.start_soon(_watch_signals, stop)

        with trio.CancelScope() as liveness_scope:
            async with trio.open_nursery() as liveness:
                await liveness.start(
                    functools.partial(
                        run_leadership,
                        lock,
                        lead,
                        metrics,
                        retry_s=min(1.0, tick_s / 2),
                        check_s=min(1.0, tick_s / 2),
                    )
                )
                await liveness.start(run_seen_flusher, seen, store, metrics)
                with trio.CancelScope() as ingest_scope:
                    async with trio.open_nursery() as ingest:
                        await ingest.start(
                            functools.partial(
                                run_ingest,
                                max_body=settings.telemetry_max_body_bytes,
                                rejected_body_max=settings.rejected_body_max_bytes,
                            ),
                            pulled_rx,
                            storage,
                            bridge,
                            metrics,
                            ingest_state,
                            seen,
                        )
                        async with trio.open_nursery() as intake:
                            intake.start_soon(
                                functools.partial(
                                    bridge.run_pull,
                                    telemetry_spec(settings),
                                    pulled_tx,
                                    observe_pending=catch_up.observe,
                                )
                            )
                            intake.start_soon(bridge.run_pull, decommission_spec(), decom_tx)
                            intake.start_soon(run_decommission, decom_rx, bridge, store, metrics)
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
                            log.info("shutdown_requested", drain_s=drain_s)
                            # Stop fetching; the closed pull channel drains ingest.
                            intake.cancel_scope.cancel()
                        # One drain budget for the whole shutdown: ingest first, the
                        # status queue until then too, plus a second should ingest
                        # use it all.
                        deadline = trio.current_time() + drain_s
                        ingest_scope.deadline = deadline
                        dispatcher.drain_by(deadline + 1.0)
                if ingest_scope.cancelled_caught:
                    log.warning("ingest_drain_timeout", drain_s=drain_s)
                # What ingest committed last reaches the state table too (bounded).
                await _flush_seen_at_shutdown(seen, store, max(deadline, trio.current_time() + 0.5))
                # Stop leading (releases the lock at once: a follower takes over).
                liveness_scope.cancel()
        dispatcher.close()
        await dispatch_done.wait()  # bounded by the dispatcher itself (drain_by)
        root.cancel_scope.cancel()


async def _flush_seen_at_shutdown(seen: SeenBuffer, store: StateStore, deadline: float) -> None:
    with trio.move_on_at(deadline) as scope:
        try:
            await flush_seen(seen, store)
        except DatabaseError as exc:
            log.warning("last_seen_flush_failed", error=str(exc)[:300], gateways=len(seen))
    if scope.cancelled_caught:
        log.warning("last_seen_flush_timeout", gateways=len(seen))


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal_received", signal=signal.Signals(signum).name)
            stop.set()


async def _run_then_set(fn: Callable[[], Awaitable[None]], done: trio.Event) -> None:
    try:
        await fn()
    finally:
        done.set()


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
