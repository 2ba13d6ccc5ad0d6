"""Delivery metadata read from JetStream ack subjects (`Delivery.from_reply`)."""

from __future__ import annotations

import pytest

from notip_trio.js.delivery import Delivery, JsMsg

V1 = "$JS.ACK.TELEMETRY.data-consumer-telemetry.1.4021.4020.1795767964635151845.17"
V2 = "$JS.ACK.hub.ACCHASH.TELEMETRY.data-consumer-telemetry.2.4021.4020.1795767964635151845.3.x1"


def test_v1_and_v2_ack_subjects() -> None:
    assert Delivery.from_reply(V1) == Delivery(1, 4021, 1795767964635151845, 17)
    assert Delivery.from_reply(V2) == Delivery(2, 4021, 1795767964635151845, 3)
    assert JsMsg("telemetry.data.t.g", b"{}", V1).delivery == Delivery.from_reply(V1)
    assert Delivery.timestamp_of(V1) == Delivery.timestamp_of(V2) == 1795767964635151845


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "_INBOX.abc",
        "$JS.ACK.a.b.c",
        "$JS.ACK.S.C.1.x.2.3.y",
        "$JS.ACK.S.C.1.2.3.4",  # one token short of v1
        "$XX.ACK.TELEMETRY.data-consumer-telemetry.1.4021.4020.1795767964635151845.17",
        "$JS.ACK.TELEMETRY.data-consumer-telemetry.1.4021.4020.-5.17",
    ],
)
def test_anything_else_gives_none(reply: str) -> None:
    assert Delivery.from_reply(reply) is None
    assert Delivery.timestamp_of(reply) is None
    assert JsMsg("s", b"", reply).delivery is None
