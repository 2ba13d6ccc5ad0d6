"""The observability HTTP server (docs/contract.md Behaviour 7), served inside Trio with h11.

Routes, all GET:

- ``/metrics``: the Prometheus text exposition of the registry.
- ``/livez``: 200 ``ok`` while the daemon makes progress: ``liveness()``
  (synchronous, no I/O: the progress watchdog) returns no problem. Otherwise
  503 with one problem per line. Nothing answers once the task tree is gone.
- ``/readyz`` and ``/healthz`` (kept from the Go service): await ``readiness()``,
  bounded by ``readiness_timeout``. An empty list of reasons means 200 ``ok``;
  otherwise 503 with one reason per line. A readiness check that times out or
  raises is "not ready", never a server error.
- Anything else: 404; any other method on a known path: 405.

Every connection runs in its own task with its own deadlines, so a slow or
stuck client holds nothing but its own socket, and an error in one connection
is logged and never reaches the server. Requests are bounded in size (headers
by h11's incomplete-event limit, bodies by ``_MAX_BODY_BYTES``), and so is the
number of open connections.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .log import get_logger

log = get_logger(__name__)

Readiness = Callable[[], Awaitable[list[str]]]
Liveness = Callable[[], list[str]]


def _always_live() -> list[str]:
    return []


_MAX_HEADER_BYTES = 16 * 1024
_MAX_BODY_BYTES = 16 * 1024
_RECV_BYTES = 16 * 1024
_LINGER_S = 1.0
_LINGER_BYTES = 1024 * 1024
_TEXT = "text/plain; charset=utf-8"
_READY_PATHS = ("/readyz", "/healthz")
_ROUTES = ("/metrics", "/livez", *_READY_PATHS)


class _RequestTooLarge(Exception):
    pass


# What a misbehaving or vanishing client causes: expected, logged at debug.
_CLIENT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError)


async def run_http_server(
    host: str,
    port: int,
    registry: CollectorRegistry,
    readiness: Readiness,
    *,
    liveness: Liveness = _always_live,
    readiness_timeout: float = 2.0,
    request_timeout: float = 10.0,
    max_connections: int = 64,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the observability endpoints on ``host:port``; never returns unless cancelled.

    ``host`` "" or "0.0.0.0" listens on every IPv4 address ("" also IPv6);
    ``port`` 0 picks a free port. ``task_status.started()`` hands back the
    bound port once the socket listens (with port 0 and several addresses,
    the first listener's port).

    ``request_timeout`` bounds, per request, the wait for the whole request
    (including idle time on a kept-alive connection) and, separately, the
    sending of the response. Connections beyond ``max_connections`` are
    closed at once.
    """
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    bound_port: int = listeners[0].socket.getsockname()[1]
    limiter = trio.CapacityLimiter(max_connections)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            log.warning("http_connection_refused", reason="too many connections")
            return  # serve_listeners closes the stream
        # One connection's trouble (a reset, a protocol error, a bug) must not
        # take the server down with it.
        try:
            await _serve_connection(
                stream, registry, readiness, liveness, readiness_timeout, request_timeout
            )
        except _CLIENT_ERRORS as exc:
            log.debug("http_connection_error", error=f"{type(exc).__name__}: {exc}")
        except Exception:
            log.error("http_connection_failed", exc_info=True)
        finally:
            limiter.release()

    log.info("http_server_listening", host=host or "*", port=bound_port)
    task_status.started(bound_port)
    await trio.serve_listeners(handler, listeners)


async def _serve_connection(
    stream: trio.SocketStream,
    registry: CollectorRegistry,
    readiness: Readiness,
    liveness: Liveness,
    readiness_timeout: float,
    request_timeout: float,
) -> None:
    """Answer requests on one connection (keep-alive) until either side closes."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
    while True:
        status, body, headers = 0, b"", [("Content-Type", _TEXT)]
        head = False
        close = False  # after a request we could not read whole, start afresh
        with trio.move_on_after(request_timeout) as scope:
            try:
                request = await _read_request(conn, stream)
            except h11.RemoteProtocolError as exc:
                status, body, close = exc.error_status_hint, f"{exc}\n".encode(), True
            except _RequestTooLarge:
                status, body, close = 413, b"request body too large\n", True
            else:
                if request is None:
                    return  # the client closed between requests
                head = request.method == b"HEAD"
                try:
                    status, body, headers = await _route(
                        request, registry, readiness, liveness, readiness_timeout
                    )
                except Exception:  # e.g. a collector that raises: a 500, not a dead server
                    log.error(
                        "http_request_failed",
                        target=request.target.decode("ascii", "replace"),
                        exc_info=True,
                    )
                    status, body = 500, b"internal server error\n"
        if scope.cancelled_caught:
            started = conn.their_state is not h11.IDLE or bool(conn.trailing_data[0])
            if not started:
                return  # an idle kept-alive connection: just close it
            status, body, close = 408, b"request timed out\n", True
        if close:
            headers.append(("Connection", "close"))
        sent = False
        with trio.move_on_after(request_timeout):  # a client that does not read
            sent = await _send_response(conn, stream, status, headers, body, head=head)
        if not sent:
            return
        if close:
            await _linger(stream)
            return
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """Read one request and its (bounded, discarded) body; None if the client closed first."""
    request: h11.Request | None = None
    body_bytes = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(_RECV_BYTES))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body_bytes += len(event.data)
            if body_bytes > _MAX_BODY_BYTES:
                raise _RequestTooLarge
        elif isinstance(event, h11.EndOfMessage):
            return request
        else:  # ConnectionClosed, or PAUSED (never before EndOfMessage)
            return None


async def _route(
    request: h11.Request,
    registry: CollectorRegistry,
    readiness: Readiness,
    liveness: Liveness,
    readiness_timeout: float,
) -> tuple[int, bytes, list[tuple[str, str]]]:
    path = request.target.decode("ascii", "replace").split("?", 1)[0]
    text = [("Content-Type", _TEXT)]
    if path not in _ROUTES:
        return 404, b"not found\n", text
    if request.method != b"GET":
        return 405, b"method not allowed\n", [*text, ("Allow", "GET")]
    if path == "/metrics":
        return 200, generate_latest(registry), [("Content-Type", CONTENT_TYPE_LATEST)]
    if path == "/livez":
        if problems := liveness():
            log.warning("livez_failing", problems=problems)
            return 503, "".join(f"{problem}\n" for problem in problems).encode(), text
        return 200, b"ok\n", text
    reasons = ["readiness check timed out"]
    with trio.move_on_after(readiness_timeout):
        reasons = await _readiness_reasons(readiness)
    if not reasons:
        return 200, b"ok\n", text
    return 503, "".join(f"{reason}\n" for reason in reasons).encode(), text


async def _readiness_reasons(readiness: Readiness) -> list[str]:
    """The reasons the daemon is not ready; a failing check is a reason too."""
    try:
        return list(await readiness())
    except Exception as exc:
        return [f"readiness check failed: {type(exc).__name__}: {exc}"]


async def _send_response(
    conn: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    head: bool = False,
) -> bool:
    """Send one complete response; False when h11 cannot answer in this state.

    The answer to HEAD carries the headers of the GET but no body.
    """
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return False  # e.g. after a protocol error in the middle of a body
    headers = [*headers, ("Content-Length", str(len(body)))]
    parts = (
        conn.send(h11.Response(status_code=status, headers=headers)),
        None if head else conn.send(h11.Data(data=body)),
        conn.send(h11.EndOfMessage()),
    )
    await stream.send_all(b"".join(part for part in parts if part))
    return True


async def _linger(stream: trio.SocketStream) -> None:
    """Close gracefully after an error response sent before the request was read whole.

    Closing with unread input makes the kernel reset the connection, and the
    client may then lose the response we just sent: so half-close our side and
    read (a bounded amount, for a bounded time) until the client closes too.
    """
    with trio.move_on_after(_LINGER_S):
        await stream.send_eof()
        drained = 0
        while drained < _LINGER_BYTES and (data := await stream.receive_some(_RECV_BYTES)):
            drained += len(data)
