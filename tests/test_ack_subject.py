"""Delivery metadata read from JetStream ack subjects (stream sequence, consumer lag)."""

from __future__ import annotations

from notip_trio.ingest import consumer_pending, stream_seq

V1 = "$JS.ACK.TELEMETRY.data-consumer-telemetry.1.4021.4020.1795767964635151845.17"
V2 = "$JS.ACK.hub.ACCHASH.TELEMETRY.data-consumer-telemetry.2.4021.4020.1795767964635151845.3.x1"


def test_v1_and_v2_ack_subjects() -> None:
    assert (stream_seq(V1), consumer_pending(V1)) == (4021, 17)
    assert (stream_seq(V2), consumer_pending(V2)) == (4021, 3)


def test_anything_else_gives_none() -> None:
    for reply in ("", "_INBOX.abc", "$JS.ACK.a.b.c", "$JS.ACK.S.C.1.x.2.3.y"):
        assert stream_seq(reply) is None
        assert consumer_pending(reply) is None
