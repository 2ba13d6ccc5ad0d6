"""The management-API stand-in: its replies, and `MgmtClient` against it over real NATS.

Rules for this file: the pure reply logic is tested without NATS; the
integration test uses the session `nats_server` (mTLS) through `aio_loop`,
real time, with an absolute hang guard.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio_asyncio

from devstack.mgmt_standin import MgmtStandin, main
from devstack.natsd import NatsServer
from notip_trio.errors import MgmtError, NatsRequestError
from notip_trio.mgmt import (
    SUBJECT_GET_STATUS,
    SUBJECT_LIST_CONFIGS,
    SUBJECT_UPDATE_STATUS,
    AlertConfig,
    MgmtClient,
)
from tests.liveness_fakes import WALL0

HANG_GUARD_S = 30


def _req(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_replies_follow_the_state() -> None:
    standin = MgmtStandin(
        configs=[{"tenant_id": "t1", "timeout_ms": 5000}],
        paused={("t1", "gwP")},
        states={("t1", "gwX"): "provisioning"},
        fail_updates={"gwF"},
    )
    assert standin.reply_for(SUBJECT_LIST_CONFIGS, b"") == standin.configs

    def state(gateway: str) -> str:
        reply = standin.reply_for(
            SUBJECT_GET_STATUS, _req({"gateway_id": gateway, "tenant_id": "t1"})
        )
        assert reply["gateway_id"] == gateway
        return str(reply["state"])

    assert [state("gw1"), state("gwP"), state("gwX")] == ["online", "paused", "provisioning"]
    update = {"gateway_id": "gw1", "status": "offline", "last_seen_at": "2024-05-01T12:00:00Z"}
    assert standin.reply_for(SUBJECT_UPDATE_STATUS, _req(update)) == {"success": True}
    assert state("gw1") == "offline"  # follows what was reported
    assert standin.reported_status("gw1") == "offline"
    failed = standin.reply_for(
        SUBJECT_UPDATE_STATUS,
        _req({"gateway_id": "gwF", "status": "online", "last_seen_at": "x"}),
    )
    assert failed["success"] is False
    assert [u["gateway_id"] for u in standin.updates] == ["gw1", "gwF"]


def test_invalid_status_replies_and_the_record_file(tmp_path: Any) -> None:
    record = tmp_path / "requests.jsonl"
    standin = MgmtStandin(invalid_status={("t1", "gwI")}, record=record)
    asked = {"gateway_id": "gwI", "tenant_id": "t1"}
    reply = standin.reply_for(SUBJECT_GET_STATUS, _req(asked))
    assert reply["state"] not in ("online", "offline", "paused", "provisioning")
    update = {"gateway_id": "gwI", "status": "offline", "last_seen_at": "2024-05-01T12:00:00Z"}
    standin.reply_for(SUBJECT_UPDATE_STATUS, _req(update))
    standin.reply_for(SUBJECT_LIST_CONFIGS, b"")  # not recorded
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert lines == [
        {"subject": SUBJECT_GET_STATUS, "request": asked},
        {"subject": SUBJECT_UPDATE_STATUS, "request": update},
    ]


def test_cli_rejects_bad_arguments(capsys: Any) -> None:
    with pytest.raises(SystemExit) as info:
        main(
            [
                "--url",
                "tls://127.0.0.1:1",
                "--ca",
                "a",
                "--cert",
                "b",
                "--key",
                "c",
                "--paused",
                "nope",
            ]
        )
    assert info.value.code == 2
    assert "tenant/gateway" in capsys.readouterr().err


class _AioRequester:
    """A minimal `Requester` over a nats-py client, for this test only."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc

    async def request(self, subject: str, payload: bytes) -> bytes:
        import nats.errors

        try:
            msg = await trio_asyncio.aio_as_trio(self._nc.request)(subject, payload, timeout=60)
        except nats.errors.Error as exc:
            raise NatsRequestError(str(exc)) from None
        return bytes(msg.data)


async def test_mgmt_client_against_the_standin(
    nats_server: NatsServer, aio_loop: trio_asyncio.TrioEventLoop
) -> None:
    with trio.fail_after(HANG_GUARD_S):
        standin = MgmtStandin(
            configs=[
                {"tenant_id": "t1", "timeout_ms": 5000},
                {"tenant_id": "t1", "gateway_id": "gw1", "timeout_ms": 9000},
            ],
            paused={("t1", "gwP")},
            fail_updates={"gwF"},
            delay_s=1.0,
        )
        server_nc = await trio_asyncio.aio_as_trio(nats_server.connect)("test-client")
        client_nc = await trio_asyncio.aio_as_trio(nats_server.connect)("test-client")
        try:
            await trio_asyncio.aio_as_trio(standin.start)(server_nc)
            client = MgmtClient(_AioRequester(client_nc), retry_delays_s=(0.1,))
            assert await client.list_alert_configs() == [
                AlertConfig("t1", 5000),
                AlertConfig("t1", 9000, "gw1"),
            ]
            # Concurrent requests are answered concurrently despite the delay:
            # at one moment all five wait in the stand-in for their answers.
            states: dict[str, str] = {}
            in_flight: list[int] = []
            async with trio.open_nursery() as nursery:
                for gw in ("gw1", "gwP", "gw2", "gw3", "gw4"):

                    async def ask(gw: str = gw) -> None:
                        states[gw] = await client.get_status("t1", gw)

                    nursery.start_soon(ask)
                while len(states) < 5:
                    in_flight.append(len(standin._tasks))
                    await trio.sleep(0.01)
            assert max(in_flight) == 5
            assert states == {
                "gw1": "online",
                "gwP": "paused",
                "gw2": "online",
                "gw3": "online",
                "gw4": "online",
            }
            await client.update_status("gw1", "offline", WALL0)
            assert await client.get_status("t1", "gw1") == "offline"
            with pytest.raises(MgmtError, match="success=false"):
                await client.update_status("gwF", "online", WALL0)
            assert standin.updates[0] == {
                "gateway_id": "gw1",
                "status": "offline",
                "last_seen_at": "2024-05-01T12:00:00Z",
            }
            assert [u["gateway_id"] for u in standin.updates] == ["gw1", "gwF", "gwF"]
        finally:
            await trio_asyncio.aio_as_trio(standin.stop)()
            await trio_asyncio.aio_as_trio(client_nc.close)()
            await trio_asyncio.aio_as_trio(server_nc.close)()
