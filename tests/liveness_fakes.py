"""In-memory fakes at the Protocol boundaries of the liveness parts (js/bridge.py,
dispatch.py), and a `Settings` factory. Every fake records Trio virtual times so
tests can assert exact schedules on `autojump_clock`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio

from notip_trio.config import Settings
from notip_trio.errors import DatabaseError, NatsRequestError
from notip_trio.horizon import AckFloor, Horizon
from notip_trio.js.delivery import JsMsg
from notip_trio.lanes import Key
from notip_trio.livestate import (
    Changes,
    GatewayRow,
    LoadChunk,
    LoadPosition,
    Report,
    Reports,
    RowStatus,
)
from notip_trio.metrics import Metrics

# Wall time that corresponds to Trio time 0 in tests (see `wall_at`).
WALL0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def wall_at(t: float) -> datetime:
    return WALL0 + timedelta(seconds=t)


def trio_wall_clock() -> datetime:
    """A wall clock that follows Trio's virtual clock: deterministic timestamps."""
    return wall_at(trio.current_time())


def make_settings(**overrides: Any) -> Settings:
    base = Settings(
        nats_url="tls://127.0.0.1:4222",
        nats_tls_ca=Path("ca.pem"),
        nats_tls_cert=Path("client.pem"),
        nats_tls_key=Path("client.key"),
        nats_consumer_durable_name="data-consumer-telemetry",
        nats_connect_timeout_s=10.0,
        db_host="localhost",
        db_port=5432,
        db_name="notip",
        db_user="notip",
        db_password="secret",
        db_max_conns=10,
        db_min_conns=2,
        db_ssl_mode="disable",
        db_ssl_root_cert=None,
        gateway_buffer_size=1000,
        heartbeat_tick_ms=10_000,
        heartbeat_grace_period_ms=0,
        alert_config_refresh_ms=120_000,
        alert_config_default_timeout_ms=30_000,
        alert_config_max_retries=10,
        alert_config_initial_backoff_ms=1000,
        alert_config_max_backoff_ms=30_000,
        metrics_host="127.0.0.1",
        metrics_port=0,
    )
    return dataclasses.replace(base, **overrides)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """Current value of sample `notip_consumer_<name>`; 0.0 for a label set not
    used yet. A name the registry does not have raises LookupError, as do labels
    the metric does not have: a renamed metric must fail an `== 0` check."""
    full = "notip_consumer_" + name
    value = metrics.registry.get_sample_value(full, labels or None)
    if value is not None:
        return value
    collector = metrics.registry._names_to_collectors.get(full)
    if collector is None:
        raise LookupError(f"no metric {full} in the registry")
    have = set(getattr(collector, "_labelnames", ()))
    if not labels or set(labels) != have:
        raise LookupError(f"{full} has labels {sorted(have)}, not {sorted(labels)}")
    return 0.0


Handler = Callable[[bytes], Awaitable[bytes]]


class FakeRequester:
    """`Requester` whose replies come from per-subject async handlers.

    `calls` records (virtual time, subject, decoded payload or None).
    """

    def __init__(self, handlers: dict[str, Handler] | None = None) -> None:
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.calls: list[tuple[float, str, Any]] = []

    async def request(self, subject: str, payload: bytes) -> bytes:
        self.calls.append((trio.current_time(), subject, json.loads(payload) if payload else None))
        handler = self.handlers.get(subject)
        if handler is None:
            raise NatsRequestError(f"{subject}: no responders")
        return await handler(payload)

    def times(self, subject: str) -> list[float]:
        return [t for t, s, _ in self.calls if s == subject]


def status_handler(
    states: dict[tuple[str, str], str] | None = None, *, delay_s: float = 0.0
) -> Handler:
    """get-status handler: the state from `states`, else online, after `delay_s`."""
    states = states if states is not None else {}

    async def handle(payload: bytes) -> bytes:
        req = json.loads(payload)
        if delay_s:
            await trio.sleep(delay_s)
        state = states.get((req["tenant_id"], req["gateway_id"]), "online")
        return json.dumps({"gateway_id": req["gateway_id"], "state": state}).encode()

    return handle


class FakePublisher:
    """`AlertPublisher` recording (virtual time, subject, body, msg_id) per PubAck.

    `failures` makes the next N publishes raise NatsRequestError; `delay_s`
    delays the PubAck; `attempts` records every call, failed or not.
    """

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.failures = 0
        self.published: list[tuple[float, str, dict[str, Any], str]] = []
        self.attempts: list[tuple[float, str]] = []  # (time, msg_id)

    async def publish(self, subject: str, payload: bytes, *, msg_id: str) -> None:
        self.attempts.append((trio.current_time(), msg_id))
        if self.delay_s:
            await trio.sleep(self.delay_s)
        if self.failures:
            self.failures -= 1
            raise NatsRequestError(f"{subject}: no PubAck")
        self.published.append((trio.current_time(), subject, json.loads(payload), msg_id))


@dataclasses.dataclass(frozen=True)
class QueuedUpdate:
    """A status report as the fake store's outbox keeps it (in queue order)."""

    tenant_id: str
    gateway_id: str
    status: str
    last_seen_at: datetime


class RecordingSink:
    """`StatusSink` counting wakes; `brief()`/`updates` show the reports the
    store queued with its transitions (every one, sent or not)."""

    def __init__(self, store: FakeStore | None = None) -> None:
        self.store = store
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1

    @property
    def updates(self) -> list[QueuedUpdate]:
        assert self.store is not None, "RecordingSink(store) to read the queued reports"
        return list(self.store.queued)

    def brief(self) -> list[tuple[str, str, datetime]]:
        return [(u.gateway_id, u.status, u.last_seen_at) for u in self.updates]


class FakeBatchSource:
    """Batches fed through `send` into `batches`, settled through this fake `Acker`,
    which records acked/naked/terminated subjects.

    After `send`, `await trio.testing.wait_all_tasks_blocked()` lets the
    consumer settle the batch.
    """

    def __init__(self) -> None:
        self._send, self.batches = trio.open_memory_channel[list[JsMsg]](10)
        self.acked: list[str] = []
        self.termed: list[str] = []
        self.naked: list[str] = []

    async def send(self, subjects: Sequence[str]) -> None:
        batch = [JsMsg(s, b'{"gatewayId":"x"}', f"$JS.ACK.{i}") for i, s in enumerate(subjects)]
        await self._send.send(batch)

    async def ack(self, msgs: Sequence[JsMsg]) -> None:
        self.acked += [m.subject for m in msgs]

    async def nak(self, msgs: Sequence[JsMsg], delay_s: float | None = None) -> None:
        self.naked += [m.subject for m in msgs]

    async def term(self, msgs: Sequence[JsMsg]) -> None:
        self.termed += [m.subject for m in msgs]


class FakeStore:
    """`StateStore` in memory with the table's semantics (livestate.py).

    `record(key, last_seen)` is what every replica's ingest does in its batch
    transaction. Every change takes the next "transaction id", and `changes`
    returns the rows changed since the cursor. `delay_s` delays every call;
    `down` makes every call raise DatabaseError. `calls` counts calls by name.
    """

    def __init__(self) -> None:
        self.rows: dict[Key, dict[str, Any]] = {}
        self._xid = 0
        self.delay_s = 0.0
        self.down = False
        self.calls: dict[str, int] = {}
        self.bulk_sizes: list[tuple[str, int]] = []  # (bulk call, keys passed)
        self.queued: list[QueuedUpdate] = []  # every report ever queued, in order
        self.outbox: dict[int, tuple[QueuedUpdate, datetime]] = {}  # pending, by id
        self._report_id = 0
        self.load_chunk_size = 1000
        self.retired: set[Key] = set()  # what purge_retired deletes

    def _queue(self, key: Key, status: str, last_seen: datetime) -> None:
        update = QueuedUpdate(key[0], key[1], status, last_seen)
        self.queued.append(update)
        self._report_id += 1
        self.outbox[self._report_id] = (update, last_seen)

    def record(self, key: Key, last_seen: datetime) -> None:
        self._xid += 1
        row = self.rows.get(key)
        if row is None:
            self.rows[key] = {"last_seen": last_seen, "status": "new", "status_last_seen": None,
                              "xid": self._xid}  # fmt: skip
        elif row["last_seen"] < last_seen:
            row["last_seen"] = last_seen
            row["status"] = "new" if row["status"] == "decommissioned" else row["status"]
            row["xid"] = self._xid

    def status(self, key: Key) -> str | None:
        row = self.rows.get(key)
        return None if row is None else str(row["status"])

    async def _enter(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.delay_s:
            await trio.sleep(self.delay_s)
        if self.down:
            raise DatabaseError("OperationalError: the database is down (fake)")

    def _row(self, key: Key, row: dict[str, Any]) -> GatewayRow:
        return GatewayRow(key, row["last_seen"], row["status"], row["status_last_seen"])

    async def record_seen(self, seen: Mapping[Key, datetime]) -> None:
        await self._enter("record_seen")
        for key, at in seen.items():
            self.record(key, at)

    async def load(self) -> Changes:
        await self._enter("load")
        rows = [self._row(k, r) for k, r in self.rows.items() if r["status"] != "decommissioned"]
        return Changes(rows, self._xid + 1)

    async def load_chunk(self, after: LoadPosition | None) -> LoadChunk:
        """`load_chunk_size` tracked rows in key order after `after` (a key)."""
        await self._enter("load_chunk")
        keys = sorted(
            k
            for k, r in self.rows.items()
            if r["status"] != "decommissioned" and (after is None or k > after)  # type: ignore[operator]
        )[: self.load_chunk_size]
        online: list[tuple[str, list[str], list[float]]] = []
        for k in keys:
            if self.rows[k]["status"] == "online":
                if not online or online[-1][0] != k[0]:
                    online.append((k[0], [], []))
                online[-1][1].append(k[1])
                online[-1][2].append(self.rows[k]["last_seen"].timestamp())
        rows = [self._row(k, self.rows[k]) for k in keys if self.rows[k]["status"] != "online"]
        resume = keys[-1] if len(keys) >= self.load_chunk_size else None
        return LoadChunk(online, rows, resume, self._xid + 1 if after is None else None)

    async def purge_retired(self, older_than_s: float, limit: int) -> list[tuple[Key, RowStatus]]:
        """Purges those in `retired` (the fake keeps no times), `limit` at a time."""
        await self._enter("purge_retired")
        gone = [k for k in sorted(self.retired) if k in self.rows][:limit]
        for key in gone:
            self.retired.discard(key)
        return [(key, self.rows.pop(key)["status"]) for key in gone]

    async def purge_rejected(self, older_than_s: float, limit: int) -> int:
        await self._enter("purge_rejected")
        return 0

    async def changes(self, cursor: int) -> Changes:
        await self._enter("changes")
        rows = [self._row(k, r) for k, r in self.rows.items() if r["xid"] >= cursor]
        return Changes(rows, self._xid + 1)

    async def current_last_seen(self, key: Key) -> datetime | None:
        await self._enter("current_last_seen")
        row = self.rows.get(key)
        if row is None or row["status"] == "decommissioned":
            return None
        return row["last_seen"]  # type: ignore[no-any-return]

    async def mark_online(self, keys: Sequence[Key]) -> list[tuple[Key, datetime]]:
        await self._enter("mark_online")
        won = []
        for key in sorted(set(keys)):
            row = self.rows.get(key)
            if row is None:
                continue
            back = row["status"] == "offline" and row["last_seen"] > row["status_last_seen"]
            if row["status"] == "new" or back:
                self._xid += 1
                row.update(status="online", status_last_seen=row["last_seen"], xid=self._xid)
                won.append((key, row["last_seen"]))
                self._queue(key, "online", row["last_seen"])
        return won

    async def mark_offline(self, key: Key, last_seen: datetime) -> datetime | None:
        await self._enter("mark_offline")
        row = self.rows.get(key)
        if row is None or row["status"] != "online" or row["last_seen"] < last_seen:
            return None
        self._xid += 1
        row.update(status="offline", status_last_seen=last_seen, xid=self._xid)
        self._queue(key, "offline", last_seen)
        return row["last_seen"]  # type: ignore[no-any-return]

    async def current_last_seen_many(self, keys: Sequence[Key]) -> dict[Key, datetime]:
        await self._enter("current_last_seen_many")
        self.bulk_sizes.append(("current_last_seen_many", len(keys)))
        return {
            key: row["last_seen"]
            for key in keys
            if (row := self.rows.get(key)) is not None and row["status"] != "decommissioned"
        }

    async def mark_offline_many(self, alerted: Mapping[Key, datetime]) -> dict[Key, datetime]:
        """In key order, like the statement; only the rows that change report."""
        await self._enter("mark_offline_many")
        self.bulk_sizes.append(("mark_offline_many", len(alerted)))
        won = {}
        for key in sorted(alerted):
            row = self.rows.get(key)
            last_seen = alerted[key]
            if row is None or row["status"] != "online" or row["last_seen"] < last_seen:
                continue
            self._xid += 1
            row.update(status="offline", status_last_seen=last_seen, xid=self._xid)
            self._queue(key, "offline", last_seen)
            won[key] = row["last_seen"]
        return won

    def transition_unreported(self, key: Key, status: str, last_seen: datetime) -> None:
        """A transition made (and reported) by a release without the outbox."""
        self._xid += 1
        self.rows[key].update(status=status, status_last_seen=last_seen, xid=self._xid)

    async def pending_reports(self, limit: int) -> Reports:
        await self._enter("pending_reports")
        out = []
        for report_id in sorted(self.outbox)[:limit]:
            update, last_seen = self.outbox[report_id]
            key = (update.tenant_id, update.gateway_id)
            newer_queued = any(
                (u.tenant_id, u.gateway_id) == key
                for i, (u, _) in self.outbox.items()
                if i > report_id
            )
            row = self.rows.get(key)
            current = None if row is None else (row["status"], row["status_last_seen"])
            superseded = (
                row is not None and current != (update.status, last_seen) and not newer_queued
            )
            out.append(Report(report_id, key, update.status, last_seen, superseded))  # type: ignore[arg-type]
        return Reports(out, len(self.outbox))

    async def clear_reports(self, ids: Sequence[int]) -> None:
        await self._enter("clear_reports")
        for report_id in ids:
            self.outbox.pop(report_id, None)

    async def decommission(self, key: Key, at: datetime | None = None) -> bool:
        await self._enter("decommission")
        row = self.rows.get(key)
        tracked = row is not None and row["status"] != "decommissioned"
        self._xid += 1
        if row is None:
            assert at is not None
            self.rows[key] = {"last_seen": at, "status": "decommissioned",
                              "status_last_seen": None, "xid": self._xid}  # fmt: skip
        else:
            last = row["last_seen"] if at is None else max(row["last_seen"], at)
            row.update(status="decommissioned", last_seen=last, xid=self._xid)
        return tracked


class CaughtUp:
    """An alert horizon that is always now (by `clock`, the tracker's wall clock:
    `trio_wall_clock` by default): nothing lags."""

    def __init__(self, clock: Callable[[], datetime] = trio_wall_clock) -> None:
        self._clock = clock

    async def read(self) -> Horizon:
        now = self._clock().timestamp()
        return Horizon(at=now, now=now, bounded=False)


class FakePosition:
    """`ConsumerPosition` over an in-memory stream: messages get sequences and
    stream times; `ack` acknowledges them; the floor is computed as JetStream's."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}  # stream seq -> stream time (epoch seconds)
        self.acked: set[int] = set()
        self.failing = False
        self.reads = 0

    def publish(self, stream_time: float) -> int:
        seq = len(self.times) + 1
        self.times[seq] = stream_time
        return seq

    def ack(self, *seqs: int) -> None:
        self.acked.update(seqs)

    async def ack_floor(self) -> AckFloor:
        self.reads += 1
        if self.failing:
            raise NatsRequestError("$JS.API.CONSUMER.INFO: no responders (fake)")
        floor = 0
        while floor + 1 in self.acked:
            floor += 1
        unacked = len(self.times) - len(self.acked)
        return AckFloor(stream_seq=floor, num_ack_pending=unacked, num_pending=0)

    async def first_time_from(self, stream_seq: int) -> float | None:
        later = [seq for seq in self.times if seq >= stream_seq]
        return self.times[min(later)] if later else None
