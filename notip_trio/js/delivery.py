"""One delivered JetStream message and what its ack subject says about it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a JetStream ack subject says about its delivery (like nats.py's
    `Msg.Metadata.from_reply`), at no cost: no consumer-info call, which on
    nats-server 2.9 stalled the pull deliveries of a filtered consumer.

    v1: `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`;
    v2: `$JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>`
    `.<pending>[.<token>]`.
    """

    delivered: int  # delivery count: 1 the first time, more on redelivery
    stream_seq: int
    timestamp_ns: int  # when the message reached the stream: the same on every replica
    pending: int  # messages left for the consumer after this one: its lag

    @classmethod
    def from_reply(cls, reply: str) -> Delivery | None:
        """The delivery's metadata, or None if `reply` is not an ack subject."""
        tokens = reply.split(".")
        if len(tokens) == 9:
            fields = tokens[4], tokens[5], tokens[7], tokens[8]
        elif len(tokens) >= 11:
            fields = tokens[6], tokens[7], tokens[9], tokens[10]
        else:
            return None
        if tokens[0] != "$JS" or tokens[1] != "ACK" or not all(f.isdigit() for f in fields):
            return None
        delivered, seq, ts, pending = map(int, fields)
        return cls(delivered, seq, ts, pending)

    @staticmethod
    def timestamp_of(reply: str) -> int | None:
        """`from_reply(reply).timestamp_ns` (None alike) without building the rest:
        ingest reads it for every message, so no generator and no dataclass."""
        tokens = reply.split(".")
        count = len(tokens)
        if count == 9:
            i = 4
        elif count >= 11:
            i = 6
        else:
            return None
        ts = tokens[i + 3]
        if (
            tokens[0] == "$JS"
            and tokens[1] == "ACK"
            and tokens[i].isdigit()
            and tokens[i + 1].isdigit()
            and ts.isdigit()
            and tokens[i + 4].isdigit()
        ):
            return int(ts)
        return None


class JsMsg(NamedTuple):
    """One delivery, as the pull path keeps it: a plain tuple (cheap to build per message)."""

    subject: str
    data: bytes
    reply: str  # the $JS.ACK... subject used to ack/nak/term this delivery

    @property
    def delivery(self) -> Delivery | None:
        return Delivery.from_reply(self.reply)
