"""Management-API client: retry schedule, timeouts, cancellation, reply validation.

Rules for this file: everything runs on `autojump_clock` against `FakeRequester`
(no sockets); times are asserted exactly in virtual seconds; every test has a
hang guard (`trio.fail_after`, virtual time).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from notip_trio.errors import MgmtError, NatsRequestError
from notip_trio.mgmt import (
    SUBJECT_GET_STATUS,
    SUBJECT_LIST_CONFIGS,
    SUBJECT_UPDATE_STATUS,
    AlertConfig,
    MgmtClient,
)
from tests.liveness_fakes import WALL0, FakeRequester, status_handler

GUARD_S = 300


def reply(obj: Any) -> Any:
    async def handle(payload: bytes) -> bytes:
        return obj if isinstance(obj, bytes) else json.dumps(obj).encode()

    return handle


async def fail(payload: bytes) -> bytes:
    raise NatsRequestError("no responders")


async def hang(payload: bytes) -> bytes:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def test_retry_schedule_is_1_2_4_seconds(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        requester = FakeRequester({SUBJECT_GET_STATUS: fail})
        client = MgmtClient(requester)
        with pytest.raises(MgmtError, match="4 attempts failed"):
            await client.get_status("t1", "gw1")
        assert requester.times(SUBJECT_GET_STATUS) == [0, 1, 3, 7]
        assert trio.current_time() == 7


async def test_each_attempt_times_out_after_5_seconds(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        requester = FakeRequester({SUBJECT_GET_STATUS: hang})
        with pytest.raises(MgmtError, match="no reply within 5 s"):
            await MgmtClient(requester).get_status("t1", "gw1")
        # 5 s attempt, 1 s wait, 5, 2, 5, 4, 5.
        assert requester.times(SUBJECT_GET_STATUS) == [0, 6, 13, 22]
        assert trio.current_time() == 27


async def test_success_after_failures_stops_retrying(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        calls = 0

        async def flaky(payload: bytes) -> bytes:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise NatsRequestError("connection lost")
            return b'{"gateway_id": "gw1", "state": "paused"}'

        requester = FakeRequester({SUBJECT_GET_STATUS: flaky})
        assert await MgmtClient(requester).get_status("t1", "gw1") == "paused"
        assert requester.times(SUBJECT_GET_STATUS) == [0, 1, 3]


async def test_cancellation_ends_the_retry_wait_at_once(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        requester = FakeRequester({SUBJECT_GET_STATUS: fail})
        with trio.move_on_after(2.5) as scope:
            await MgmtClient(requester).get_status("t1", "gw1")
        assert scope.cancelled_caught  # cancelled, not turned into MgmtError
        assert trio.current_time() == 2.5  # in the middle of the 2 s wait
        assert requester.times(SUBJECT_GET_STATUS) == [0, 1]


async def test_cancellation_ends_an_attempt_at_once(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        requester = FakeRequester({SUBJECT_GET_STATUS: hang})
        with trio.move_on_after(3) as scope:
            await MgmtClient(requester).get_status("t1", "gw1")
        assert scope.cancelled_caught
        assert trio.current_time() == 3


async def test_get_status_request_and_reply(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        requester = FakeRequester({SUBJECT_GET_STATUS: status_handler({("t1", "gw1"): "offline"})})
        assert await MgmtClient(requester).get_status("t1", "gw1") == "offline"
        assert requester.calls == [
            (0, SUBJECT_GET_STATUS, {"gateway_id": "gw1", "tenant_id": "t1"})
        ]


@pytest.mark.parametrize(
    "bad_reply",
    [
        {"state": "online"},  # gateway_id missing
        {"gateway_id": "gw2", "state": "online"},  # another gateway
        {"gateway_id": "gw1", "state": "decommissioned"},  # unknown state
        {"gateway_id": "gw1"},  # state missing
        {"gateway_id": 1, "state": "online"},  # wrong type
        ["gw1", "online"],  # not an object
        b"not json",
    ],
)
async def test_get_status_invalid_reply_is_an_error(
    autojump_clock: trio.abc.Clock, bad_reply: Any
) -> None:
    with trio.fail_after(GUARD_S):
        requester = FakeRequester({SUBJECT_GET_STATUS: reply(bad_reply)})
        with pytest.raises(MgmtError):
            await MgmtClient(requester).get_status("t1", "gw1")
        # An invalid reply is retried like any failed attempt.
        assert requester.times(SUBJECT_GET_STATUS) == [0, 1, 3, 7]


async def test_update_status_request(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        requester = FakeRequester({SUBJECT_UPDATE_STATUS: reply({"success": True})})
        when = WALL0.replace(microsecond=250000)
        await MgmtClient(requester).update_status("gw1", "offline", when)
        assert requester.calls == [
            (
                0,
                SUBJECT_UPDATE_STATUS,
                {
                    "gateway_id": "gw1",
                    "status": "offline",
                    "last_seen_at": "2024-05-01T12:00:00.25Z",
                },
            )
        ]


@pytest.mark.parametrize(
    "bad_reply",
    [{"success": False, "error": "gateway unknown"}, {"success": False}, {}, {"success": "yes"}],
)
async def test_update_status_failure_is_an_error(
    autojump_clock: trio.abc.Clock, bad_reply: Any
) -> None:
    with trio.fail_after(GUARD_S):
        requester = FakeRequester({SUBJECT_UPDATE_STATUS: reply(bad_reply)})
        with pytest.raises(MgmtError):
            await MgmtClient(requester).update_status("gw1", "online", WALL0)
        assert len(requester.calls) == 4


async def test_list_alert_configs(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        entries = [
            {"tenant_id": "t1", "timeout_ms": 20000},
            {"tenant_id": "t1", "gateway_id": "gw1", "timeout_ms": 50000},
            {"tenant_id": "t2", "gateway_id": None, "timeout_ms": 1000},
            {"tenant_id": "t3", "gateway_id": "", "timeout_ms": 2000, "extra": True},
        ]
        requester = FakeRequester({SUBJECT_LIST_CONFIGS: reply(entries)})
        assert await MgmtClient(requester).list_alert_configs() == [
            AlertConfig("t1", 20000),
            AlertConfig("t1", 50000, "gw1"),
            AlertConfig("t2", 1000),
            AlertConfig("t3", 2000),  # "" means tenant-wide
        ]
        assert requester.calls == [(0, SUBJECT_LIST_CONFIGS, None)]


@pytest.mark.parametrize(
    "bad_reply",
    [
        {"tenant_id": "t1", "timeout_ms": 1000},  # not an array
        [{"timeout_ms": 1000}],  # tenant missing
        [{"tenant_id": "t1"}],  # timeout missing
        [{"tenant_id": "t1", "timeout_ms": 0}],  # not positive
        [{"tenant_id": "", "timeout_ms": 1000}],  # empty tenant
        [{"tenant_id": "t1", "timeout_ms": "1000"}],  # wrong type
    ],
)
async def test_list_alert_configs_invalid_reply_is_an_error(
    autojump_clock: trio.abc.Clock, bad_reply: Any
) -> None:
    with trio.fail_after(GUARD_S):
        requester = FakeRequester({SUBJECT_LIST_CONFIGS: reply(bad_reply)})
        with pytest.raises(MgmtError):
            await MgmtClient(requester).list_alert_configs()
