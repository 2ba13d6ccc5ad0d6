"""A TCP relay for fault tests: forwards bytes, and can freeze or slow them.

`Relay.start(host, port)` listens on 127.0.0.1 (a free port) and forwards each
accepted connection to host:port, with plain threads (one reader and one
writer per direction), so it runs beside any event loop.

- `freeze_open()` stops every connection open right now: nothing is read from
  or written to either of its sockets, which stay open (`replies_only=True`
  stops only what the server sends: a request stored whose answer never
  comes). That is what a hung
  proxy, a failover behind NAT or a dropped path looks like from the client:
  its writes are taken by the kernel until the buffers fill, and no byte comes
  back. Connections made later pass normally. `unfreeze()` lets them flow again.
- `blackhole()` freezes every connection open now and every one made later
  (accepted, connected on, and frozen from the first byte): a path that went
  dark for this client altogether. `unfreeze()` ends it.
- `delay_s` adds that much latency to every chunk, each direction (the order
  of bytes is kept; throughput is not limited).
- `close()` closes every socket; the relay is a context manager.

Blocking, thread-safe; from Trio call `start`/`close` through `trio.to_thread`
if you like (they return at once).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType

_CHUNK = 64 * 1024


@dataclass(eq=False)
class _Pipe:
    """One direction of one link: a reader thread queues, a writer thread sends."""

    src: socket.socket
    dst: socket.socket
    link: _Link
    flowing: threading.Event
    queue: deque[tuple[float, bytes]] = field(default_factory=deque)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def read(self) -> None:
        while True:
            self.flowing.wait()
            try:
                data = self.src.recv(_CHUNK)
            except OSError:
                data = b""
            due = time.monotonic() + self.link.relay.delay_s
            with self.cond:
                self.queue.append((due, data))
                self.cond.notify()
            if not data:
                return

    def write(self) -> None:
        try:
            self._write()
        finally:
            self.link.pipe_done()

    def _write(self) -> None:
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                due, data = self.queue.popleft()
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            self.flowing.wait()
            if not data:  # EOF from src: pass it on
                with contextlib.suppress(OSError):
                    self.dst.shutdown(socket.SHUT_WR)
                return
            try:
                self.dst.sendall(data)
            except OSError:
                with contextlib.suppress(OSError):
                    self.src.shutdown(socket.SHUT_RD)
                return


@dataclass(eq=False)
class _Link:
    relay: Relay
    client: socket.socket
    server: socket.socket
    to_server: threading.Event = field(default_factory=threading.Event)
    to_client: threading.Event = field(default_factory=threading.Event)
    _pipes_left: int = 2

    def __post_init__(self) -> None:
        self.to_server.set()
        self.to_client.set()

    def pipe_done(self) -> None:
        with self.relay._lock:
            self._pipes_left -= 1
            if self._pipes_left:
                return
            with contextlib.suppress(ValueError):
                self.relay._links.remove(self)
        self.close()

    def start(self) -> None:
        for src, dst, flowing in (
            (self.client, self.server, self.to_server),
            (self.server, self.client, self.to_client),
        ):
            pipe = _Pipe(src, dst, self, flowing)
            threading.Thread(target=pipe.read, daemon=True, name="relay-read").start()
            threading.Thread(target=pipe.write, daemon=True, name="relay-write").start()

    def close(self) -> None:
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.to_server.set()  # let blocked threads see the closed sockets and end
        self.to_client.set()


@dataclass(eq=False)
class Relay:
    """A running relay to `target`; `host`/`port` is where clients connect."""

    target: tuple[str, int]
    listener: socket.socket
    port: int
    delay_s: float = 0.0
    accepted: int = 0  # connections made through the relay so far
    _links: list[_Link] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _closed: bool = False
    _blackholed: bool = False

    @classmethod
    def start(cls, host: str, port: int) -> Relay:
        listener = socket.create_server(("127.0.0.1", 0))
        relay = cls((host, port), listener, listener.getsockname()[1])
        threading.Thread(target=relay._accept, daemon=True, name="relay-accept").start()
        return relay

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._links)

    def freeze_open(self, *, replies_only: bool = False) -> int:
        """Freeze every connection open now (both ways, or only what the server
        sends); returns how many."""
        with self._lock:
            for link in self._links:
                link.to_client.clear()
                if not replies_only:
                    link.to_server.clear()
            return len(self._links)

    def blackhole(self) -> int:
        """Freeze every connection open now, both ways, and each one made from
        now on; returns how many were open."""
        with self._lock:
            self._blackholed = True
        return self.freeze_open()

    def unfreeze(self) -> None:
        with self._lock:
            self._blackholed = False
            for link in self._links:
                link.to_server.set()
                link.to_client.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            links, self._links = self._links, []
        with contextlib.suppress(OSError):
            self.listener.close()
        for link in links:
            link.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(self, client, server)
            with self._lock:
                if self._closed:
                    link.close()
                    return
                if self._blackholed:
                    link.to_server.clear()
                    link.to_client.clear()
                self._links.append(link)
                self.accepted += 1
            link.start()
