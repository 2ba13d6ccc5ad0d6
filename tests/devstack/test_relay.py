"""devstack.relay on real sockets: forwards, freezes what is open, lets new
connections pass (or blackholes them too), unfreezes, and keeps order under
added latency.

Blocking sockets with timeouts (no Trio needed); a frozen connection is shown
by a receive that times out while a fresh one answers.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from devstack.relay import Relay


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()
    server.close()


def _connect(relay: Relay) -> socket.socket:
    sock = socket.create_connection((relay.host, relay.port), timeout=5)
    sock.settimeout(5)
    return sock


def _roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        got += sock.recv(4096)
    return got


def test_freeze_stops_open_connections_only(echo: tuple[str, int]) -> None:
    with Relay.start(*echo) as relay:
        old = _connect(relay)
        assert _roundtrip(old, b"hello") == b"hello"
        assert relay.freeze_open() == 1
        old.sendall(b"stuck")
        old.settimeout(0.5)
        with pytest.raises(TimeoutError):
            old.recv(10)
        new = _connect(relay)
        assert _roundtrip(new, b"fresh") == b"fresh"  # new connections pass
        relay.unfreeze()
        old.settimeout(5)
        assert old.recv(10) == b"stuck"  # nothing was lost, only held
        old.close()
        new.close()


def test_blackhole_stops_open_and_new_connections(echo: tuple[str, int]) -> None:
    with Relay.start(*echo) as relay:
        old = _connect(relay)
        assert _roundtrip(old, b"hello") == b"hello"
        assert relay.blackhole() == 1
        new = _connect(relay)  # accepted, but no byte passes either way
        for sock in (old, new):
            sock.sendall(b"stuck")
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                sock.recv(10)
        relay.unfreeze()
        for sock in (old, new):
            sock.settimeout(5)
            assert sock.recv(10) == b"stuck"  # held, not lost
            sock.close()
        later = _connect(relay)
        assert _roundtrip(later, b"fresh") == b"fresh"  # over: new ones pass again
        later.close()


def test_latency_keeps_the_bytes_in_order(echo: tuple[str, int]) -> None:
    with Relay.start(*echo) as relay:
        relay.delay_s = 0.02
        sock = _connect(relay)
        payload = bytes(range(256)) * 400
        assert _roundtrip(sock, payload) == payload
        sock.close()


def test_close_ends_every_connection(echo: tuple[str, int]) -> None:
    relay = Relay.start(*echo)
    sock = _connect(relay)
    relay.freeze_open()
    relay.close()
    try:  # closed under the client, even while frozen: EOF or a reset
        data = sock.recv(10)
    except ConnectionResetError:
        data = b""
    assert data == b""
    with pytest.raises(ConnectionRefusedError):
        _connect(relay)
