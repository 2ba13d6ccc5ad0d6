"""Liveness on the leader: offline detection, alerts, status updates, races.

Rules for this file: everything runs on `autojump_clock`; the liveness state is
a `FakeStore` with the table's semantics (`beat_at` does what every replica's
ingest does: records last-seen in the store); the management API is a
`FakeRequester` behind the real `MgmtClient` (so its retry policy is part of
the timings), JetStream a `FakePublisher`, the dispatcher a `RecordingSink`.
The wall clock follows Trio's (`wall_at(t)`), so wire timestamps are exact.
The leader reads the store and acts at each tick (10, 20, ...; default timeout
30 s; grace 0 unless stated); heartbeats are placed at times that never
coincide with a tick. Every test has a hang guard.
"""

from __future__ import annotations

import gc
import logging
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import pytest
import trio
import trio.testing

from notip_trio.alertconfig import AlertConfigCache
from notip_trio.errors import DatabaseError
from notip_trio.horizon import AckFloorHorizon, Horizon, StreamClock
from notip_trio.lanes import Key
from notip_trio.liveness import AlertHorizon, LivenessTracker
from notip_trio.livestate import BULK_ROWS
from notip_trio.metrics import Metrics
from notip_trio.mgmt import SUBJECT_GET_STATUS, AlertConfig, MgmtClient
from notip_trio.ticking import lead_liveness
from tests.liveness_fakes import (
    WALL0,
    CaughtUp,
    FakePosition,
    FakePublisher,
    FakeRequester,
    FakeStore,
    RecordingSink,
    sample,
    status_handler,
    trio_wall_clock,
    wall_at,
)

GUARD_S = 3600
TICK_S = 10.0
GW1 = ("t1", "gw1")
GW2 = ("t1", "gw2")


class Rig:
    """A leader's tracker wired to fakes; `running()` runs `lead_liveness` around a block."""

    def __init__(
        self,
        *,
        configs: list[AlertConfig] | None = None,
        status_delay_s: float = 0.0,
        publish_delay_s: float = 0.0,
        grace_s: float = 0.0,
        concurrency: int = 32,
        store: FakeStore | None = None,
        horizon: AlertHorizon | None = None,
    ) -> None:
        self.metrics = Metrics()
        self.cache = AlertConfigCache(30_000)
        if configs:
            self.cache.replace(configs)
        self.states: dict[tuple[str, str], str] = {}
        self.requester = FakeRequester(
            {SUBJECT_GET_STATUS: status_handler(self.states, delay_s=status_delay_s)}
        )
        self.publisher = FakePublisher(delay_s=publish_delay_s)
        self.store = store if store is not None else FakeStore()
        self.sink = RecordingSink(self.store)
        self.horizon = horizon if horizon is not None else CaughtUp()
        self.grace_s = grace_s
        self.concurrency = concurrency
        self.tracker = self.new_tracker()

    def new_tracker(self) -> LivenessTracker:
        """A fresh leader over the same store (a restart or a takeover)."""
        return LivenessTracker(
            self.store,
            self.cache,
            MgmtClient(self.requester),
            self.publisher,
            self.sink,
            self.metrics,
            self.horizon,
            grace_until=self.grace_s,
            concurrency=self.concurrency,
            wall_clock=trio_wall_clock,
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lead_liveness, self.tracker, TICK_S)
            await trio.testing.wait_all_tasks_blocked()
            yield
            nursery.cancel_scope.cancel()

    async def beat_at(self, t: float, *gateways: tuple[str, str]) -> None:
        await trio.sleep_until(t)
        for key in gateways:
            self.store.record(key, wall_at(t))
        await trio.testing.wait_all_tasks_blocked()

    async def store_down(self, start: float, end: float) -> None:
        """The store fails every call from `start` to `end` (Trio time)."""
        await trio.sleep_until(start)
        self.store.down = True
        await trio.sleep_until(end)
        self.store.down = False

    def published(self) -> list[tuple[float, str, str]]:
        """(time, subject, gatewayId) of each acknowledged alert; times to the ms
        (an early tick's wake time is computed in epoch seconds)."""
        return [
            (round(t, 3), subject, body["gatewayId"])
            for t, subject, body, _ in self.publisher.published
        ]

    def status_query_times(self) -> list[float]:
        return [round(t, 3) for t in self.requester.times(SUBJECT_GET_STATUS)]


@pytest.mark.parametrize(
    ("seen", "fires", "last_seen", "detected"),
    [
        (5, 35.1, "2024-05-01T12:00:05Z", "2024-05-01T12:00:35.1Z"),
        (10.5, 40.6, "2024-05-01T12:00:10.5Z", "2024-05-01T12:00:40.6Z"),
        (19.25, 49.35, "2024-05-01T12:00:19.25Z", "2024-05-01T12:00:49.35Z"),
    ],
)
async def test_alert_fires_after_timeout_without_waiting_for_the_next_slot(
    autojump_clock: trio.abc.Clock, seen: float, fires: float, last_seen: str, detected: str
) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig()
        async with rig.running():
            await rig.beat_at(seen, GW1)
            await trio.sleep_until(fires - 0.5)
            assert rig.publisher.published == []  # not before
            assert rig.tracker.status(*GW1) == "online"
            await trio.sleep_until(fires + 0.5)
        (t, subject, body, msg_id) = rig.publisher.published[0]
        assert len(rig.publisher.published) == 1
        # Not at the next slot (tick_s apart): an early tick when last-seen +
        # timeout passes the horizon, WAKE_SLACK_S after it.
        assert round(t, 3) == fires
        assert subject == "alert.t1.gw_offline"
        assert body == {
            "gatewayId": "gw1",
            "lastSeen": last_seen,
            "timeoutMs": 30_000,
            "timestamp": detected,
        }
        assert msg_id == f"gw_offline.t1.gw1.{last_seen}"
        assert rig.tracker.status(*GW1) == "offline"
        # first seen -> online; after the PubAck -> offline with the last-seen time.
        assert rig.sink.brief() == [
            ("gw1", "online", wall_at(seen)),
            ("gw1", "offline", wall_at(seen)),
        ]
        assert sample(rig.metrics, "alerts_published_total") == 1


async def test_steady_heartbeats_never_alert(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig()
        async with rig.running():
            for t in range(1, 200, 25):
                await rig.beat_at(t + 0.5, GW1)
        assert rig.publisher.published == []
        assert rig.status_query_times() == []
        assert rig.sink.brief() == [("gw1", "online", wall_at(1.5))]
        assert rig.store.status(GW1) == "online"


async def test_grace_period_suppresses_alerts(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig(grace_s=60)
        async with rig.running():
            await rig.beat_at(1, GW1)
            await trio.sleep_until(59)
            assert rig.publisher.published == []
            assert rig.status_query_times() == []  # not even asked during the grace
            await trio.sleep_until(61)
        assert rig.published() == [(60, "alert.t1.gw_offline", "gw1")]


async def test_timeout_precedence_gateway_then_tenant_then_default(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        configs = [AlertConfig("t1", 20_000), AlertConfig("t1", 50_000, "gwA")]
        rig = Rig(configs=configs)
        async with rig.running():
            await rig.beat_at(1, ("t1", "gwA"), ("t1", "gwB"), ("t2", "gwC"))
            await trio.sleep_until(65)
        # gwB: tenant 20 s -> 21; gwC: default 30 s -> 31; gwA: own 50 s -> 51.
        assert [(t, gw) for t, _, gw in rig.published()] == [
            (21.1, "gwB"),
            (31.1, "gwC"),
            (51.1, "gwA"),
        ]
        timeouts = {b["gatewayId"]: b["timeoutMs"] for _, _, b, _ in rig.publisher.published}
        assert timeouts == {"gwA": 50_000, "gwB": 20_000, "gwC": 30_000}


@pytest.mark.parametrize(("new_timeout_ms", "fires"), [(100_000, 101.1), (10_000, 11.1)])
@pytest.mark.parametrize("gateway_entry", [False, True])
async def test_config_change_applies_to_tracked_gateways(
    autojump_clock: trio.abc.Clock, new_timeout_ms: int, fires: float, gateway_entry: bool
) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig()
        async with rig.running():
            await rig.beat_at(1, GW1)
            await rig.beat_at(2, ("t2", "gw9"))  # stays on the default: alert at 32.1
            await trio.sleep_until(5)
            entry_gw = "gw1" if gateway_entry else None
            rig.cache.replace([AlertConfig("t1", new_timeout_ms, entry_gw)])
            await trio.sleep_until(fires + 1)
            await rig.beat_at(fires + 1.5, GW1)  # back, on the moved gateway's new timeout
            await rig.beat_at(fires + 2.5, ("t1", "gw3"))  # a newcomer gets the new timeout
            await trio.sleep_until(fires + 200)
        timeout_s = new_timeout_ms / 1000
        # Each alert WAKE_SLACK_S after last-seen + timeout (the index is retimed
        # at the tick at 10, the new last-seens are read at the next slot).
        expected = {
            (fires, "gw1"),
            (32.1, "gw9"),
            (round(fires + 1.5 + timeout_s + 0.1, 3), "gw1"),
        }
        if not gateway_entry:
            expected.add((round(fires + 2.5 + timeout_s + 0.1, 3), "gw3"))
        else:
            expected.add((round(fires + 2.5 + 30 + 0.1, 3), "gw3"))
        assert {(t, gw) for t, _, gw in rig.published()} == expected


async def test_paused_gives_no_alert_and_no_update_and_is_asked_with_back_off(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig(status_delay_s=3)
        rig.states[GW1] = "paused"
        async with rig.running():
            await rig.beat_at(1, GW1)
            await trio.sleep_until(335)
            # Due at 31; asked at once (31.1), then at the first slot 60 s
            # later, then after 120 s (the ALERT_CONFIG_REFRESH_MS cap), not at
            # every tick.
            assert rig.status_query_times() == [31.1, 100, 220]
            assert rig.publisher.published == []
            assert rig.sink.brief() == [("gw1", "online", wall_at(1))]
            assert rig.tracker.status(*GW1) == "online"
            rig.states[GW1] = "online"  # resumed at 225, still silent
            await trio.sleep_until(355)
        # Alerted at its next check (340, the answer 3 s later).
        assert rig.status_query_times() == [31.1, 100, 220, 340]
        assert rig.published() == [(343, "alert.t1.gw_offline", "gw1")]
        assert sample(rig.metrics, "alerts_suppressed_paused_total") == 3


async def test_a_paused_gateway_heard_again_starts_its_back_off_afresh(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig(configs=[AlertConfig("t1", 30_000)])
        rig.states[GW1] = "paused"
        rig.states[GW2] = "paused"
        async with rig.running():
            await rig.beat_at(1, GW1, GW2)
            await rig.beat_at(150.5, GW1)  # gw1 sends again; due again at 180.5
            await trio.sleep_until(505)
        queries = [(t, p["gateway_id"]) for t, _, p in rig.requester.calls]
        assert [round(t, 3) for t, gw in queries if gw == "gw2"] == [31.1, 100, 220, 340, 460]
        assert [round(t, 3) for t, gw in queries if gw == "gw1"] == [
            31.1,
            100,
            180.6,
            250,
            370,
            490,
        ]
        assert rig.publisher.published == []


@pytest.mark.parametrize("state", ["online", "offline", "provisioning"])
async def test_any_other_state_alerts(autojump_clock: trio.abc.Clock, state: str) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig()
        rig.states[GW1] = state
        async with rig.running():
            await rig.beat_at(1, GW1)
            await trio.sleep_until(45)
        assert rig.published() == [(31.1, "alert.t1.gw_offline", "gw1")]


async def _no_responders(payload: bytes) -> bytes:
    from notip_trio.errors import NatsRequestError

    raise NatsRequestError("no responders")


async def _wrong_gateway(payload: bytes) -> bytes:
    return b'{"gateway_id": "someone-else", "state": "paused"}'


async def _unknown_state(payload: bytes) -> bytes:
    return b'{"gateway_id": "gw1", "state": "sleeping"}'


@pytest.mark.parametrize("handler", [_no_responders, _wrong_gateway, _unknown_state])
async def test_failed_or_invalid_status_query_fails_open(
    autojump_clock: trio.abc.Clock, handler: Any
) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig()
        rig.requester.handlers[SUBJECT_GET_STATUS] = handler
        async with rig.running():
            await rig.beat_at(1, GW1)
            await trio.sleep_until(50)
        # Tick at 31.1, the client's retries after 1, 2 and 4 s, then the alert.
        assert rig.status_query_times() == [31.1, 32.1, 34.1, 38.1]
        assert rig.published() == [(38.1, "alert.t1.gw_offline", "gw1")]
        assert sample(rig.metrics, "lifecycle_query_errors_total") == 1
        assert rig.tracker.status(*GW1) == "offline"


async def test_failed_publish_stays_online_and_next_tick_retries_same_msg_id(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig()
        rig.publisher.failures = 1
        async with rig.running():
            await rig.beat_at(1, GW1)
            await trio.sleep_until(35)
            assert rig.publisher.published == []
            assert rig.tracker.status(*GW1) == "online"
            assert rig.sink.brief() == [("gw1", "online", wall_at(1))]
            assert sample(rig.metrics, "alert_publish_errors_total") == 1
            await trio.sleep_until(45)
        # The early tick at 31.1 fails; the gateway, still due, waits for the
        # next slot (no early tick is planned for a gateway already due).
        assert [round(t, 3) for t, _ in rig.publisher.attempts] == [31.1, 40]
        assert len({msg_id for _, msg_id in rig.publisher.attempts}) == 1
        assert rig.published() == [(40, "alert.t1.gw_offline", "gw1")]
        assert rig.sink.brief()[-1] == ("gw1", "offline", wall_at(1))


async def test_the_takeover_freezes_its_objects_for_the_collector_until_leading_ends(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A million tracked gateways must not be traversed by every full
    collection: the takeover freezes what it built (`gc.freeze`), and the end
    of leading unfreezes it, so a tracker that is dropped can be collected."""
    with trio.fail_after(GUARD_S):
        rig = Rig()
        rig.store.record(GW1, wall_at(0))
        gc.unfreeze()
        async with rig.running():
            await trio.sleep(1)
            assert gc.get_freeze_count() > 0
            assert rig.tracker.status(*GW1) == "online"
        assert gc.get_freeze_count() == 0


async def test_first_seen_and_recovery_each_give_one_online_update(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig()
        async with rig.running():
            await rig.beat_at(1, GW1, GW2)
            await rig.beat_at(2, GW1)
            await rig.beat_at(25.5, GW2)  # gw2 stays alive
            await trio.sleep_until(45)
            assert rig.tracker.status(*GW1) == "offline"
            await rig.beat_at(45.5, GW1)  # back
            await rig.beat_at(46.5, GW1)
            await rig.beat_at(47.5, GW1, GW2)
            await trio.sleep_until(55)
            assert sample(rig.metrics, "gateways_online") == 2
            assert sample(rig.metrics, "gateways_offline") == 0
            assert sample(rig.metrics, "heartbeat_map_size") == 2
        # Reported at the next tick, with the last-seen the leader read then.
        assert rig.sink.brief() == [
            ("gw1", "online", wall_at(2)),
            ("gw2", "online", wall_at(1)),
            ("gw1", "offline", wall_at(2)),
            ("gw1", "online", wall_at(47.5)),
        ]
        # No longer leading: the gauges say this replica tracks nothing.
        assert sample(rig.metrics, "heartbeat_map_size") == 0


async def test_decommissioned_gateway_gets_no_alert_and_is_first_seen_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig()
        async with rig.running():
            await rig.beat_at(1, GW1, GW2)
            await trio.sleep_until(15)
            assert await rig.store.decommission(GW1)  # any replica, into the table
            assert not await rig.store.decommission(GW1)  # idempotent
            await trio.sleep_until(25)
            assert sample(rig.metrics, "heartbeat_map_size") == 1
            assert rig.tracker.status(*GW1) is None
            await trio.sleep_until(95)
            assert rig.published() == [(31.1, "alert.t1.gw_offline", "gw2")]
            await rig.beat_at(95.5, GW1)
            await trio.sleep_until(101)
        assert rig.tracker.status(*GW1) == "online"
        assert [u for u in rig.sink.brief() if u[0] == "gw1"] == [
            ("gw1", "online", wall_at(1)),
            ("gw1", "online", wall_at(95.5)),  # first seen again
        ]


async def test_many_candidates_are_queried_concurrently(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig(status_delay_s=3, concurrency=100)
        gateways = [("t1", f"gw{i}") for i in range(100)]
        async with rig.running():
            await rig.beat_at(1, *gateways)
            await trio.sleep_until(45)
        # 100 queries of 3 s each: one query time, not 300 s.
        assert rig.status_query_times() == [31.1] * 100
        assert [t for t, _, _ in rig.published()] == [34.1] * 100
        assert sample(rig.metrics, "heartbeat_tick_duration_seconds_sum") == 3


async def test_concurrency_is_bounded(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig(concurrency=10)
        in_flight = peak = 0

        async def slow_status(payload: bytes) -> bytes:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await trio.sleep(3)
            in_flight -= 1
            return await status_handler()(payload)

        rig.requester.handlers[SUBJECT_GET_STATUS] = slow_status
        async with rig.running():
            await rig.beat_at(1, *[("t1", f"gw{i}") for i in range(100)])
            await trio.sleep_until(75)
        assert peak == 10
        assert sorted(set(rig.status_query_times())) == [round(31.1 + 3 * k, 3) for k in range(10)]
        # One chunk: settled once its last answer is in (61.1), in one re-read and
        # one transition statement.
        assert [t for t, _, _ in rig.published()] == [61.1] * 100
        assert rig.store.bulk_sizes == [("current_last_seen_many", 100), ("mark_offline_many", 100)]


async def test_heartbeat_during_status_query_cancels_the_alert(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig(status_delay_s=3)
        async with rig.running():
            await rig.beat_at(1, GW1)
            await rig.beat_at(32.5, GW1)  # while the check at 31.1 is asking get-status
            await trio.sleep_until(62)
            assert rig.publisher.published == []
            assert rig.tracker.status(*GW1) == "online"
            await trio.sleep_until(85)
        # The new silence is detected on its own schedule, with its own last-seen.
        (t, _, body, _) = rig.publisher.published[0]
        assert (round(t, 3), body["lastSeen"]) == (65.6, "2024-05-01T12:00:32.5Z")
        assert rig.sink.brief() == [
            ("gw1", "online", wall_at(1)),
            ("gw1", "offline", wall_at(32.5)),
        ]


async def test_heartbeat_during_publish_reports_offline_then_online(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig(publish_delay_s=2)
        async with rig.running():
            await rig.beat_at(1, GW1)
            await rig.beat_at(32, GW1)  # the alert is in flight from 31.1 to 33.1
            await trio.sleep_until(34)
            assert rig.published() == [(33.1, "alert.t1.gw_offline", "gw1")]
            assert rig.sink.brief() == [
                ("gw1", "online", wall_at(1)),
                ("gw1", "offline", wall_at(1)),  # what the alert announced
            ]
            await trio.sleep_until(41)
            assert rig.tracker.status(*GW1) == "online"
            # ... and at the next tick, the heartbeat that followed
            assert rig.sink.brief()[-1] == ("gw1", "online", wall_at(32))
            await trio.sleep_until(85)
        assert [t for t, _, _ in rig.published()] == [33.1, 64.1]
        ids = [msg_id for _, _, _, msg_id in rig.publisher.published]
        assert ids[0] != ids[1]  # a new silence, a new alert


async def test_decommission_during_check_gives_no_alert(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig(status_delay_s=3)
        async with rig.running():
            await rig.beat_at(1, GW1)
            await trio.sleep_until(32)
            await rig.store.decommission(GW1)  # while get-status is asked
            await trio.sleep_until(100)
        assert rig.status_query_times() == [31.1]
        assert rig.publisher.published == []
        assert rig.sink.brief() == [("gw1", "online", wall_at(1))]


async def test_tick_refuses_to_run_twice_at_once(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig(status_delay_s=3)
        rig.store.record(GW1, wall_at(0))
        await rig.tracker.take_over()
        await trio.sleep_until(31)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.tracker.tick)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(RuntimeError, match="already running"):
                await rig.tracker.tick()
        assert len(rig.published()) == 1


async def test_a_tick_that_overruns_skips_the_slots_it_missed(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        # Six candidates asked one at a time, 4 s each: the early tick at 31.1
        # (when they become due) runs until 55.1.
        rig = Rig(status_delay_s=4, concurrency=1)
        async with rig.running():
            await rig.beat_at(1, *[("t1", f"gw{i}") for i in range(6)])
            await trio.sleep_until(95)
        # 40 and 50 are skipped; the schedule keeps its phase (60, 70, 80, 90).
        assert rig.status_query_times() == [31.1, 35.1, 39.1, 43.1, 47.1, 51.1]
        assert [t for t, _, _ in rig.published()] == [55.1] * 6
        ticks = sample(rig.metrics, "heartbeat_tick_duration_seconds_count")
        assert ticks == 9  # 0 (after the load), 10, 20, 30, 31.1 (until 55.1), 60, 70, 80, 90


# --- state that outlives the leader -------------------------------------------


async def test_restart_alerts_the_gateway_that_fell_silent_around_it_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The SIGKILL scenario on fakes: a new leader over the same table."""
    with trio.fail_after(GUARD_S):
        rig = Rig()
        gw_a, gw_b, gw_c = ("t1", "A"), ("t1", "B"), ("t1", "C")
        async with rig.running():
            await rig.beat_at(1, gw_a, gw_b, gw_c)
            await rig.beat_at(21, gw_a, gw_c)  # B silent since 1: alerted at 31.1
            await rig.beat_at(41, gw_c)
            await trio.sleep_until(45)
        assert rig.published() == [(31.1, "alert.t1.gw_offline", "B")]
        before = rig.sink.brief()
        # Killed at 45, back at 50 as a new leader; C kept sending meanwhile.
        await rig.beat_at(47, gw_c)
        await trio.sleep_until(50)
        rig.tracker = rig.new_tracker()
        async with rig.running():
            for t in range(57, 120, 10):
                await rig.beat_at(t, gw_c)
            await trio.sleep_until(120)
        # A (silent since 21): alerted once, just after 51 (the new leader ticks
        # at once after its load at 50, and early when A becomes due), with its
        # true last-seen; B not again; C never; no repeated online update.
        assert rig.published() == [
            (31.1, "alert.t1.gw_offline", "B"),
            (51.1, "alert.t1.gw_offline", "A"),
        ]
        assert rig.publisher.published[1][2]["lastSeen"] == "2024-05-01T12:00:21Z"
        assert rig.sink.brief()[len(before) :] == [("A", "offline", wall_at(21))]


async def test_an_old_and_a_new_leader_report_one_transition(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig(publish_delay_s=2)
        old, new = rig.tracker, rig.new_tracker()
        rig.store.record(GW1, wall_at(0))
        await old.take_over()
        await new.take_over()
        assert rig.sink.brief() == [("gw1", "online", wall_at(0))]  # one of them won
        await trio.sleep_until(35)
        async with trio.open_nursery() as nursery:  # both think they lead
            nursery.start_soon(old.tick)
            nursery.start_soon(new.tick)
        # Both published the same alert (JetStream stores it once: same msg id) ...
        ids = {msg_id for _, _, _, msg_id in rig.publisher.published}
        assert len(rig.publisher.published) == 2
        assert ids == {"gw_offline.t1.gw1.2024-05-01T12:00:00Z"}
        # ... but only the winner of the conditional update reports it.
        assert rig.sink.brief()[1:] == [("gw1", "offline", wall_at(0))]
        assert rig.store.status(GW1) == "offline"


async def test_a_database_error_ends_the_tick_and_the_next_one_recovers(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig()
        async with rig.running():
            await rig.beat_at(1, GW1)
            await trio.sleep_until(25)  # gw1 due at 31
            rig.store.down = True
            await trio.sleep_until(55)
            assert rig.publisher.published == []  # nothing decided blind
            rig.store.down = False
            await trio.sleep_until(65)
        assert rig.published() == [(60, "alert.t1.gw_offline", "gw1")]


async def test_the_state_is_loaded_again_until_the_database_answers(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        rig = Rig()
        rig.store.record(GW1, wall_at(0))
        rig.store.down = True
        async with rig.running():
            await trio.sleep_until(25)
            assert rig.store.calls["load_chunk"] == 3  # at 0, 10, 20 (each at its first chunk)
            rig.store.down = False
            await trio.sleep_until(30.2)
            assert rig.store.calls["load_chunk"] == 4
            assert rig.sink.brief() == [("gw1", "online", wall_at(0))]
            await trio.sleep_until(75)
        # Loaded at 30, ticked at once: gw1 (seen at 0) is not due yet (due means
        # strictly past the timeout), so an early tick alerts it, no sooner than
        # WAKE_MIN_GAP_S after the one before.
        assert rig.published() == [(30.25, "alert.t1.gw_offline", "gw1")]


# --- the alert horizon ----------------------------------------------------------


def wall_now() -> float:
    return trio_wall_clock().timestamp()


def floor_horizon(position: FakePosition, *, max_lag_s: float = 120.0,
                  clock: StreamClock | None = None) -> AckFloorHorizon:  # fmt: skip
    return AckFloorHorizon(position, clock or StreamClock(), max_lag_s=max_lag_s, wall=wall_now)


async def test_the_horizon_is_the_first_unacknowledged_message() -> None:
    t0 = WALL0.timestamp()
    position = FakePosition()
    horizon = AckFloorHorizon(position, StreamClock(), max_lag_s=60.0, wall=lambda: t0 + 100)
    assert await horizon.read() == Horizon(at=t0 + 100, now=t0 + 100, bounded=False)
    first, second, third = (position.publish(t0 + t) for t in (90, 95, 99))
    position.ack(first, third)  # acknowledged out of order: the floor stays at `first`
    assert (await horizon.read()).at == t0 + 95
    position.ack(second)  # all acknowledged: everything is stored
    assert (await horizon.read()).at == t0 + 100
    position.publish(t0 + 10)  # a message held 90 s (say poison): bounded at now - 60
    assert await horizon.read() == Horizon(at=t0 + 40, now=t0 + 100, bounded=True)


def test_the_stream_clock_never_runs_ahead_of_the_server() -> None:
    clock = StreamClock(window_s=60.0)
    assert clock.now(1000.0) == 1000.0  # nothing learnt yet
    # This host runs 10 s ahead of the stream; deliveries take 0.05 to 3 s.
    for wall, delay in ((1000.0, 3.0), (1001.0, 0.05), (1002.0, 0.5)):
        clock.observe(wall, wall - 10.0 - delay)
    assert clock.skew == pytest.approx(10.05)  # the skew plus the shortest delay
    assert clock.now(1010.0) == pytest.approx(999.95)  # never later than the server's
    clock.observe(1070.0, 1070.0 - 10.2)  # a new window keeps the last one's estimate
    assert clock.skew == pytest.approx(10.05)
    clock.observe(1140.0, 1140.0 - 10.3)  # two windows on, only recent samples count
    assert clock.skew == pytest.approx(10.2)


async def test_no_alert_while_a_heartbeat_is_held_unacknowledged(
    autojump_clock: trio.abc.Clock,
) -> None:
    """gw1's heartbeat at 20 s reached the stream but a replica that died holds it
    unacknowledged until ack_wait (redelivered and stored at 52): gw1 was alive,
    so it is never alerted, though its stored last-seen (1 s) is 30 s old at 31."""
    with trio.fail_after(GUARD_S):
        position = FakePosition()
        rig = Rig(horizon=floor_horizon(position))
        async with rig.running():
            await rig.beat_at(1, GW1, GW2)
            position.ack(position.publish(wall_at(1).timestamp()))
            await trio.sleep_until(20)
            held = position.publish(wall_at(20).timestamp())  # gw1's, on the dead replica
            await trio.sleep_until(52)
            assert rig.published() == []  # gw2 too is held back: its silence is not sure
            rig.store.record(GW1, wall_at(20))  # redelivered, stored, then acked
            position.ack(held)
            await trio.sleep_until(65)
        # gw2 (silent since 1) is alerted at the first slot after the floor moved;
        # gw1 (seen at 20, due at 50, nothing newer) at that tick as well.
        assert rig.published() == [
            (60, "alert.t1.gw_offline", "gw2"),
            (60, "alert.t1.gw_offline", "gw1"),
        ]
        # Both transitions in one statement: reported in key order.
        assert rig.sink.brief()[-2:] == [
            ("gw1", "offline", wall_at(20)),
            ("gw2", "offline", wall_at(1)),
        ]
        # A horizon standing still plans no early tick: the slots only (0 to 60).
        assert sample(rig.metrics, "heartbeat_tick_duration_seconds_count") == 7


async def test_a_floor_that_never_moves_delays_alerts_by_the_bound_only(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        position = FakePosition()
        rig = Rig(horizon=floor_horizon(position, max_lag_s=60.0))
        position.publish(wall_at(0).timestamp())  # held for ever (never acknowledged)
        async with rig.running():
            await rig.beat_at(1, GW1)
            await trio.sleep_until(105)
        # Due at 31 on a settled consumer; held back until now - 60 passes 31: at
        # 91. The bounded horizon moves on with the clock, so an early tick
        # alerts it then, not the slot at 100.
        assert rig.published() == [(91.1, "alert.t1.gw_offline", "gw1")]


async def test_a_leader_whose_clock_runs_ahead_does_not_alert_early(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The leader's clock runs 15 s ahead of the stream's; ingest has learnt it. gw1
    last reached the stream at (stream time) 1 s: due at 31 in stream time, so it is
    alerted at the first tick when the stream's clock has passed 31."""
    with trio.fail_after(GUARD_S):
        clock = StreamClock()
        position = FakePosition()
        horizon = AckFloorHorizon(
            position, clock, max_lag_s=120.0, wall=lambda: wall_now() + 15.0
        )
        rig = Rig(horizon=horizon)
        clock.observe(wall_now() + 15.0, wall_now())  # a delivery: 15 s apart
        async with rig.running():
            await rig.beat_at(1, GW1)
            await trio.sleep_until(31)
            assert rig.published() == []  # by the leader's clock it was due at 16
            await trio.sleep_until(45)
        assert rig.published() == [(31.1, "alert.t1.gw_offline", "gw1")]


async def test_an_unreadable_horizon_holds_alerts_but_not_onlines(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(GUARD_S):
        position = FakePosition()
        rig = Rig(horizon=floor_horizon(position))
        position.failing = True
        async with rig.running():
            await rig.beat_at(1, GW1)
            await trio.sleep_until(55)
            assert rig.sink.brief() == [("gw1", "online", wall_at(1))]
            assert rig.published() == []
            position.failing = False
            await trio.sleep_until(65)
        assert rig.published() == [(60, "alert.t1.gw_offline", "gw1")]


async def test_a_late_old_message_does_not_bring_an_offline_gateway_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A message that reached the stream at 2 s but is only processed at 45 s (a
    replica died holding it, redelivered after ack_wait): gw1 is still silent, so
    no `online`; a message that says it is alive now does bring it back."""
    with trio.fail_after(GUARD_S):
        rig = Rig()
        async with rig.running():
            await rig.beat_at(1, GW1)
            await trio.sleep_until(45)
            assert rig.store.status(GW1) == "offline"  # alerted at 31.1, last-seen 1 s
            rig.store.record(GW1, wall_at(2))  # late, and older than its timeout
            await trio.sleep_until(55)
            assert rig.tracker.status(*GW1) == "offline"
            assert [s for _, s, _ in rig.sink.brief()] == ["online", "offline"]
            await rig.beat_at(56, GW1)  # alive now
            await trio.sleep_until(65)
        assert rig.sink.brief() == [
            ("gw1", "online", wall_at(1)),
            ("gw1", "offline", wall_at(1)),
            ("gw1", "online", wall_at(56)),
        ]
        assert rig.published() == [(31.1, "alert.t1.gw_offline", "gw1")]


# --- faults inside a tick ---------------------------------------------------------


async def test_the_store_going_down_during_a_check_ends_the_tick_not_the_leader(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """get-status takes 2 s and is asked one at a time; the store goes down
    meanwhile, so the chunk's re-read of last-seen fails. The tick ends, logged
    once; the leader keeps ticking and alerts each gateway once when the store
    answers again."""
    caplog.set_level(logging.WARNING)
    gw3 = ("t1", "gw3")
    with trio.fail_after(GUARD_S):
        rig = Rig(status_delay_s=2, concurrency=1)
        async with rig.running():
            await rig.beat_at(1, GW1, GW2, gw3)
            await rig.beat_at(2)  # nothing heard after 1 s
            await rig.store_down(36, 38)
            await trio.sleep_until(65)
        # The early tick at 31.1 (all three due at 31) asked until 37.1, then its
        # re-read failed; the slot at 40 asks again.
        assert rig.status_query_times() == [31.1, 33.1, 35.1, 40, 42, 44]
        assert rig.published() == [
            (46, "alert.t1.gw_offline", "gw1"),
            (46, "alert.t1.gw_offline", "gw2"),
            (46, "alert.t1.gw_offline", "gw3"),
        ]
        errors = [r for r in caplog.records if r.getMessage() == "liveness_tick_database_error"]
        assert len(errors) == 1


class _SlowReread(FakeStore):
    async def current_last_seen_many(self, keys: Sequence[Key]) -> dict[Key, datetime]:
        await trio.sleep(0.5)
        return await super().current_last_seen_many(keys)


async def test_a_database_error_in_one_chunk_ends_the_tick_while_the_next_is_asked(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """More candidates than one chunk: the first chunk's re-read (0.5 s) fails
    while the second chunk is being asked; the tick ends at once (the second
    chunk's queries are abandoned), and the next tick alerts every gateway once."""
    caplog.set_level(logging.WARNING)
    count = BULK_ROWS + 500
    gateways = [("t1", f"gw{i:05d}") for i in range(count)]
    with trio.fail_after(GUARD_S):
        rig = Rig(status_delay_s=2, concurrency=count, store=_SlowReread())
        async with rig.running():
            await rig.beat_at(1, *gateways)
            await rig.store_down(32, 36)  # while the early tick at 31.1 is asking
            await trio.sleep_until(65)
        asked = Counter(rig.status_query_times())
        assert asked == {31.1: BULK_ROWS, 33.1: 500, 40: BULK_ROWS, 42: 500}
        assert Counter(t for t, _, _ in rig.published()) == {42.5: BULK_ROWS, 44.5: 500}
        assert sorted(g for _, _, g in rig.published()) == [g for _, g in gateways]
        errors = [r for r in caplog.records if r.getMessage() == "liveness_tick_database_error"]
        assert len(errors) == 1


async def test_a_database_error_in_one_of_many_workers_ends_the_tick(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The same with every candidate checked at once: all of them fail together,
    the tick ends, and the next one alerts each gateway once."""
    with trio.fail_after(GUARD_S):
        rig = Rig(status_delay_s=2)
        gateways = [("t1", f"gw{i}") for i in range(10)]
        async with rig.running():
            await rig.beat_at(1, *gateways)
            await rig.store_down(32, 36)  # while the early tick at 31.1 is asking
            await trio.sleep_until(65)
        assert sorted(g for _, _, g in rig.published()) == sorted(g for _, g in gateways)
        assert {t for t, _, _ in rig.published()} == {42}


class _FailsMarkOnlineOnce(FakeStore):
    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def mark_online(self, keys: Sequence[Key]) -> list[tuple[Key, datetime]]:
        if self.failures:
            self.failures -= 1
            self.calls["mark_online"] = self.calls.get("mark_online", 0) + 1
            raise DatabaseError("OperationalError: the database is down (fake)")
        return await super().mark_online(keys)


async def test_the_change_cursor_moves_only_after_the_changes_were_applied(
    autojump_clock: trio.abc.Clock,
) -> None:
    """gw1 first heard at 1 s; the tick at 10 reads it but cannot mark it online:
    the tick at 20 reads it again and reports it online, exactly once."""
    with trio.fail_after(GUARD_S):
        store = _FailsMarkOnlineOnce()
        rig = Rig(store=store)
        async with rig.running():
            await rig.beat_at(1, GW1)
            await trio.sleep_until(15)
            assert rig.sink.brief() == []
            assert store.status(GW1) == "new"
            await trio.sleep_until(25)
            assert store.status(GW1) == "online"
            await rig.beat_at(26, GW1)
            await trio.sleep_until(35)
        assert store.calls["mark_online"] == 2
        assert rig.sink.brief() == [("gw1", "online", wall_at(1))]


async def test_a_takeover_judges_every_gateway_on_its_own_last_seen(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The state is loaded newest first (gw0 was recorded first, and keeps
    sending); gw1 and gw2 fell silent at 1 s. The new leader takes over at 25 s
    and alerts both just after 31 s, not a timeout later."""
    gw0 = ("t1", "gw0")
    with trio.fail_after(GUARD_S):
        rig = Rig()
        rig.store.record(gw0, wall_at(0))
        for key in (gw0, GW1, GW2):
            rig.store.record(key, wall_at(1))
        await trio.sleep_until(2)
        for t in range(2, 25):
            rig.store.record(gw0, wall_at(t + 0.5))
        await trio.sleep_until(25)
        assert [row.key for row in (await rig.store.load()).rows] == [gw0, GW1, GW2]
        async with rig.running():
            for t in range(25, 45):
                await rig.beat_at(t + 0.5, gw0)
            await trio.sleep_until(45)
        # The tick right after the load at 25 plans an early one just after 31.
        assert rig.published() == [
            (31.1, "alert.t1.gw_offline", "gw1"),
            (31.1, "alert.t1.gw_offline", "gw2"),
        ]


# --- bulk transitions -----------------------------------------------------------


class _RacingLeader(FakeStore):
    """Another leader marks `race` offline just before this one's statement."""

    race: Key | None = None

    async def mark_offline_many(self, alerted: Mapping[Key, datetime]) -> dict[Key, datetime]:
        if self.race in alerted:
            assert self.race is not None
            await super().mark_offline_many({self.race: alerted[self.race]})
        return await super().mark_offline_many(alerted)


async def test_a_chunk_is_marked_in_one_statement_and_only_the_winners_report(
    autojump_clock: trio.abc.Clock,
) -> None:
    """gw_c, gw_a, gw_b, gw_d fall silent in that order; gw_d is decommissioned
    while get-status is asked, and another leader marks gw_b offline first. One
    re-read and one transition statement for the chunk; alerts go out in the
    order the gateways became due; the outbox holds one report per transition,
    this leader's in key order."""
    gw_a, gw_b, gw_c, gw_d = (("t1", g) for g in ("a", "b", "c", "d"))
    with trio.fail_after(GUARD_S):
        store = _RacingLeader()
        store.race = gw_b
        # The grace period holds every alert until the slot at 40: all four are
        # due by then (otherwise each would be alerted at its own early tick).
        rig = Rig(store=store, status_delay_s=2, grace_s=40)
        async with rig.running():
            await rig.beat_at(1, gw_c)
            await rig.beat_at(2, gw_a)
            await rig.beat_at(3, gw_b)
            await rig.beat_at(4, gw_d)
            await trio.sleep_until(41)
            await rig.store.decommission(gw_d)
            await trio.sleep_until(45)
            assert sample(rig.metrics, "gateways_offline") == 2
        assert rig.published() == [
            (42, "alert.t1.gw_offline", "c"),
            (42, "alert.t1.gw_offline", "a"),
            (42, "alert.t1.gw_offline", "b"),
        ]
        assert rig.sink.brief()[4:] == [
            ("b", "offline", wall_at(3)),  # the other leader's
            ("a", "offline", wall_at(2)),
            ("c", "offline", wall_at(1)),
        ]
        assert store.bulk_sizes == [
            ("current_last_seen_many", 4),
            ("mark_offline_many", 1),  # the other leader
            ("mark_offline_many", 3),
        ]
        assert rig.tracker.status(*gw_a) == rig.tracker.status(*gw_c) == "offline"


# --- the management API in an outage: the circuit breaker -------------------------


async def _never_answers(payload: bytes) -> bytes:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def test_a_management_api_that_never_answers_costs_one_attempt_then_fails_open(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """50 gateways silent at once, get-status never answers: 32 first attempts
    (the Rig's concurrency) time out at 36.1, the breaker opens at the 10th
    failure, and every candidate is alerted then, without more queries. At the
    next tick with candidates one probe is asked (and times out: open again);
    once the API answers, the probe closes the breaker and every candidate is
    asked again."""
    caplog.set_level(logging.INFO)
    first = [("t1", f"a{i:02d}") for i in range(50)]
    second = [("t1", f"b{i:02d}") for i in range(20)]
    third = [("t1", f"c{i:02d}") for i in range(5)]
    with trio.fail_after(GUARD_S):
        rig = Rig()
        rig.requester.handlers[SUBJECT_GET_STATUS] = _never_answers
        async with rig.running():
            await rig.beat_at(1, *first, *second, *third)
            await rig.beat_at(25, *second, *third)  # due at 55
            await trio.sleep_until(37)
            assert rig.status_query_times() == [31.1] * 32
            assert [t for t, _, _ in rig.published()] == [36.1] * 50
            assert sample(rig.metrics, "lifecycle_breaker_open") == 1
            await rig.beat_at(45.5, *third)  # due at 75.5
            await trio.sleep_until(61)
            # 40, 50: no candidates; 55.1: one probe, 5 s, then the rest fail open.
            assert rig.status_query_times() == [31.1] * 32 + [55.1]
            assert [t for t, _, _ in rig.published()] == [36.1] * 50 + [60.1] * 20
            rig.requester.handlers[SUBJECT_GET_STATUS] = status_handler(rig.states)
            await trio.sleep_until(85)
        assert rig.status_query_times() == [31.1] * 32 + [55.1] + [75.6] * 5
        assert [t for t, _, _ in rig.published()] == [36.1] * 50 + [60.1] * 20 + [75.6] * 5
        assert sample(rig.metrics, "lifecycle_breaker_trips_total") == 1
        assert sample(rig.metrics, "lifecycle_breaker_open") == 0
        assert sample(rig.metrics, "lifecycle_queries_skipped_total") == 50 + 20
        assert sample(rig.metrics, "lifecycle_query_errors_total") == 0
        events = [r.getMessage() for r in caplog.records]
        assert events.count("lifecycle_breaker_opened_failing_open") == 1
        assert events.count("lifecycle_breaker_closed") == 1
        assert "lifecycle_query_failed_alerting_anyway" not in events


async def test_no_responders_opens_the_breaker_after_ten_queries(
    autojump_clock: trio.abc.Clock,
) -> None:
    """get-status fails at once: ten failed attempts, then the breaker is open and
    every candidate is alerted in the same instant (no retry waits)."""
    gateways = [("t1", f"gw{i:03d}") for i in range(100)]
    with trio.fail_after(GUARD_S):
        rig = Rig()
        rig.requester.handlers[SUBJECT_GET_STATUS] = _no_responders
        async with rig.running():
            await rig.beat_at(1, *gateways)
            await trio.sleep_until(45)
        assert rig.status_query_times() == [31.1] * 10
        assert [t for t, _, _ in rig.published()] == [31.1] * 100
        assert sample(rig.metrics, "lifecycle_queries_skipped_total") == 100
