"""NatsBridge against a real mTLS nats-server: start-up checks and the pull path."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from datetime import UTC, datetime
from typing import Any

import pytest
import trio
import trio_asyncio
from nats.js.api import AckPolicy, ConsumerConfig

from devstack import js as _js
from devstack.mgmt_standin import MgmtStandin
from notip_trio.errors import NatsRequestError, StartupError
from notip_trio.js.bridge import NatsBridge, tls_context
from notip_trio.js.delivery import JsMsg
from notip_trio.js.specs import PullSpec
from notip_trio.mgmt import MgmtClient


async def _bridge(server) -> NatsBridge:
    client = server.client("notip-trio")
    return await NatsBridge.connect(
        server.url,
        ca=str(client.ca),
        cert=str(client.cert),
        key=str(client.key),
        connect_timeout_s=5,
    )


SPEC = PullSpec("TELEMETRY", "data-consumer-telemetry", "telemetry.data.>", 100, 0.2, 2, 1000)


async def test_a_push_durable_from_the_go_service_is_refused_with_one_clear_line(
    private_nats_server, aio_loop
) -> None:
    with trio.fail_after(30):
        bridge = await _bridge(private_nats_server)
        try:

            async def add_push() -> None:
                await bridge.js.add_consumer(
                    "TELEMETRY",
                    config=ConsumerConfig(
                        durable_name=SPEC.durable, deliver_subject="go.push.deliver"
                    ),
                )

            await trio_asyncio.aio_as_trio(add_push)()
            with pytest.raises(StartupError, match="is a push consumer") as info:
                await bridge.ensure_pull_consumer(SPEC)
            assert "\n" not in str(info.value)
        finally:
            await bridge.close()


async def test_missing_stream_is_named(private_nats_server, aio_loop) -> None:
    with trio.fail_after(30):
        bridge = await _bridge(private_nats_server)
        try:
            await trio_asyncio.aio_as_trio(bridge.js.delete_stream)("ALERTS")
            with pytest.raises(StartupError, match="stream ALERTS does not exist"):
                await bridge.require_streams(("TELEMETRY", "ALERTS", "DECOMMISSION"))
        finally:
            await bridge.close()


async def test_pull_batches_ack_and_late_deliveries_are_not_dropped(
    private_nats_server, aio_loop
) -> None:
    with trio.fail_after(60):
        bridge = await _bridge(private_nats_server)
        try:
            await bridge.ensure_pull_consumer(SPEC)
            info = await trio_asyncio.aio_as_trio(bridge.js.consumer_info)(
                "TELEMETRY", SPEC.durable
            )
            # telemetry.data.> is the whole stream: created without the redundant filter.
            assert not info.config.filter_subject
            assert info.config.max_ack_pending == SPEC.max_ack_pending

            async def publish(n: int) -> None:
                for i in range(n):
                    await bridge.nc.publish(f"telemetry.data.t.g{i % 7}", b"%d" % i)
                await bridge.nc.flush()

            await trio_asyncio.aio_as_trio(publish)(1234)
            seen: list[JsMsg] = []
            tx, rx = trio.open_memory_channel[list[JsMsg]](2)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bridge.run_pull, SPEC, tx)
                async with rx:
                    async for batch in rx:
                        assert 0 < len(batch) <= SPEC.batch * 2
                        seen.extend(batch)
                        await bridge.ack(batch)
                        if len(seen) >= 1234:
                            break
                nursery.cancel_scope.cancel()
            assert sorted(int(m.data) for m in seen) == list(range(1234))
            pending, ack_pending = 1, 1
            with trio.move_on_after(10):
                while (pending, ack_pending) != (0, 0):
                    state = await trio.to_thread.run_sync(
                        _js.consumer_state, private_nats_server, "TELEMETRY", SPEC.durable
                    )
                    pending, ack_pending = state.num_pending, state.num_ack_pending
                    await trio.sleep(0.1)
            assert (pending, ack_pending) == (0, 0)
        finally:
            await bridge.close()


async def test_an_existing_durable_is_judged_by_durable_problems(
    private_nats_server, aio_loop, caplog
) -> None:
    with trio.fail_after(30):
        bridge = await _bridge(private_nats_server)
        try:

            async def add(durable: str, **cfg: object) -> None:
                await bridge.js.add_consumer(
                    "TELEMETRY", config=ConsumerConfig(durable_name=durable, **cfg)
                )

            # The Go service's filter: usable, but logged as harmful.
            await trio_asyncio.aio_as_trio(add)(
                "with-filter", ack_policy=AckPolicy.EXPLICIT, filter_subject="telemetry.data.>"
            )
            with caplog.at_level(logging.WARNING, logger="notip_trio.js.bridge"):
                await bridge.ensure_pull_consumer(dataclasses.replace(SPEC, durable="with-filter"))
            assert [r.getMessage() for r in caplog.records] == ["consumer_filter_redundant"]

            await trio_asyncio.aio_as_trio(add)("no-ack", ack_policy=AckPolicy.NONE)
            with pytest.raises(StartupError, match=r"ack policy .* explicit is required"):
                await bridge.ensure_pull_consumer(dataclasses.replace(SPEC, durable="no-ack"))
        finally:
            await bridge.close()


def test_tls_files_that_do_not_fit_are_named(pki) -> None:
    a, b = pki.client("notip-trio"), pki.client("test-client")
    with pytest.raises(StartupError, match=r"NATS_TLS_CERT/NATS_TLS_KEY .*KEY_VALUES_MISMATCH"):
        tls_context(str(a.ca), str(a.cert), str(b.key))
    with pytest.raises(StartupError, match="NATS_TLS_CA"):
        tls_context(str(a.key), str(a.cert), str(a.key))


async def _scheduled_timers(loop: trio_asyncio.TrioEventLoop) -> int:
    """Timers the trio-asyncio loop holds: every `call_later`/`call_at` handle stays
    in its heap `_timers` until it is due, cancelled or not (trio-asyncio 0.16 drops
    cancelled ones only when they come up). A no-op through the loop first moves
    handles still in its queue into the heap."""
    await trio_asyncio.aio_as_trio(asyncio.sleep)(0)
    return len(loop._timers)


async def test_requests_leave_no_timers_behind_in_the_loop(
    nats_server: Any, aio_loop: trio_asyncio.TrioEventLoop
) -> None:
    """Issue 15: each management request used to leave an hour-long timer in the loop."""
    with trio.fail_after(60):
        bridge = await _bridge(nats_server)
        standin = MgmtStandin()
        mgmt_nc = await trio_asyncio.aio_as_trio(nats_server.connect)("mgmt-api")

        async def silent(msg: Any) -> None:  # takes requests, never answers
            pass

        await trio_asyncio.aio_as_trio(standin.start)(mgmt_nc)
        await trio_asyncio.aio_as_trio(mgmt_nc.subscribe)("test.silent", cb=silent)
        await trio_asyncio.aio_as_trio(mgmt_nc.flush)()
        try:
            mgmt = MgmtClient(bridge)  # 5 s per attempt, as in the daemon
            assert await mgmt.get_status("t", "warm-up") == "online"
            before = await _scheduled_timers(aio_loop)

            # 500 answered requests: get-status and update-status, as at an outage.
            now = datetime.now(UTC)
            for i in range(250):
                assert await mgmt.get_status("t", f"g{i}") == "online"
                await mgmt.update_status(f"g{i}", "offline", now)
            assert len(standin.updates) == 250
            after_answered = await _scheduled_timers(aio_loop)

            # 50 attempts that end by the caller's deadline (no reply comes).
            for _ in range(50):
                with trio.move_on_after(0.01) as scope:
                    await bridge.request("test.silent", b"")
                assert scope.cancelled_caught
            after_cancelled = await _scheduled_timers(aio_loop)

            # No responders is still an error, and leaves nothing either.
            with pytest.raises(NatsRequestError, match="NoResponders"):
                await bridge.request("test.nobody.listens", b"")
            after_no_responders = await _scheduled_timers(aio_loop)

            # Flat: not one more timer per request (it was +500, then +50, then +1).
            print(
                f"loop timers: before={before} after 500 answered={after_answered} "
                f"after 50 cancelled={after_cancelled} after no-responders={after_no_responders}"
            )
            assert after_answered <= before + 2
            assert after_cancelled <= before + 2
            assert after_no_responders <= before + 2
            assert not bridge._replies  # no request's future is kept either
        finally:
            await trio_asyncio.aio_as_trio(standin.stop)()
            await trio_asyncio.aio_as_trio(mgmt_nc.close)()
            await bridge.close()


async def test_adaptive_requests_grow_through_a_backlog_and_shrink_when_idle(
    private_nats_server, aio_loop
) -> None:
    """Real server, real pull path: a backlog is drained in requests that grow from
    TELEMETRY_BATCH_MIN to TELEMETRY_BATCH_SIZE; after idle pulls a burst starts
    again at the minimum. (Batch sizes only: no timing is asserted.)"""
    spec = dataclasses.replace(SPEC, batch=1000, batch_min=10, depth=1, max_ack_pending=5000)
    with trio.fail_after(60):
        bridge = await _bridge(private_nats_server)
        try:
            await bridge.ensure_pull_consumer(spec)

            async def publish(start: int, n: int) -> None:
                for i in range(start, start + n):
                    await bridge.nc.publish(f"telemetry.data.t.g{i % 7}", b"%d" % i)
                await bridge.nc.flush()

            pulls_since_empty = 0
            emptied = trio.Event()

            def observe(pending: int) -> None:
                nonlocal pulls_since_empty
                pulls_since_empty = pulls_since_empty + 1 if pending == 0 else 0
                if pulls_since_empty >= 12:  # a dozen pulls that found nothing more
                    emptied.set()

            await trio_asyncio.aio_as_trio(publish)(0, 3000)
            sizes: list[int] = []
            tx, rx = trio.open_memory_channel[list[JsMsg]](1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    functools.partial(bridge.run_pull, spec, tx, observe_pending=observe)
                )
                async with rx:
                    while sum(sizes) < 3000:
                        batch = await rx.receive()
                        sizes.append(len(batch))
                        await bridge.ack(batch)
                    backlog = list(sizes)
                    await emptied.wait()
                    await trio_asyncio.aio_as_trio(publish)(3000, 30)
                    batch = await rx.receive()
                    await bridge.ack(batch)
                    burst_first = len(batch)
                nursery.cancel_scope.cancel()
            assert backlog[0] == 10
            assert max(backlog) == 1000
            assert backlog.index(1000) <= 7  # at least x2 per full pull with a backlog behind it
            assert burst_first == 10
        finally:
            await bridge.close()
