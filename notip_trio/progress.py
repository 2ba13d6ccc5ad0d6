"""Is the daemon making progress? What `/livez` answers (docs/contract.md Behaviour 7).

A task tree that runs is not enough: a write blocked on a dead connection, a
pull path that delivers nothing, or a liveness loop that stopped ticking all
leave every task alive. `ProgressWatchdog` is pure bookkeeping (times are
passed in, Trio's clock in the daemon) that names what is stuck:

- ingest: work is pending (deliveries in hand, or consumer lag reported by
  the last delivery) and nothing has been committed, nor has the work become
  pending, for longer than `stall_s`;
- NATS: not connected for longer than `stall_s` (nats-py reconnects for ever,
  so a client that cannot get back is only ever seen here);
- liveness, while this replica leads (followers do not tick): the tick loop
  did not begin or end a tick for `tick_stall_s` (several tick intervals)
  since it began leading, or one tick has run for longer than `tick_max_s`.

The database being down is not "stuck": the write path fails fast and keeps
retrying, so the ingest check trips only after `stall_s` of that, by design:
a restart then costs nothing (nothing is acked that is not stored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

# A tick waits on the management API (bounded per request) and on publishes
# (bounded); many candidates at once legitimately take a while.
TICK_MAX_S: Final = 600.0
TICK_STALL_INTERVALS: Final = 5


@dataclass(slots=True)
class IngestProgress:
    """Kept up to date by ingest; read by the watchdog."""

    in_hand: int = 0  # deliveries received and not yet acked, nak'ed or terminated
    lag: int = 0  # the consumer's pending count, from the last delivery
    progress_at: float = 0.0  # last commit, or when work became pending after none
    failing: bool = False  # the last write failed: redeliveries are not new work

    def received(self, count: int, lag: int | None, now: float) -> None:
        if not self.pending and not self.failing:
            self.progress_at = now  # idle until now: the clock starts here
        self.in_hand += count
        if lag is not None:
            self.lag = lag

    def settled(self, count: int, *, committed: bool, now: float) -> None:
        """`count` deliveries acked or terminated after a commit, or nak'ed after a failure."""
        self.in_hand = max(0, self.in_hand - count)
        self.failing = not committed
        if committed:
            self.progress_at = now

    @property
    def pending(self) -> bool:
        return self.in_hand > 0 or self.lag > 0


@dataclass(eq=False)
class ProgressWatchdog:
    stall_s: float
    tick_s: float
    started_at: float
    tick_max_s: float = TICK_MAX_S
    ingest: IngestProgress = field(default_factory=IngestProgress)
    _leading_since: float | None = None
    _tick_began: float | None = None
    _tick_ended: float | None = None
    _disconnected_at: float | None = None

    def __post_init__(self) -> None:
        self.ingest.progress_at = self.started_at

    @property
    def tick_stall_s(self) -> float:
        return TICK_STALL_INTERVALS * self.tick_s

    def lead_started(self, now: float) -> None:
        self._leading_since = now
        self._tick_began = self._tick_ended = None

    def lead_ended(self) -> None:
        self._leading_since = None
        self._tick_began = None

    def tick_started(self, now: float) -> None:
        self._tick_began = now

    def tick_finished(self, now: float) -> None:
        self._tick_began = None
        self._tick_ended = now

    def nats_connected(self, connected: bool, now: float) -> None:
        if connected:
            self._disconnected_at = None
        elif self._disconnected_at is None:
            self._disconnected_at = now

    def problems(self, now: float) -> list[str]:
        """Why the daemon is not making progress; empty when it is."""
        out: list[str] = []
        ing = self.ingest
        if ing.pending and now - ing.progress_at > self.stall_s:
            out.append(
                f"ingest: {ing.in_hand} deliveries in hand, lag {ing.lag}, nothing committed "
                f"for {now - ing.progress_at:.0f} s (bound {self.stall_s:g} s)"
            )
        if self._disconnected_at is not None and now - self._disconnected_at > self.stall_s:
            out.append(
                f"nats: disconnected for {now - self._disconnected_at:.0f} s "
                f"(bound {self.stall_s:g} s)"
            )
        if self._leading_since is None:
            pass  # a follower: the leader ticks (and its own /livez watches that)
        elif self._tick_began is not None:
            if now - self._tick_began > self.tick_max_s:
                out.append(
                    f"liveness: one tick has run for {now - self._tick_began:.0f} s "
                    f"(bound {self.tick_max_s:g} s)"
                )
        else:
            last = self._tick_ended if self._tick_ended is not None else self._leading_since
            if now - last > self.tick_stall_s:
                out.append(
                    f"liveness: no tick for {now - last:.0f} s "
                    f"(ticks every {self.tick_s:g} s, bound {self.tick_stall_s:g} s)"
                )
        return out
