"""The live publisher of the latency measurement: its own process, plain asyncio.

Publishes valid envelopes from the 1,000-gateway fleet at a fixed total rate
for a fixed time. The envelope's `timestamp` is the wall-clock time (UTC, µs,
strictly increasing) just before the message is handed to nats-py: the
publish time. The daemon stores it as `time`, so publish-to-commit latency is
`pg_xact_commit_timestamp(xmin) - time` for each row (same host, same clock).

Bodies are prebuilt per sensor with a timestamp placeholder, so publishing
costs little CPU on a machine the daemon shares. Prints one JSON line with what
it sent.

Usage: python -m benchmarks.publisher \
    '{"url": ..., "ca": ..., "cert": ..., "key": ..., "rate": 20000, "seconds": 10}'
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import sys
import time
from typing import Any

from benchmarks.common import GATEWAYS, TENANTS
from devstack.simulator import envelope_fields, make_fleet, tls_context

_PACE_S = 0.005
_PLACEHOLDER = "2000-01-01T00:00:00.000000Z"


def _templates(rng: random.Random) -> list[tuple[str, bytes, bytes]]:
    out = []
    for gw in make_fleet(TENANTS, GATEWAYS):
        for sensor_id, sensor_type in gw.sensors:
            fields = envelope_fields(
                gw.gateway_id, sensor_id, sensor_type, dt.datetime.now(dt.UTC), rng=rng
            )
            fields["timestamp"] = _PLACEHOLDER
            head, _, tail = json.dumps(fields, separators=(",", ":")).partition(_PLACEHOLDER)
            out.append((gw.subject, head.encode(), tail.encode()))
    # Sensor-major order, so consecutive messages come from different gateways.
    per_gw = len(out) // GATEWAYS
    return [out[g * per_gw + s] for s in range(per_gw) for g in range(GATEWAYS)]


class _Clock:
    """RFC 3339 wall-clock stamps, strictly increasing by at least 1 µs."""

    def __init__(self) -> None:
        self._last = 0
        self._second = -1
        self._prefix = ""

    def stamp(self) -> bytes:
        us = max(time.time_ns() // 1000, self._last + 1)
        self._last = us
        second, micro = divmod(us, 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{micro:06d}Z".encode()


async def _run(spec: dict[str, Any]) -> dict[str, Any]:
    import nats

    rate = float(spec["rate"])
    seconds = float(spec["seconds"])
    nc = await nats.connect(
        spec["url"],
        tls=tls_context(spec["ca"], spec["cert"], spec["key"]),
        name="bench-publisher",
        connect_timeout=10,
    )
    templates = _templates(random.Random(11))
    clock = _Clock()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    sent = 0
    errors = 0
    try:
        while (elapsed := loop.time() - t0) < seconds:
            due = int(elapsed * rate) - sent
            for _ in range(max(due, 0)):
                subject, head, tail = templates[sent % len(templates)]
                try:
                    await nc.publish(subject, head + clock.stamp() + tail)
                except Exception:
                    errors += 1
                sent += 1
            await asyncio.sleep(_PACE_S)
        await nc.flush(timeout=30)
        elapsed = loop.time() - t0
    finally:
        await nc.close()
    published = sent - errors
    return {"sent": published, "errors": errors, "seconds": elapsed, "rate": published / elapsed}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        result = runner.run(_run(spec))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
