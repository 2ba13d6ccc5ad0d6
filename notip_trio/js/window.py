"""Reading a stream again without its durable: `notip-trio replay` and `rejects redrive`.

`OrderedReader` reads a window of a stream in order through an *ephemeral*
pull consumer with ack policy none (nothing to acknowledge, nothing ever
redelivered, and the durable the daemon pulls from is never touched). Like
nats.py's ordered consumer it checks that the consumer sequence of each
delivery follows the one before; a gap (a batch lost in a reconnect) or a
consumer the server dropped (its inactive threshold passed) makes it create a
new consumer from the stream sequence after the last one it handed out.
Batches are pulled by hand (`pull._PullSlot`: one bridge crossing per batch).

`stream_message` fetches one message by its stream sequence (the direct get
of the stream API), for a rejected message whose kept body was cut.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass
from typing import Final

import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ..log import get_logger
from .delivery import JsMsg
from .pull import PullHost, _PullSlot, aio
from .specs import PullSpec

log = get_logger(__name__)

#: The server deletes the ephemeral consumer this long after its client went away.
INACTIVE_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class StreamBounds:
    first_seq: int
    last_seq: int
    messages: int


def seqs_of(reply: str) -> tuple[int, int] | None:
    """(stream sequence, consumer sequence) from an ack subject (see `Delivery`)."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        s, c = tokens[5], tokens[6]
    elif len(tokens) >= 11:
        s, c = tokens[7], tokens[8]
    else:
        return None
    if not (s.isdigit() and c.isdigit()):
        return None
    return int(s), int(c)


async def stream_bounds(host: PullHost, stream: str) -> StreamBounds | None:
    """The first and last sequence of `stream`, or None if it does not exist."""

    async def _info() -> StreamBounds | None:
        try:
            info = await host.nc.jetstream().stream_info(stream)
        except nats.js.errors.NotFoundError:
            return None
        state = info.state
        return StreamBounds(int(state.first_seq), int(state.last_seq), int(state.messages))

    return await aio(_info)()


async def stream_message(host: PullHost, stream: str, seq: int) -> tuple[str, bytes] | None:
    """(subject, body) of message `seq` of `stream`, or None if it is gone."""

    async def _get() -> tuple[str, bytes] | None:
        try:
            msg = await host.nc.jetstream().get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            return None
        return str(msg.subject), bytes(msg.data or b"")

    return await aio(_get)()


class OrderedReader:
    """A window of `stream` in stream order, from `start_seq` or `start_time`.

    `fetch()` returns the next batch (at most `batch` messages), or an empty
    list once the consumer has nothing more to deliver right now. The caller
    decides where the window ends; `close()` deletes the consumer.
    """

    def __init__(
        self,
        host: PullHost,
        stream: str,
        *,
        start_seq: int | None = None,
        start_time: dt.datetime | None = None,
        filter_subject: str | None = None,
        batch: int = 10_000,
        expires_s: float = 1.0,
    ) -> None:
        if (start_seq is None) == (start_time is None):
            raise ValueError("give exactly one of start_seq and start_time")
        self._host = host
        self._stream = stream
        self._start_seq = start_seq
        self._start_time = start_time
        self._filter = filter_subject
        self._batch = batch
        self._expires_s = expires_s
        self._slot: _PullSlot | None = None
        self._name = ""
        self._last_seq: int | None = None  # the stream sequence last handed out
        self._last_cseq = 0
        self._stale: tuple[_PullSlot, str] | None = None  # dropped, to close and delete
        self.restarts = 0  # consumers created again after a gap or a loss

    @property
    def consumer(self) -> str:
        return self._name

    async def open(self) -> None:
        """Create the consumer (raises nats errors, e.g. a missing stream)."""
        await self._create()

    async def fetch(self) -> list[JsMsg]:
        while True:
            if self._slot is None:
                await self._create()
            assert self._slot is not None
            msgs, _ = await aio(self._slot.fetch)(self._batch)
            if msgs:
                kept = self._in_order(msgs)
                if kept is not None:
                    return kept
                continue  # a gap before anything usable: recreated, pull again
            # Expired empty: nothing to deliver, or the consumer is gone.
            if await self._pending() == 0:
                return []

    async def close(self) -> None:
        if self._slot is not None:
            self._drop()
            self.restarts -= 1
        stale, self._stale = self._stale, None
        if stale is not None:
            await aio(stale[0].close)()
            await self._delete(stale[1])

    # ---- internals -----------------------------------------------------------

    def _in_order(self, msgs: list[JsMsg]) -> list[JsMsg] | None:
        """The messages up to the first gap in consumer sequence; at a gap the
        consumer is dropped (recreated on the next fetch). None: nothing usable."""
        kept: list[JsMsg] = []
        for msg in msgs:
            seqs = seqs_of(msg.reply)
            if seqs is None or seqs[1] != self._last_cseq + 1:
                log.warning(
                    "replay_gap",
                    consumer=self._name,
                    expected=self._last_cseq + 1,
                    got=None if seqs is None else seqs[1],
                )
                self._drop()
                break
            self._last_seq, self._last_cseq = seqs
            kept.append(msg)
        return kept or None

    async def _pending(self) -> int:
        """The consumer's undelivered count; after a loss (recreated) 1, to pull again."""

        async def _info() -> int | None:
            try:
                info = await self._host.nc.jetstream().consumer_info(self._stream, self._name)
            except nats.js.errors.NotFoundError:
                return None
            return int(info.num_pending or 0)

        pending = await aio(_info)()
        if pending is None:
            log.warning("replay_consumer_lost", consumer=self._name)
            self._drop()
            return 1
        return pending

    def _drop(self) -> None:
        old, self._slot = self._slot, None
        name, self._name = self._name, ""
        self.restarts += 1
        if old is not None:
            self._stale = (old, name)  # closed and deleted before the next is created

    async def _create(self) -> None:
        stale, self._stale = self._stale, None
        if stale is not None:
            await aio(stale[0].close)()
            await self._delete(stale[1])
        if self._last_seq is not None:
            policy, seq, when = DeliverPolicy.BY_START_SEQUENCE, self._last_seq + 1, None
        elif self._start_seq is not None:
            policy, seq, when = DeliverPolicy.BY_START_SEQUENCE, self._start_seq, None
        else:
            policy, seq, when = DeliverPolicy.BY_START_TIME, None, self._start_time
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=policy,
            opt_start_seq=seq,
            opt_start_time=when,
            filter_subject=self._filter,
            inactive_threshold=INACTIVE_S,
            mem_storage=True,
            description="notip-trio replay (ephemeral)",
        )

        async def _add() -> str:
            info = await self._host.nc.jetstream().add_consumer(self._stream, config=config)
            return str(info.name)

        self._name = await aio(_add)()
        self._last_cseq = 0
        spec = PullSpec(
            stream=self._stream,
            durable=self._name,
            filter_subject=self._filter or "",
            batch=self._batch,
            expires_s=self._expires_s,
            depth=1,
            max_ack_pending=0,
        )
        slot = _PullSlot(self._host.nc, spec, 0)
        await aio(slot.subscribe)()
        self._slot = slot

    async def _delete(self, name: str) -> None:
        async def _del() -> None:
            # Best effort: the inactive threshold removes it anyway.
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._host.nc.jetstream().delete_consumer(self._stream, name)

        await aio(_del)()
