"""Light-load probe: how each pull request of the daemon's pull slot ends at a trickle.

Found the light-load p99 (README: Benchmarks): at 500 msgs/s about 2 % of pull
requests get their messages but never their 408 from nats-server 2.9.10, so a
slot that waited for the status sat until its own deadline. This probe starts
a nats-server (mTLS, the platform streams), publishes at `rate` for `seconds`
on one connection and pulls on another with two `_PullSlot`s (fixed `batch`,
expiry 200 ms, plain asyncio), and prints one JSON line: how many requests
ended full, by their status, or by the client deadline; how many got no
status at all; and the stream-arrival-to-handoff wait per message (p50, p99, max).

Usage: python -m benchmarks.lightprobe '{"rate": 500, "seconds": 20, "batch": 1000,
"margin_s": 0.5}' (margin_s: how long after the expiry a slot gives up on the 408;
0.5 was the old value, notip_trio.js.pull.EXPIRY_MARGIN_S the new one).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import GATEWAYS, TENANTS
from devstack import certs, js, natsd
from devstack.simulator import make_fleet
from notip_trio.js import pull as js_pull
from notip_trio.js.delivery import Delivery
from notip_trio.js.pull import _PullSlot
from notip_trio.js.specs import PullSpec


async def _probe(server: natsd.NatsServer, spec: dict[str, Any]) -> dict[str, Any]:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    rate, seconds, batch = float(spec["rate"]), float(spec["seconds"]), int(spec["batch"])
    js_pull.EXPIRY_MARGIN_S = float(spec.get("margin_s", js_pull.EXPIRY_MARGIN_S))
    nc = await server.connect("notip-trio")
    pub = await server.connect("gateway-sim")
    await nc.jetstream().add_consumer(
        "TELEMETRY",
        config=ConsumerConfig(
            durable_name="probe",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,
            max_ack_pending=50_000,
            ack_wait=30.0,
            max_waiting=512,
        ),
    )
    pull = PullSpec("TELEMETRY", "probe", "telemetry.data.>", batch, 0.2, 2, 50_000)
    fleet = make_fleet(TENANTS, GATEWAYS)
    statuses: dict[str, int] = {}
    requests: list[str] = []
    ends = {"full": 0, "status": 0, "deadline": 0}
    waits: list[float] = []
    stop = asyncio.Event()

    class Slot(_PullSlot):
        async def _on_msg(self, msg: Any) -> None:
            if not msg.reply:
                statuses[msg.subject] = statuses.get(msg.subject, 0) + 1
            await super()._on_msg(msg)

    async def slot_loop(index: int) -> None:
        slot = Slot(nc, pull, index)
        await slot.subscribe()
        while not stop.is_set():
            want = len(slot._msgs) + batch
            msgs, elapsed = await slot.fetch(batch)
            requests.append(slot._inbox)
            if len(msgs) >= want:
                ends["full"] += 1
            elif elapsed > pull.expires_s + js_pull.EXPIRY_MARGIN_S - 0.005:
                ends["deadline"] += 1
            else:
                ends["status"] += 1
            now_ns = time.time_ns()
            for m in msgs:
                ts = Delivery.timestamp_of(m.reply)
                if ts is not None:
                    waits.append((now_ns - ts) / 1e6)
                await nc.publish(m.reply, b"+ACK")

    tasks = [asyncio.create_task(slot_loop(i)) for i in range(2)]
    loop = asyncio.get_running_loop()
    t0, sent = loop.time(), 0
    while (elapsed := loop.time() - t0) < seconds:
        for _ in range(int(elapsed * rate) - sent):
            await pub.publish(fleet[sent % len(fleet)].subject, b"{}")
            sent += 1
        await asyncio.sleep(0.005)
    await pub.flush()
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.sleep(pull.expires_s + js_pull.EXPIRY_MARGIN_S + 0.1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await nc.close()
    await pub.close()
    waits.sort()
    n = len(waits)
    return {
        "rate": rate,
        "batch": batch,
        "margin_s": js_pull.EXPIRY_MARGIN_S,
        "sent": sent,
        "received": n,
        "requests": len(requests),
        "ends": ends,
        "requests_without_status": sum(1 for r in requests if r not in statuses),
        "wait_p50_ms": waits[n // 2] if n else None,
        "wait_p99_ms": waits[int(n * 0.99)] if n else None,
        "wait_max_ms": waits[-1] if n else None,
    }


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    with tempfile.TemporaryDirectory(prefix="lightprobe-") as tmp:
        server = natsd.start_nats_server(certs.make_pki(Path(tmp) / "pki"))
        try:
            js.create_streams(server)
            with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
                result = runner.run(_probe(server, spec))
        finally:
            server.close()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
