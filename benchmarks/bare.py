"""N0: the bare thin pull on plain asyncio: no Trio, no bridge, no daemon code.

The reference the daemon's pull path (ceiling N) is held against: the same
server, TLS identity, stream and durable settings as N, in a process of its
own, but the least Python that can pull and ack: `depth` pull requests
published by hand to `$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>`, each
reply inbox read by a callback subscription that keeps the raw subject, body
and reply subject in three flat lists; when a request ends (full, its 408, or
its expiry passed) the batch is acked with one `nc.publish` per message and
the request is sent again. The clock stops, as for N, when after flushing the
consumer info says 0 pending / 0 unacked.

This module must not import trio, trio_asyncio or notip_trio.js: trio-asyncio
replaces asyncio's loop policy at import.

Usage: python -m benchmarks.bare '{"mode": "bare-n", "total": 200000, "batch": 1000}'
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
import time
import uuid
from typing import Any

from benchmarks.common import child_main
from notip_trio.config import load_settings
from notip_trio.wire import TELEMETRY_STREAM

DEPTH = 2


async def _bare(spec: dict[str, Any]) -> dict[str, Any]:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    settings = load_settings()
    total = int(spec["total"])
    batch = int(spec["batch"])
    expires_s = settings.telemetry_flush_ms / 1000
    durable = settings.nats_consumer_durable_name
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.nats_tls_ca))
    ctx.load_cert_chain(str(settings.nats_tls_cert), str(settings.nats_tls_key))
    nc = await nats.connect(settings.nats_url, tls=ctx, name="notip-bench-bare")
    js = nc.jetstream()
    await js.add_consumer(
        TELEMETRY_STREAM,
        config=ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=max(1000, batch * (2 * DEPTH + 3)),
            ack_wait=30.0,
            max_waiting=512,
        ),
    )
    api = f"$JS.API.CONSUMER.MSG.NEXT.{TELEMETRY_STREAM}.{durable}"
    request = json.dumps({"batch": batch, "expires": int(expires_s * 1e9)}).encode()
    loop = asyncio.get_running_loop()
    acked = 0
    all_acked = loop.create_future()

    async def slot(index: int) -> None:
        nonlocal acked
        prefix = f"_INBOX.bare.{uuid.uuid4().hex}.{index}"
        subjects: list[str] = []
        bodies: list[bytes] = []
        replies: list[str] = []
        state: dict[str, Any] = {"inbox": "", "done": None}

        async def on_msg(msg: Any) -> None:
            reply = msg.reply
            if not reply:  # a status: 408 ends the current request
                if msg.subject == state["inbox"] and not state["done"].done():
                    state["done"].set_result(None)
                return
            subjects.append(msg.subject)
            bodies.append(msg.data)
            replies.append(reply)
            if len(replies) >= batch and not state["done"].done():
                state["done"].set_result(None)

        await nc.subscribe(prefix + ".*", cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        seq = 0
        while True:
            seq += 1
            state["inbox"] = f"{prefix}.{seq}"
            state["done"] = loop.create_future()
            await nc.publish(api, request, reply=state["inbox"])
            with contextlib.suppress(TimeoutError):
                # Like the daemon's slot: give up on a missing 408 shortly after expiry.
                await asyncio.wait_for(asyncio.shield(state["done"]), expires_s + 0.03)
            got = replies[:]
            del subjects[:], bodies[:], replies[:]
            for reply in got:
                await nc.publish(reply, b"+ACK")
            acked += len(got)
            if acked >= total and not all_acked.done():
                all_acked.set_result(None)

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(slot(i)) for i in range(DEPTH)]
    await all_acked
    await nc.flush(10)
    while True:
        info = await js.consumer_info(TELEMETRY_STREAM, durable)
        if (info.num_pending, info.num_ack_pending) == (0, 0):
            break
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - t0
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await nc.close()
    return {"msgs": acked, "seconds": elapsed, "rate": acked / elapsed, "batch": batch}


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(_bare(spec))


MODES = {"bare-n": _run}

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:], MODES))
