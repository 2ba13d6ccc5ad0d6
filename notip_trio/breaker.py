"""A circuit breaker for the liveness check's get-status queries (docs/contract.md Behaviour 3).

A failed query fails open (the gateway is alerted), so a management API that
is down must not cost each of a mass outage's candidates its whole retry
policy (4 attempts of 5 s + 7 s of waits). The breaker sees every attempt of
the calls it gates (`mgmt.MgmtClient`, `gate=`):

- closed: attempts go; `threshold` failed attempts in a row open it.
- open: no attempt goes; the calls end at once (`admit` is False), and so do
  the attempts in flight and the retry waits when it opens. Logged once,
  counted (`lifecycle_breaker_trips_total`).
- half-open, from `next_round` (the next tick) on: one attempt goes (the
  probe) and the others wait for it: a success closes the breaker, a failure
  opens it again for the round.

Not thread-safe; one Trio run.
"""

from __future__ import annotations

import enum
from typing import Final

import trio

from .log import get_logger
from .metrics import Metrics

log = get_logger(__name__)

# Failed get-status attempts in a row (in the order they end) that open it.
BREAKER_THRESHOLD: Final = 10


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    def __init__(self, metrics: Metrics, *, threshold: int = BREAKER_THRESHOLD) -> None:
        self._metrics = metrics
        self._threshold = threshold
        self.state = State.CLOSED
        self._failures = 0  # in a row, while closed
        self._probing = False
        self._opened = trio.Event()  # set when it opens (ends the waits)
        self._settled = trio.Event()  # set when the half-open probe ended
        self._in_flight: set[trio.CancelScope] = set()

    def next_round(self) -> None:
        """A new tick: an open breaker lets one probe through."""
        if self.state is State.CLOSED:
            return
        self.state = State.HALF_OPEN
        self._probing = False
        self._opened = trio.Event()
        self._settled = trio.Event()

    async def admit(self) -> bool:
        """May an attempt go? False: fail at once. Half-open: the first caller
        probes; the others wait for the probe's outcome."""
        while self.state is State.HALF_OPEN:
            if not self._probing:
                self._probing = True
                return True
            await self._settled.wait()
        # No checkpoint of its own: the attempt that follows is one.
        return self.state is State.CLOSED

    @property
    def is_open(self) -> bool:
        return self.state is State.OPEN

    def track(self, scope: trio.CancelScope) -> None:
        """An attempt in flight: cancelled if the breaker opens meanwhile."""
        self._in_flight.add(scope)

    def untrack(self, scope: trio.CancelScope) -> None:
        self._in_flight.discard(scope)

    async def wait(self, delay_s: float) -> None:
        """A retry's wait: ends early when the breaker opens."""
        if self.state is State.OPEN:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(delay_s):
            await self._opened.wait()

    def succeeded(self) -> None:
        self._failures = 0
        if self.state is State.HALF_OPEN:
            self.state = State.CLOSED
            self._metrics.lifecycle_breaker_open.set(0)
            self._settled.set()
            log.info("lifecycle_breaker_closed")

    def failed(self) -> None:
        if self.state is State.HALF_OPEN:
            self._open()  # the probe failed: open for the rest of the round
            self._settled.set()
            log.debug("lifecycle_breaker_still_open")
        elif self.state is State.CLOSED:
            self._failures += 1
            if self._failures >= self._threshold:
                self._open()
                self._metrics.lifecycle_breaker_trips.inc()
                log.warning(
                    "lifecycle_breaker_opened_failing_open",
                    failed_attempts=self._failures,
                    retry="one probe at the next tick",
                )

    def _open(self) -> None:
        self.state = State.OPEN
        self._failures = 0
        self._metrics.lifecycle_breaker_open.set(1)
        self._opened.set()
        for scope in self._in_flight:
            scope.cancel()
