"""pytest plugin: a TCP relay (`devstack.relay.Relay`) in front of a server, to
freeze or slow the connections that cross it (fault tests).

Fixture      scope     yields
make_relay   function  `make(host, port) -> Relay`: a relay to host:port, closed at teardown
pg_relay     function  a Relay in front of the session pg_server
nats_relay   function  `relay_to(server) -> Relay`: a relay in front of a NatsServer, and
                       `nats_url(relay)` is its tls:// URL for NATS_URL
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from devstack.natsd import NatsServer
from devstack.postgres import PgServer
from devstack.relay import Relay

MakeRelay = Callable[[str, int], Relay]


@pytest.fixture
def make_relay() -> Iterator[MakeRelay]:
    relays: list[Relay] = []

    def make(host: str, port: int) -> Relay:
        relay = Relay.start(host, port)
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        relay.close()


@pytest.fixture
def pg_relay(pg_server: PgServer, make_relay: MakeRelay) -> Relay:
    return make_relay(pg_server.host, pg_server.port)


@pytest.fixture
def nats_relay(make_relay: MakeRelay) -> Callable[[NatsServer], Relay]:
    def relay_to(server: NatsServer) -> Relay:
        return make_relay("127.0.0.1", server.port)

    return relay_to


def nats_url(relay: Relay) -> str:
    """The NATS_URL through `relay` (the servers' certificates name 127.0.0.1)."""
    return f"tls://127.0.0.1:{relay.port}"
