"""The liveness tick schedule of `run_liveness`: fixed phase, overrun slots skipped.

Rules for this file: `autojump_clock`; the tracker is a fake whose ticks take
as long as the test says, recording when each began; every test has a hang
guard.
"""

from __future__ import annotations

import logging

import pytest
import trio

from notip_trio.liveness import Heartbeats, run_liveness

GUARD_S = 3600


class TimedTicker:
    """What `run_liveness` uses of a tracker; tick k (0-based) takes `takes[k]` s."""

    def __init__(self, tick_s: float, takes: list[float]) -> None:
        self.tick_s = tick_s
        self.takes = takes
        self.started: list[float] = []
        self.closed = False

    def record(self, hb: Heartbeats) -> None:
        pass

    async def tick(self) -> None:
        k = len(self.started)
        self.started.append(trio.current_time())
        await trio.sleep(self.takes[k] if k < len(self.takes) else 0)

    def close_updates(self) -> None:
        self.closed = True


async def test_an_overrunning_tick_skips_the_slots_it_missed_and_keeps_the_phase(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    # 10 s ticks. The first (10 s) takes 25 s: the slots of 20 and 30 s are
    # skipped, the next runs at 40 s, not at once. One of 9.5 s (40 s) skips
    # nothing; one of 10.5 s (50 s) skips the slot of 60 s.
    ticker = TimedTicker(10, [25, 9.5, 10.5])
    send, receive = trio.open_memory_channel[Heartbeats](1)
    caplog.set_level(logging.WARNING)
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_liveness, ticker, receive)
            await trio.sleep_until(95)
            await send.aclose()
    assert ticker.started == [10, 40, 50, 70, 80, 90]
    overruns = [
        (r.notip_ctx["skipped"])  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "heartbeat_tick_overran"
    ]
    assert overruns == [2, 1]
    assert ticker.closed


async def test_ticks_that_fit_run_on_every_slot(autojump_clock: trio.abc.Clock) -> None:
    ticker = TimedTicker(10, [9.9] * 5)
    send, receive = trio.open_memory_channel[Heartbeats](1)
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_liveness, ticker, receive)
            await trio.sleep_until(55)
            await send.aclose()
    assert ticker.started == [10, 20, 30, 40, 50]
