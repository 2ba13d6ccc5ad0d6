"""The observability HTTP server's timeouts, on Trio's virtual clock.

Rules for this file: `autojump_clock` and no sockets at all. The server is the
real `run_http_server`; only `trio.open_tcp_listeners` is replaced (monkeypatch)
by a listener that hands out in-memory streams, so the readiness and request
timeouts run with exact virtual times (tests/test_http.py covers the rest over
real TCP). Every test has a hang guard.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import h11
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from notip_trio import http
from notip_trio.http import run_http_server

GUARD_S = 600


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """Hands the server the far end of each `connect()`ed in-memory stream."""

    def __init__(self) -> None:
        self.socket = SimpleNamespace(getsockname=lambda: ("127.0.0.1", 9090))
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](16)

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        self._receive.close()

    async def connect(self) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        await self._send.send(server)
        return client


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> MemoryListener:
    lst = MemoryListener()

    async def open_listeners(port: int, *, host: str | None = None) -> list[MemoryListener]:
        return [lst]

    monkeypatch.setattr(http.trio, "open_tcp_listeners", open_listeners)
    return lst


async def _serve(
    nursery: trio.Nursery,
    readiness: Callable[[], Awaitable[list[str]]],
    **kwargs: Any,
) -> None:
    await nursery.start(
        lambda task_status: run_http_server(
            "127.0.0.1", 0, CollectorRegistry(), readiness, task_status=task_status, **kwargs
        )
    )


async def _ready() -> list[str]:
    return []


async def _hangs() -> list[str]:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def _read_until_closed(stream: trio.abc.Stream) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and the virtual time it closed."""
    out = b""
    while chunk := await stream.receive_some(65536):
        out += chunk
    return out, trio.current_time()


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


async def _response(stream: trio.abc.Stream) -> tuple[int, bytes, float]:
    """One response: (status, body, virtual time it was complete)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    status, body = 0, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, body, trio.current_time()


async def test_a_hanging_readiness_check_is_not_ready_after_exactly_2_s(
    autojump_clock: trio.abc.Clock, listener: MemoryListener, nursery: trio.Nursery
) -> None:
    with trio.fail_after(GUARD_S):
        await _serve(nursery, _hangs)
        client = await listener.connect()
        await trio.sleep(1)
        await client.send_all(_get("/readyz"))
        assert await _response(client) == (503, b"readiness check timed out\n", 3.0)
        # The connection is still served, at once.
        await client.send_all(_get("/livez"))
        assert await _response(client) == (200, b"ok\n", 3.0)


async def test_the_readiness_timeout_is_the_one_given(
    autojump_clock: trio.abc.Clock, listener: MemoryListener, nursery: trio.Nursery
) -> None:
    with trio.fail_after(GUARD_S):
        await _serve(nursery, _hangs, readiness_timeout=0.25)
        client = await listener.connect()
        await client.send_all(_get("/healthz"))
        assert await _response(client) == (503, b"readiness check timed out\n", 0.25)


async def test_a_request_not_whole_within_10_s_gets_408_and_others_are_served_meanwhile(
    autojump_clock: trio.abc.Clock, listener: MemoryListener, nursery: trio.Nursery
) -> None:
    with trio.fail_after(GUARD_S):
        await _serve(nursery, _ready)
        slow = await listener.connect()
        await slow.send_all(b"GET /livez HTTP/1.1\r\nHo")  # and then nothing
        answers = []
        for t in (1, 5, 9.5):
            await trio.sleep_until(t)
            other = await listener.connect()
            await other.send_all(_get("/readyz"))
            answers.append(await _response(other))
        assert answers == [(200, b"ok\n", 1), (200, b"ok\n", 5), (200, b"ok\n", 9.5)]
        out, closed_at = await _read_until_closed(slow)
    assert out.startswith(b"HTTP/1.1 408 ")
    assert out.endswith(b"request timed out\n")
    # Sent at 10 s with our side of the connection shut (the server then lingers
    # a little, reading, so that the client sees the answer before any reset).
    assert closed_at == 10.0


async def test_an_idle_kept_alive_connection_is_closed_quietly_10_s_after_its_last_answer(
    autojump_clock: trio.abc.Clock, listener: MemoryListener, nursery: trio.Nursery
) -> None:
    with trio.fail_after(GUARD_S):
        await _serve(nursery, _ready)
        client = await listener.connect()
        await trio.sleep(2)
        await client.send_all(_get("/livez"))
        assert await _response(client) == (200, b"ok\n", 2)
        out, closed_at = await _read_until_closed(client)
    assert (out, closed_at) == (b"", 12.0)


async def test_the_request_timeout_is_the_one_given(
    autojump_clock: trio.abc.Clock, listener: MemoryListener, nursery: trio.Nursery
) -> None:
    with trio.fail_after(GUARD_S):
        await _serve(nursery, _ready, request_timeout=0.5)
        idle = await listener.connect()
        out, closed_at = await _read_until_closed(idle)
    assert (out, closed_at) == (b"", 0.5)
