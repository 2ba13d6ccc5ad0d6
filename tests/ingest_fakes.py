"""In-memory fakes at the boundaries of ingest (db/writer.py, js/bridge.py) and
telemetry messages with real ack subjects.

`Events` is one log shared by `FakeWriter` and `FakeAcker`: (virtual time, what,
details...), so a test can state the order of writes, commits, acks, naks and
terms exactly. A message's stream sequence is its number in those details.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from devstack import simulator
from notip_trio.db.writer import RejectedRecord, WriteResult
from notip_trio.envelope import Row
from notip_trio.errors import DatabaseError
from notip_trio.ingest import SeenBuffer
from notip_trio.js.delivery import JsMsg
from notip_trio.lanes import Key
from notip_trio.metrics import Metrics

BASE = dt.datetime(2026, 11, 27, tzinfo=dt.UTC)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """A sample's current value; fails on a name the registry does not have."""
    found = metrics.registry.get_sample_value("notip_consumer_" + name, labels or None)
    assert found is not None, f"no sample notip_consumer_{name} {labels}"
    return found


# --- messages -----------------------------------------------------------------


STREAM_T0_NS = 1_700_000_000_000_000_000  # stream time of message 0; message n: + n s


def ack_subject(seq: int, delivered: int = 1, at: dt.datetime | None = None) -> str:
    """A v1 ack subject; the stream time is `at`, or STREAM_T0 + `seq` seconds."""
    ts = STREAM_T0_NS + seq * 10**9 if at is None else round(at.timestamp() * 1e6) * 1000
    return f"$JS.ACK.TELEMETRY.data-consumer-telemetry.{delivered}.{seq}.{seq}.{ts}.0"


def stream_time(seq: int) -> dt.datetime:
    """The stream time `ack_subject(seq)` carries by default."""
    return dt.datetime.fromtimestamp(STREAM_T0_NS // 10**9 + seq, dt.UTC)


def envelope(gateway: str, seq: int, **fields: Any) -> bytes:
    body = simulator.envelope_fields(
        gateway, f"s{seq}", "temperature", BASE + dt.timedelta(seconds=seq), rng=random.Random(seq)
    )
    body.update(fields)
    return json.dumps(body, separators=(",", ":")).encode()


def good(
    seq: int, gateway: str = "gw-1", tenant: str = "t1", at: dt.datetime | None = None
) -> JsMsg:
    return JsMsg(
        f"telemetry.data.{tenant}.{gateway}", envelope(gateway, seq), ack_subject(seq, at=at)
    )


def bad(
    seq: int, body: bytes = b'{"gatewayId": ', subject: str = "telemetry.data.t1.gw-1"
) -> JsMsg:
    return JsMsg(subject, body, ack_subject(seq))


def spoofed(
    seq: int, subject_gateway: str, payload_gateway: str, at: dt.datetime | None = None
) -> JsMsg:
    """A valid envelope of `payload_gateway` on the subject of `subject_gateway`."""
    return JsMsg(
        f"telemetry.data.t1.{subject_gateway}",
        envelope(payload_gateway, seq),
        ack_subject(seq, at=at),
    )


def seqs(msgs: Sequence[JsMsg]) -> list[int]:
    out = []
    for m in msgs:
        delivery = m.delivery
        assert delivery is not None
        out.append(delivery.stream_seq)
    return out


# --- fakes ----------------------------------------------------------------------


class Events:
    """One log for the writer and the acker: (virtual time, what, details...)."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def add(self, *what: Any) -> None:
        self.log.append((trio.current_time(), *what))

    def only(self, *kinds: str) -> list[tuple[Any, ...]]:
        return [e for e in self.log if e[1] in kinds]


class FakeWriter:
    """`Writer`: logs "write" (rows, rejected) when called, then "commit" or "fail".

    `hold_s` keeps each write in progress that long (virtual time); `fail` makes
    the next N writes raise DatabaseError instead of committing.
    """

    def __init__(self, events: Events, *, hold_s: float = 0.0, fail: int = 0) -> None:
        self.events = events
        self.hold_s = hold_s
        self.fail = fail
        self.rows: list[Row] = []  # committed
        self.rejected: list[RejectedRecord] = []  # committed

    async def write_batch(
        self, rows: Sequence[Row], rejected: Sequence[RejectedRecord]
    ) -> WriteResult:
        self.events.add("write", len(rows), len(rejected))
        await trio.sleep(self.hold_s)
        if self.fail:
            self.fail -= 1
            self.events.add("fail")
            raise DatabaseError("OperationalError: the connection is lost")
        self.rows += rows
        self.rejected += rejected
        self.events.add("commit", [r.sensor_id for r in rows], [r.stream_seq for r in rejected])
        return WriteResult(inserted=len(rows), duplicates=0)


class RecordingSeenBuffer(SeenBuffer):
    """A `SeenBuffer` that keeps each batch's last-seen as it is added, and where
    in the event log that happened (`positions`: events logged before it)."""

    def __init__(self, events: Events) -> None:
        super().__init__()
        self.events = events
        self.added: list[dict[Key, dt.datetime]] = []
        self.positions: list[int] = []

    def add(self, seen: Mapping[Key, dt.datetime], msgs: Sequence[JsMsg] = ()) -> None:
        super().add(seen, msgs)
        self.added.append(dict(seen))
        self.positions.append(len(self.events.log))


class FakeAcker:
    """`Acker` logging each call by stream sequence. An empty call is not logged:
    the real one sends nothing for it."""

    def __init__(self, events: Events) -> None:
        self.events = events

    async def ack(self, msgs: Sequence[JsMsg]) -> None:
        if msgs:
            self.events.add("ack", seqs(msgs))

    async def nak(self, msgs: Sequence[JsMsg], delay_s: float | None = None) -> None:
        if msgs:
            self.events.add("nak", seqs(msgs), delay_s)

    async def term(self, msgs: Sequence[JsMsg]) -> None:
        if msgs:
            self.events.add("term", seqs(msgs))
