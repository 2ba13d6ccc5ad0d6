"""The observability HTTP server, over real TCP.

Rules for this file: the server binds 127.0.0.1 port 0 and runs in the test's
own nursery; every test has an absolute hang guard (`trio.fail_after`); no
`autojump_clock` here, because real socket I/O is in flight, and no timing
assertions. The timeouts themselves (readiness, request, idle) are tested with
exact virtual times in tests/test_http_clock.py; here only the one that shows
a 408 reaches a real TCP client.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import h11
import pytest
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter

from notip_trio.http import run_http_server

GUARD_S = 10


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode()


async def _read_reply(conn: h11.Connection, stream: trio.SocketStream) -> Reply:
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return Reply(status, headers, body)
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionResetError("the server closed the connection without an answer")
        else:
            raise AssertionError(f"unexpected event {event!r}")


async def request(
    stream: trio.SocketStream,
    conn: h11.Connection,
    path: str,
    method: str = "GET",
    body: bytes = b"",
) -> Reply:
    headers = [("Host", "127.0.0.1")]
    if body:
        headers.append(("Content-Length", str(len(body))))
    data = conn.send(h11.Request(method=method, target=path, headers=headers)) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
    return await _read_reply(conn, stream)


async def get(port: int, path: str, method: str = "GET", body: bytes = b"") -> Reply:
    """One request on a fresh connection."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        return await request(stream, h11.Connection(h11.CLIENT), path, method, body)


async def raw(port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the server sends until it closes."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(data)
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
        return out


def ready_with(*reasons: str) -> Callable[[], Awaitable[list[str]]]:
    async def readiness() -> list[str]:
        return list(reasons)

    return readiness


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("notip_test_things", "Things counted by the test", registry=reg).inc(3)
    return reg


async def start(
    nursery: trio.Nursery,
    registry: CollectorRegistry,
    readiness: Callable[[], Awaitable[list[str]]] | None = None,
    **kwargs: Any,
) -> int:
    port: int = await nursery.start(
        lambda task_status: run_http_server(
            "127.0.0.1",
            0,
            registry,
            readiness or ready_with(),
            task_status=task_status,
            **kwargs,
        )
    )
    return port


async def test_started_hands_back_a_listening_port(
    nursery: trio.Nursery, registry: CollectorRegistry
) -> None:
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry)
        assert port > 0
        assert (await get(port, "/livez")).status == 200


async def test_metrics(nursery: trio.Nursery, registry: CollectorRegistry) -> None:
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry)
        reply = await get(port, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == CONTENT_TYPE_LATEST
    assert "notip_test_things_total 3.0" in reply.text


async def test_metrics_ignores_query_string(
    nursery: trio.Nursery, registry: CollectorRegistry
) -> None:
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry)
        reply = await get(port, "/metrics?name[]=notip_test_things_total")
    assert reply.status == 200


async def test_livez(nursery: trio.Nursery, registry: CollectorRegistry) -> None:
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry, ready_with("database down"))
        reply = await get(port, "/livez")
    assert (reply.status, reply.text) == (200, "ok\n")


async def test_livez_lists_what_is_stuck(
    nursery: trio.Nursery, registry: CollectorRegistry
) -> None:
    problems = ["ingest: 10 deliveries in hand", "nats: disconnected for 200 s"]
    asked: list[int] = []

    def liveness() -> list[str]:
        asked.append(1)
        return list(problems)

    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry, ready_with(), liveness=liveness)
        reply = await get(port, "/livez")
        problems.clear()
        again = await get(port, "/livez")
    assert reply.status == 503
    assert reply.text.splitlines() == [
        "ingest: 10 deliveries in hand",
        "nats: disconnected for 200 s",
    ]
    assert (again.status, again.text) == (200, "ok\n")
    assert len(asked) == 2  # asked on every request


@pytest.mark.parametrize("path", ["/readyz", "/healthz"])
async def test_ready(nursery: trio.Nursery, registry: CollectorRegistry, path: str) -> None:
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry, ready_with())
        reply = await get(port, path)
    assert (reply.status, reply.text) == (200, "ok\n")


@pytest.mark.parametrize("path", ["/readyz", "/healthz"])
async def test_not_ready_lists_the_reasons(
    nursery: trio.Nursery, registry: CollectorRegistry, path: str
) -> None:
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry, ready_with("database down", "nats disconnected"))
        reply = await get(port, path)
    assert reply.status == 503
    assert reply.text.splitlines() == ["database down", "nats disconnected"]


async def test_readiness_is_asked_on_every_request(
    nursery: trio.Nursery, registry: CollectorRegistry
) -> None:
    reasons: list[str] = ["ingest not running"]

    async def readiness() -> list[str]:
        return list(reasons)

    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry, readiness)
        assert (await get(port, "/readyz")).status == 503
        reasons.clear()
        assert (await get(port, "/readyz")).status == 200


async def test_failing_readiness_is_not_ready(
    nursery: trio.Nursery, registry: CollectorRegistry
) -> None:
    async def fails() -> list[str]:
        raise RuntimeError("pool closed")

    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry, fails)
        reply = await get(port, "/healthz")
    assert reply.status == 503
    assert reply.text == "readiness check failed: RuntimeError: pool closed\n"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD"])
async def test_other_methods_are_405(
    nursery: trio.Nursery, registry: CollectorRegistry, method: str
) -> None:
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry)
        body = b"x=1" if method in ("POST", "PUT") else b""
        reply = await get(port, "/metrics", method, body)
    assert reply.status == 405
    assert reply.headers["allow"] == "GET"


async def test_unknown_path_is_404(nursery: trio.Nursery, registry: CollectorRegistry) -> None:
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry)
        assert (await get(port, "/nope")).status == 404
        assert (await get(port, "/")).status == 404


async def test_keep_alive_serves_several_requests(
    nursery: trio.Nursery, registry: CollectorRegistry
) -> None:
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry)
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            conn = h11.Connection(h11.CLIENT)
            statuses = []
            for path in ("/livez", "/readyz", "/nope", "/metrics"):
                statuses.append((await request(stream, conn, path)).status)
                conn.start_next_cycle()
        assert statuses == [200, 200, 404, 200]


async def test_garbage_is_400_and_the_server_lives_on(
    nursery: trio.Nursery, registry: CollectorRegistry
) -> None:
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry)
        out = await raw(port, b"this is not http\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400 ")
        assert (await get(port, "/livez")).status == 200


async def test_oversized_headers_are_refused(
    nursery: trio.Nursery, registry: CollectorRegistry
) -> None:
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry)
        big = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
        out = await raw(port, big)
        assert out.startswith(b"HTTP/1.1 431 ")
        assert (await get(port, "/livez")).status == 200


async def test_oversized_body_is_413(nursery: trio.Nursery, registry: CollectorRegistry) -> None:
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry)
        body = b"a" * 100_000
        head = b"POST /livez HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        out = await raw(port, head + body)
        assert out.startswith(b"HTTP/1.1 413 ")


async def test_slow_client_does_not_block_others(
    nursery: trio.Nursery, registry: CollectorRegistry
) -> None:
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry, request_timeout=0.5)
        async with await trio.open_tcp_stream("127.0.0.1", port) as slow:
            await slow.send_all(b"GET /livez HTTP/1.1\r\nHo")  # and then nothing
            # others are served while the slow one dawdles
            for _ in range(3):
                assert (await get(port, "/livez")).status == 200
            # the slow one is told off and disconnected once its time is up
            out = b""
            while chunk := await slow.receive_some(65536):
                out += chunk
            assert out.startswith(b"HTTP/1.1 408 ")


async def test_client_vanishing_mid_request_does_not_hurt(
    nursery: trio.Nursery, registry: CollectorRegistry
) -> None:
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry)
        for _ in range(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /metr")
            await trio.aclose_forcefully(stream)
        assert (await get(port, "/livez")).status == 200


async def test_connections_beyond_the_limit_are_closed(
    nursery: trio.Nursery, registry: CollectorRegistry
) -> None:
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry, max_connections=1)
        async with await trio.open_tcp_stream("127.0.0.1", port) as first:
            # a kept-alive connection, known to be served: it holds the only slot
            assert (await request(first, h11.Connection(h11.CLIENT), "/livez")).status == 200
            assert await raw(port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        # Once the first has gone, the slot is free again (when the server has
        # seen it go: until then a connection is still refused).
        while True:
            try:
                reply = await get(port, "/livez")
            except (trio.BrokenResourceError, h11.RemoteProtocolError, ConnectionResetError):
                await trio.sleep(0.05)
                continue
            break
        assert (reply.status, reply.text) == (200, "ok\n")


async def test_cancelling_the_server_stops_it(registry: CollectorRegistry) -> None:
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            port = await start(nursery, registry)
            assert (await get(port, "/livez")).status == 200
            nursery.cancel_scope.cancel()
        with pytest.raises(OSError, match="failed"):
            await trio.open_tcp_stream("127.0.0.1", port)


class _BrokenCollector:
    def collect(self) -> Any:
        raise RuntimeError("collector broke")


async def test_a_failing_collector_is_a_500_not_a_dead_server(nursery: trio.Nursery) -> None:
    registry = CollectorRegistry()
    registry.register(_BrokenCollector())
    with trio.fail_after(GUARD_S):
        port = await start(nursery, registry)
        assert (await get(port, "/metrics")).status == 500
        assert (await get(port, "/livez")).status == 200
