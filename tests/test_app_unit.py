"""The daemon's task tree (app.py) on in-memory fakes and Trio's virtual clock.

What is exercised: the whole tree of `_serve` (HTTP server, alert configs,
dispatcher, leadership and liveness, ingest, the pulls, decommission) with a
fake database, a fake liveness state table, a lock that is always ours and a
fake NATS bridge, so the shutdown budget (SHUTDOWN_DRAIN_MS: ingest first, the
status queue the rest, plus a second should ingest use it all) is measured in
exact virtual seconds while a write and a status update are held. And the
reasons /readyz gives. The three gateways of the state table are new when the
tree starts: the leader marks them online at once (0 s), their reports queued
in the outbox with the transitions; the dispatcher sends them, and the tests
hold update-status.

Rules for this file: `autojump_clock`; no real I/O in flight (the HTTP server
listens on 127.0.0.1 port 0 but is never asked); every test has a hang guard.
The management API's update-status never answers where a test holds it: the
real `MgmtClient` then tries 4 times (5 s each, 1 + 2 + 4 s between), so an
update started at 0 s is still in flight long after any drain here has ended.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from notip_trio import app
from notip_trio.app import Health
from notip_trio.errors import DatabaseError
from notip_trio.ingest import SEEN_FLUSH_S, IngestState
from notip_trio.js.delivery import JsMsg
from notip_trio.js.specs import PullSpec
from notip_trio.metrics import Metrics
from notip_trio.mgmt import SUBJECT_GET_STATUS, SUBJECT_LIST_CONFIGS, SUBJECT_UPDATE_STATUS
from notip_trio.wire import TELEMETRY_STREAM
from tests.ingest_fakes import Events, FakeAcker, FakeWriter, good, value
from tests.liveness_fakes import FakeStore, make_settings

GUARD_S = 3600
DRAIN_S = 3.0


class FakeStorage(FakeWriter):
    """`Storage` as the task tree uses it: write_batch (FakeWriter), ping and answers."""

    def __init__(self, events: Events, *, hold_s: float = 0.0, ping_error: str = "") -> None:
        super().__init__(events, hold_s=hold_s)
        self.ping_error = ping_error

    async def ping(self, *, timeout_s: float = 2.0) -> None:
        if self.ping_error:
            raise DatabaseError(self.ping_error)

    async def answers(self, *, timeout_s: float = 1.0) -> bool:
        return not self.ping_error


class FakeBridge(FakeAcker):
    """`NatsBridge` as the task tree uses it.

    `feed` hands batches to the telemetry pull; the decommission pull stays
    empty. Management requests: no alert configs, every gateway online, and
    update-status either answered at once or (`hold_updates`) never.
    """

    def __init__(self, events: Events, *, hold_updates: bool) -> None:
        super().__init__(events)
        self.connected = True
        self.hold_updates = hold_updates
        self.feed, self._telemetry = trio.open_memory_channel[list[JsMsg]](16)
        self.update_attempts: list[tuple[float, str]] = []  # (time, gateway_id)
        self.updated: list[tuple[float, str, str]] = []  # answered: (time, gateway, status)

    async def run_pull(
        self,
        spec: PullSpec,
        out: trio.MemorySendChannel[list[JsMsg]],
        *,
        observe_pending: Any = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with out:
            task_status.started()
            if spec.stream != TELEMETRY_STREAM:
                await trio.sleep_forever()
            async for batch in self._telemetry:
                await out.send(batch)

    async def request(self, subject: str, payload: bytes) -> bytes:
        if subject == SUBJECT_LIST_CONFIGS:
            return b"[]"
        if subject.startswith("$JS.API.CONSUMER.INFO."):  # the alert horizon: all acked
            return b'{"ack_floor": {"stream_seq": 0}, "num_ack_pending": 0, "num_pending": 0}'
        req = json.loads(payload)
        if subject == SUBJECT_GET_STATUS:
            return json.dumps({"gateway_id": req["gateway_id"], "state": "online"}).encode()
        assert subject == SUBJECT_UPDATE_STATUS
        self.update_attempts.append((trio.current_time(), req["gateway_id"]))
        if self.hold_updates:
            await trio.sleep_forever()
        self.updated.append((trio.current_time(), req["gateway_id"], req["status"]))
        return b'{"success": true}'

    async def publish(self, subject: str, payload: bytes, *, msg_id: str) -> None:
        raise AssertionError("no alert is due in these tests")


class OurLock:
    """The liveness lock, always this replica's."""

    async def try_acquire(self) -> bool:
        return True

    async def check(self) -> None:
        pass

    async def release(self) -> None:
        pass


@dataclasses.dataclass
class Outcome:
    stopped_at: float
    returned_at: float
    events: list[tuple[Any, ...]]
    bridge: FakeBridge
    store: FakeStore
    metrics: Metrics
    log: list[logging.LogRecord]


async def _run_tree(
    caplog: pytest.LogCaptureFixture,
    *,
    write_hold_s: float,
    hold_updates: bool,
    batches: Sequence[list[JsMsg]],
    stop_at: float,
) -> Outcome:
    """Start the tree at 0, feed `batches` at 1 s, set `stop` at `stop_at`."""
    settings = make_settings(
        shutdown_drain_ms=int(DRAIN_S * 1000), metrics_host="127.0.0.1", metrics_port=0
    )
    events = Events()
    storage = FakeStorage(events, hold_s=write_hold_s)
    bridge = FakeBridge(events, hold_updates=hold_updates)
    metrics, stop = Metrics(), trio.Event()
    store = FakeStore()
    for gateway in ("gw-1", "gw-2", "gw-3"):  # heard just now: none is due
        store.record(("t1", gateway), dt.datetime.now(dt.UTC))
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(app._serve, store=store, lock=OurLock()),
            settings,
            metrics,
            storage,
            bridge,
            stop,
        )
        await trio.sleep_until(1)
        for batch in batches:
            await bridge.feed.send(batch)
        await trio.sleep_until(stop_at)
        stop.set()
    return Outcome(
        stop_at, trio.current_time(), events.log, bridge, store, metrics, list(caplog.records)
    )


def _logged(outcome: Outcome, event: str) -> list[dict[str, Any]]:
    return [dict(getattr(r, "notip_ctx", {})) for r in outcome.log if r.getMessage() == event]


THREE_GATEWAYS = [[good(1, "gw-1")], [good(2, "gw-2")], [good(3, "gw-3")]]


async def test_a_held_write_and_a_held_update_end_at_drain_plus_one_second(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Ingest uses the whole budget: the write of batch 1 never ends, batch 2
    waits for the writer and batch 3 in the decode stage. The outbox holds three
    online reports, the first of them in flight and never answered. Stop at 4 s:
    ingest is cut at 4 + 3 s; the outbox gets one more second, then leading
    stops: the tree returns at 8 s with the three reports still in the outbox
    for the next leader (nothing dropped), and nothing acked, nak'd or
    terminated (never committed: the messages come back after ack_wait)."""
    with trio.fail_after(GUARD_S):
        outcome = await _run_tree(
            caplog, write_hold_s=math.inf, hold_updates=True, batches=THREE_GATEWAYS, stop_at=4
        )
    assert outcome.returned_at == 4 + DRAIN_S + 1
    assert outcome.events == [(1, "write", 1, 0)]
    # Attempt 1 at 0 s timed out at 5 s; attempt 2 at 6 s was cut at 8 s.
    assert outcome.bridge.update_attempts == [(0, "gw-1"), (6, "gw-1")]
    assert outcome.bridge.updated == []
    assert len(outcome.store.outbox) == 3
    assert value(outcome.metrics, "status_update_dropped_total") == 0
    assert _logged(outcome, "ingest_drain_timeout") == [{"drain_s": DRAIN_S}]
    assert _logged(outcome, "status_updates_drain_timeout") == [{"left": 3}]


async def test_when_ingest_drains_in_time_the_status_queue_gets_the_rest_of_the_budget(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The write of the one batch in hand takes 1 s (1 to 2 s); its last-seen is
    written and it is acked at 2 s; the outbox then gets the rest of the budget
    (stop at 1.5 + 3 s) and no longer: the tree returns at 4.5 s."""
    batch = [good(1, "gw-1"), good(2, "gw-2"), good(3, "gw-3")]
    with trio.fail_after(GUARD_S):
        outcome = await _run_tree(
            caplog, write_hold_s=1, hold_updates=True, batches=[batch], stop_at=1.5
        )
    assert outcome.returned_at == 1.5 + DRAIN_S
    assert outcome.events == [
        (1, "write", 3, 0),
        (2, "commit", ["s1", "s2", "s3"], []),
        (2, "ack", [1, 2, 3]),
    ]
    # One update in flight, the first in (tenant, gateway) order.
    assert outcome.bridge.update_attempts == [(0, "gw-1")]
    assert len(outcome.store.outbox) == 3
    assert value(outcome.metrics, "status_update_dropped_total") == 0
    assert _logged(outcome, "ingest_drain_timeout") == []
    assert _logged(outcome, "status_updates_drain_timeout") == [{"left": 3}]


async def test_with_nothing_held_the_tree_returns_at_once_having_sent_everything(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(GUARD_S):
        outcome = await _run_tree(
            caplog, write_hold_s=0, hold_updates=False, batches=THREE_GATEWAYS, stop_at=1.5
        )
    assert outcome.returned_at == 1.5
    # Each batch acked once its last-seen is written (one write of last-seen at
    # most every SEEN_FLUSH_S, 0.1 s: the first at once, the others with the next).
    assert [e for e in outcome.events if e[1] != "ack"] == [
        (1, "write", 1, 0),
        (1, "commit", ["s1"], []),
        (1, "write", 1, 0),
        (1, "commit", ["s2"], []),
        (1, "write", 1, 0),
        (1, "commit", ["s3"], []),
    ]
    acks = [(i, e) for i, e in enumerate(outcome.events) if e[1] == "ack"]
    assert sorted(seq for _, e in acks for seq in e[2]) == [1, 2, 3]
    for i, (at, _, seqs) in acks:
        commits = [j for j, e in enumerate(outcome.events) if e[1] == "commit"]
        assert all(commits[seq - 1] < i for seq in seqs)  # never before its commit
        assert at in (1, pytest.approx(1 + SEEN_FLUSH_S))
    assert outcome.store.outbox == {}
    assert outcome.bridge.updated == [
        (0, "gw-1", "online"),
        (0, "gw-2", "online"),
        (0, "gw-3", "online"),
    ]
    assert value(outcome.metrics, "status_update_dropped_total") == 0
    assert _logged(outcome, "ingest_drain_timeout") == []
    assert _logged(outcome, "status_updates_drain_timeout") == []
    assert len(_logged(outcome, "status_updates_drained")) == 1


# --- /readyz reasons ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("connected", "running", "ping_error", "reasons"),
    [
        (True, True, "", []),
        (False, True, "", ["nats: not connected"]),
        (True, False, "", ["ingest: not running"]),
        (True, True, "PoolTimeout: no connection", ["database: PoolTimeout: no connection"]),
        (
            False,
            False,
            "PoolTimeout: no connection",
            ["nats: not connected", "ingest: not running", "database: PoolTimeout: no connection"],
        ),
    ],
)
async def test_readiness_names_each_part_that_is_not_ready(
    autojump_clock: trio.abc.Clock,
    connected: bool,
    running: bool,
    ping_error: str,
    reasons: list[str],
) -> None:
    events = Events()
    bridge = FakeBridge(events, hold_updates=False)
    bridge.connected = connected
    health = Health(
        FakeStorage(events, ping_error=ping_error),  # type: ignore[arg-type]
        bridge,  # type: ignore[arg-type]
        IngestState(running=running),
    )
    with trio.fail_after(GUARD_S):
        assert await health.reasons() == reasons


# --- how run_app reports the end ------------------------------------------------


async def _fails_before_start(*, task_status: trio.TaskStatus[int]) -> None:
    await trio.lowlevel.checkpoint()
    raise DatabaseError("cannot connect to PostgreSQL (fake)")


async def _fails_after_start(*, task_status: trio.TaskStatus[int]) -> None:
    task_status.started(0)
    await trio.lowlevel.checkpoint()
    raise DatabaseError("AdminShutdown (fake)")


@pytest.mark.parametrize(
    ("daemon", "event"),
    [(_fails_before_start, "startup_failed"), (_fails_after_start, "fatal")],
)
def test_a_failure_after_start_is_not_logged_as_startup_failed(
    caplog: pytest.LogCaptureFixture, daemon: Any, event: str
) -> None:
    caplog.set_level(logging.INFO)
    assert app.run_logged(daemon) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [event]
    assert "DatabaseError" in getattr(errors[0], "notip_ctx", {})["error"]
