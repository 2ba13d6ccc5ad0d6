"""The reconnect of a dead NATS connection aborts its transport (js/bridge.py).

Fakes stand in for nats-py's client and transport: the unit is the choice
between a clean close and an abort. The real thing: tests/test_faults.py.
"""

from __future__ import annotations

from typing import Any

from notip_trio.js.bridge import _abort_dead_transport


class _AsyncioTransport:
    def __init__(self) -> None:
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


class _Writer:
    def __init__(self) -> None:
        self.transport = _AsyncioTransport()


class _NatsTransport:
    def __init__(self) -> None:
        self._io_writer = _Writer()
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


class _Client:
    def __init__(self) -> None:
        self._transport = _NatsTransport()
        self.is_reconnecting = False


def test_close_while_reconnecting_aborts_and_otherwise_closes() -> None:
    nc: Any = _Client()
    transport = nc._transport
    _abort_dead_transport(nc)
    transport.close()
    assert (transport.closed, transport._io_writer.transport.aborted) == (1, 0)
    nc.is_reconnecting = True
    transport.close()
    assert (transport.closed, transport._io_writer.transport.aborted) == (1, 1)


def test_a_client_without_the_expected_insides_is_left_alone() -> None:
    class Other:
        _transport = object()

    nc: Any = Other()
    before = nc._transport
    _abort_dead_transport(nc)
    assert nc._transport is before
