"""An offline alert whose PubAck is lost, retried on the next tick: one alert in
the stream (docs/contract.md Behaviour 3: deterministic `Nats-Msg-Id`, server dedup).

Rules: a real nats-server (mTLS, JetStream) from the fixtures; the daemon's
`NatsBridge` reaches it through the toolkit's TCP relay (tests/fix_relay.py) that
can hold back everything the server sends, so a publish is stored by the
server while its PubAck never arrives. The liveness tracker is the real one;
the management API is an in-memory fake (every gateway online) and the status
sink a recorder. Real clock (real sockets): every wait has a hang guard and
nothing asserts on speed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import trio
import trio_asyncio

from devstack import js as _js
from devstack.natsd import NatsServer
from devstack.relay import Relay
from notip_trio.alertconfig import AlertConfigCache
from notip_trio.js.bridge import NatsBridge
from notip_trio.liveness import LivenessTracker
from notip_trio.metrics import Metrics
from notip_trio.mgmt import SUBJECT_GET_STATUS, MgmtClient
from notip_trio.wire import offline_alert_msg_id
from tests.fix_relay import nats_url
from tests.ingest_fakes import value
from tests.liveness_fakes import (
    CaughtUp,
    FakeRequester,
    FakeStore,
    RecordingSink,
    status_handler,
)

LAST_SEEN = dt.datetime(2026, 11, 27, 8, 0, 1, 250000, tzinfo=dt.UTC)


async def test_an_alert_whose_puback_was_lost_is_retried_and_stored_once(
    private_nats_server: NatsServer,
    nats_relay: Callable[[NatsServer], Relay],
    aio_loop: trio_asyncio.TrioEventLoop,
) -> None:
    server = private_nats_server
    client = server.client("notip-trio")
    relay = nats_relay(server)
    metrics, store = Metrics(), FakeStore()
    sink = RecordingSink(store)
    # Heard long ago with a 30 s timeout: due at the first tick.
    store.record(("t1", "gw-1"), LAST_SEEN)
    with trio.fail_after(120):
        bridge = await NatsBridge.connect(
            nats_url(relay),
            ca=str(client.ca),
            cert=str(client.cert),
            key=str(client.key),
            connect_timeout_s=10,
        )
        try:
            tracker = LivenessTracker(
                store,
                AlertConfigCache(30_000),
                MgmtClient(FakeRequester({SUBJECT_GET_STATUS: status_handler()})),
                bridge,
                sink,
                metrics,
                CaughtUp(lambda: dt.datetime.now(dt.UTC)),  # the tracker's own clock
                grace_until=0.0,
                concurrency=32,
            )
            await tracker.take_over()

            relay.freeze_open(replies_only=True)
            await tracker.tick()  # the publish reaches the server; its PubAck does not
            stored_without_ack = await trio.to_thread.run_sync(_js.stream_count, server, "ALERTS")
            assert value(metrics, "alert_publish_errors_total") == 1
            assert value(metrics, "alerts_published_total") == 0
            assert tracker.status("t1", "gw-1") == "online"  # not marked before a PubAck
            assert [u.status for u in sink.updates] == ["online"]

            relay.unfreeze()
            await tracker.tick()  # the same alert again, the same Nats-Msg-Id
        finally:
            await bridge.close()
        alerts = await trio.to_thread.run_sync(_js.stream_messages, server, "ALERTS")
    assert stored_without_ack == 1  # the first attempt was stored: only its PubAck was lost
    assert [(s, b["gatewayId"], h["Nats-Msg-Id"]) for s, b, h in alerts] == [
        ("alert.t1.gw_offline", "gw-1", offline_alert_msg_id("t1", "gw-1", LAST_SEEN))
    ]
    assert value(metrics, "alerts_published_total") == 1
    assert tracker.status("t1", "gw-1") == "offline"
    assert [(u.status, u.last_seen_at) for u in sink.updates] == [
        ("online", LAST_SEEN),
        ("offline", LAST_SEEN),
    ]
    assert relay.accepted == 1  # one connection all along: no reconnect hid anything
