"""The alert horizon: up to which stream time may silences be judged?

A gateway is silent only if no message of it reached the stream between its
last-seen and now; the leader knows a message only once its last-seen is
stored. Ingest acknowledges a message only after its row *and* its gateway's
last-seen are committed (`ingest.py`), so every message at or below the
durable's ack floor is known to the state table. The horizon is therefore the
stream time of the first message *above* the ack floor, read from JetStream
(consumer info, then a message get by sequence): everything that reached the
stream before it is stored. When nothing is pending or unacknowledged, the
horizon is the stream's "now". Nothing is guessed from empty pulls: a delivery
held unacknowledged by a replica that died (until `ack_wait`), a batch nak'ed
with a delay after a database error, or a consumer sitting at MaxAckPending
all keep the floor, and so the horizon, where they are.

One clock: last-seen and the floor's time are stream time (the NATS server's
clock); the leader's own clock may run ahead or behind it. `StreamClock`
estimates that skew from what ingest receives (the newest stream timestamp of
each batch against this host's clock at receipt: the smallest difference seen
recently is the skew plus the shortest delivery delay, never less than the
skew), so "now" in stream time is never later than the server's now: a leader
whose clock runs ahead does not alert live gateways.

The bound `max_lag_s` (LIVENESS_CATCHUP_MAX_MS) keeps a floor that does not
move (a poison message redelivered for ever, say) from holding alerts back for
ever: the horizon never trails stream-now by more than that.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .js.bridge import Requester
from .log import get_logger

log = get_logger(__name__)

# How long one skew sample counts: the estimate is the minimum over the last
# one to two windows (a clock stepped by NTP is followed within two windows).
SKEW_WINDOW_S: Final = 60.0


class HorizonError(Exception):
    """The consumer's position could not be read (JetStream answered an error)."""


@dataclass(frozen=True, slots=True)
class AckFloor:
    stream_seq: int  # every message at or below it is acknowledged
    num_ack_pending: int  # delivered, not yet acknowledged
    num_pending: int  # not yet delivered

    @property
    def settled(self) -> bool:
        """Nothing delivered and unacknowledged, nothing waiting: all is stored."""
        return self.num_ack_pending == 0 and self.num_pending == 0


class ConsumerPosition(Protocol):
    async def ack_floor(self) -> AckFloor: ...

    async def first_time_from(self, stream_seq: int) -> float | None:
        """Stream time (epoch seconds) of the first message at or after
        `stream_seq`, or None if there is none."""
        ...


class JsConsumerPosition:
    """`ConsumerPosition` of one durable, through the JetStream API (two small requests)."""

    def __init__(self, requester: Requester, stream: str, durable: str, subjects: str) -> None:
        self._requester = requester
        self._info_subject = f"$JS.API.CONSUMER.INFO.{stream}.{durable}"
        self._get_subject = f"$JS.API.STREAM.MSG.GET.{stream}"
        self._subjects = subjects

    async def ack_floor(self) -> AckFloor:
        reply = _decode(await self._requester.request(self._info_subject, b""))
        try:
            return AckFloor(
                stream_seq=int(reply["ack_floor"]["stream_seq"]),
                num_ack_pending=int(reply["num_ack_pending"]),
                num_pending=int(reply["num_pending"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise HorizonError(f"consumer info without {exc}") from None

    async def first_time_from(self, stream_seq: int) -> float | None:
        body = json.dumps({"seq": stream_seq, "next_by_subj": self._subjects}).encode()
        try:
            reply = _decode(await self._requester.request(self._get_subject, body))
        except _NoMessage:
            return None
        try:
            return parse_stream_time(reply["message"]["time"])
        except (KeyError, TypeError, ValueError) as exc:
            raise HorizonError(f"message get without a time: {exc}") from None


class _NoMessage(HorizonError):
    pass


_NO_MESSAGE: Final = 10037  # JetStream's err_code for "no message found"


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(raw)
    except ValueError as exc:
        raise HorizonError(f"unreadable JetStream reply: {exc}") from None
    if not isinstance(reply, dict):
        raise HorizonError("unreadable JetStream reply")
    error = reply.get("error")
    if isinstance(error, dict):
        if error.get("err_code") == _NO_MESSAGE:
            raise _NoMessage(str(error.get("description")))
        raise HorizonError(f"JetStream: {error.get('description')} ({error.get('err_code')})")
    return reply


def parse_stream_time(text: object) -> float:
    """RFC 3339 with up to nanoseconds (JetStream's `time`) → epoch seconds."""
    if not isinstance(text, str):
        raise ValueError(f"not a time: {text!r}")
    head, _, frac = text.rstrip("Z").partition(".")
    seconds = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC).timestamp()
    return seconds + (float("0." + frac) if frac else 0.0)


class StreamClock:
    """This host's clock minus the stream's, estimated from deliveries. Pure.

    `observe(wall, stream_time)` for the newest message of each received batch;
    `skew` is the smallest `wall - stream_time` over the current and the
    previous window (0 until the first sample), an upper bound of the true
    skew; `now(wall)` is stream-now, never later than the server's.
    """

    def __init__(self, *, window_s: float = SKEW_WINDOW_S) -> None:
        self._window_s = window_s
        self._window_start = -math.inf
        self._current = math.inf
        self._previous = math.inf

    def observe(self, wall: float, stream_time: float) -> None:
        if wall - self._window_start >= self._window_s:
            # A window with no sample keeps the last estimate alive.
            if self._current != math.inf:
                self._previous = self._current
            self._current = math.inf
            self._window_start = wall
        self._current = min(self._current, wall - stream_time)

    @property
    def skew(self) -> float:
        best = min(self._current, self._previous)
        return 0.0 if best == math.inf else best

    def now(self, wall: float) -> float:
        return wall - self.skew


@dataclass(frozen=True, slots=True)
class Horizon:
    at: float  # judge silences up to this stream time (epoch seconds)
    now: float  # stream-now when it was read
    bounded: bool  # the floor trailed more than max_lag_s: held at now - max_lag_s

    @property
    def lag_s(self) -> float:
        return self.now - self.at


class AckFloorHorizon:
    """The alert horizon from the durable's ack floor; see the module docstring."""

    def __init__(
        self,
        position: ConsumerPosition,
        clock: StreamClock,
        *,
        max_lag_s: float,
        wall: Callable[[], float],
    ) -> None:
        self._position = position
        self._clock = clock
        self._max_lag_s = max_lag_s
        self._wall = wall

    async def read(self) -> Horizon:
        """Read the horizon now; raises HorizonError or NatsRequestError."""
        # Stream-now is taken before the floor is read: everything that reached
        # the stream before that moment is at or above the floor we then read.
        now = self._clock.now(self._wall())
        floor = await self._position.ack_floor()
        at = now
        if not floor.settled:
            first = await self._position.first_time_from(floor.stream_seq + 1)
            if first is not None:
                at = min(first, now)
        bounded = at < now - self._max_lag_s
        return Horizon(at=now - self._max_lag_s if bounded else at, now=now, bounded=bounded)
