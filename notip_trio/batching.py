"""Adaptive batch size for a pull slot: large while a backlog drains, small on a trickle.

A pull request asks for `size` messages and ends when they all came or at its
expiry (TELEMETRY_FLUSH_MS). The batch it returns is also one COPY and one
transaction, so its size decides both throughput and latency:

- With a backlog the server sends a full request at once: a large request
  costs no waiting and amortises the per-batch costs (bridge crossings,
  transaction, fsync, the gateways' last-seen upsert). Measured (BENCHMARKS.md):
  fixed batches of 1000 / 5000 drained 28k / 51k msgs/s; adaptive up to 10000, 61-65k.
- On a live stream without backlog a request fills at the arrival rate: the
  first message of a batch of 5000 at 7,500 msgs/s per slot waits ~670 ms for
  the last (measured p99 ~1 s at half load, against 194 ms at batch 1000).

So the size follows what the last pull showed (pure: no clock, no I/O):

- the rate it filled at times `target_fill_s` (the size that fills in that long);
- at least double the size while the consumer's pending count (from the last
  delivery's ack subject) is a full request or more: a backlog;
- never more than 4x up or 2x down per pull (one odd pull moves it little);
- always within [minimum, maximum] (TELEMETRY_BATCH_MIN, TELEMETRY_BATCH_SIZE).

A pull that expired short already waited its full expiry: the size it
suggests only keeps the next request from waiting for more than will come.
"""

from __future__ import annotations

GROW_MAX = 4  # at most x4 per pull: min 100 -> max 10000 in 4 pulls of a backlog
SHRINK_MAX = 2  # at most /2 per pull: max -> min in 7 pulls of a trickle


class BatchPolicy:
    """The request size of one pull slot, adjusted after every pull."""

    __slots__ = ("maximum", "minimum", "size", "target_fill_s")

    def __init__(self, minimum: int, maximum: int, target_fill_s: float) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum <= maximum, got {minimum}, {maximum}")
        if target_fill_s <= 0:
            raise ValueError(f"target_fill_s must be > 0, got {target_fill_s}")
        self.minimum = minimum
        self.maximum = maximum
        self.target_fill_s = target_fill_s
        self.size = minimum  # start small: a trickle is served at once; a backlog grows it

    @property
    def fixed(self) -> bool:
        return self.minimum == self.maximum

    def observe(self, *, requested: int, got: int, elapsed_s: float, pending: int) -> int:
        """Learn from one pull: `requested` asked, `got` came in `elapsed_s`, the
        consumer had `pending` more waiting after it. Returns the next size."""
        if self.fixed:
            return self.size
        rate = got / max(elapsed_s, 1e-3)
        wanted = int(rate * self.target_fill_s)
        if got >= requested and pending >= self.size:
            wanted = max(wanted, 2 * self.size)  # backlog: the next request fills at once
        wanted = min(wanted, GROW_MAX * self.size)
        wanted = max(wanted, self.size // SHRINK_MAX)
        self.size = min(max(wanted, self.minimum), self.maximum)
        return self.size
