"""Gateways publishing telemetry from a thread, for the real-process liveness tests.

`Gateways(server, names, period_s)` publishes one envelope per gateway every
`period_s` (core NATS publishes, flushed per round) until `stop()`; `silence(g)`
makes one fall silent, `resume(g)` brings it back. It runs its own nats-py loop
in a thread, so a Trio test goes on while it publishes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import threading
from typing import Any

from devstack import js as _js
from devstack import simulator
from devstack.natsd import NatsServer

TENANT = "t1"


class Gateways:
    """Gateways publishing every `period_s` from a thread until `stop()`; `silence(g)`
    stops one, `resume(g)` starts it again. `last[g]` is the wall time of its last
    publish, `sent` the total, `bursts` how many rounds were published."""

    def __init__(self, server: NatsServer, names: list[str], period_s: float = 0.25) -> None:
        self.server = server
        self.active = set(names)
        self.period_s = period_s
        self.last: dict[str, dt.datetime] = {}
        self.sent = 0
        self.bursts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def silence(self, name: str) -> dt.datetime:
        """Stop `name`; returns the wall time of its last message."""
        with self._lock:
            self.active.discard(name)
            return self.last[name]

    def resume(self, name: str) -> None:
        """`name` publishes again from the next round."""
        with self._lock:
            self.active.add(name)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        rng = random.Random(7)

        async def fn(nc: Any) -> None:
            while not self._stop.is_set():
                with self._lock:
                    for name in sorted(self.active):
                        now = dt.datetime.now(dt.UTC)
                        body = simulator.make_envelope(name, f"{name}-s1", "humidity", now, rng=rng)
                        await nc.publish(simulator.subject_for(TENANT, name), body)
                        self.last[name] = now
                        self.sent += 1
                await nc.flush()
                self.bursts += 1
                await asyncio.sleep(self.period_s)

        _js.run_nats(self.server, fn, "gateway-sim", timeout_s=600)
