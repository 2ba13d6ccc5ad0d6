"""The leader's loop around a `LivenessTracker` (liveness.py): load the state,
then tick on schedule, and early when a gateway becomes due, until cancelled."""

from __future__ import annotations

import gc
from typing import NoReturn, Protocol

import trio

from .errors import DatabaseError
from .liveness import WAKE_MIN_GAP_S, LivenessTracker
from .log import get_logger

log = get_logger(__name__)


class TickObserver(Protocol):
    """Told when leading begins and ends and when each tick begins and ends
    (the progress watchdog behind /livez)."""

    def lead_started(self, now: float) -> None: ...

    def lead_ended(self) -> None: ...

    def tick_started(self, now: float) -> None: ...

    def tick_finished(self, now: float) -> None: ...


async def lead_liveness(
    tracker: LivenessTracker, tick_s: float, observer: TickObserver | None = None
) -> None:
    """The leader's work: load the state, then tick on schedule until cancelled.

    While the database cannot be read, the load is retried every tick.
    """
    if observer is not None:
        observer.lead_started(trio.current_time())
    try:
        while True:
            try:
                # Each attempt counts as a tick for the watchdog: the leader is at work.
                if observer is not None:
                    observer.tick_started(trio.current_time())
                try:
                    await tracker.take_over()
                finally:
                    if observer is not None:
                        observer.tick_finished(trio.current_time())
                break
            except DatabaseError as exc:
                log.warning("liveness_state_load_failed", error=str(exc)[:300], retry_in_s=tick_s)
                await trio.sleep(tick_s)
        await _tick_forever(tracker, tick_s, observer)
    finally:
        tracker.clear_gauges()  # a follower tracks nothing
        gc.unfreeze()  # what the takeover froze (`_gc_paused`) is collectable again
        if observer is not None:
            observer.lead_ended()


async def _tick_forever(
    tracker: LivenessTracker, tick_s: float, observer: TickObserver | None
) -> NoReturn:
    """Tick at once (a takeover alerts whoever fell silent while nobody led), then
    at every slot (start + n * tick_s), and early, between two slots, when a
    gateway becomes due (`LivenessTracker.wake_at`), so an alert need not wait
    for the next slot."""
    start = trio.current_time()
    n = 0
    last = -float("inf")
    while True:
        slot = start + n * tick_s
        wake = slot
        if tracker.wake_at is not None:
            wake = min(slot, max(tracker.wake_at, last + WAKE_MIN_GAP_S))
        early = wake < slot
        await trio.sleep_until(wake)
        last = trio.current_time()
        if observer is not None:
            observer.tick_started(last)
        await tracker.tick()
        if observer is not None:
            observer.tick_finished(trio.current_time())
        if early and trio.current_time() < slot:
            continue  # the slot's own tick still runs
        # A tick that overran (slow management API) skips the slots it missed
        # instead of running back to back; the schedule keeps its phase.
        behind = int((trio.current_time() - start) // tick_s)
        if behind > n:
            log.warning("heartbeat_tick_overran", skipped=behind - n)
        n = max(n, behind) + 1
