"""A TCP relay for fault tests: 127.0.0.1:<port> → a target, in the test's nursery.

`freeze_replies()` keeps reading what the target sends but holds it (nothing is
dropped, the byte stream stays intact) until `thaw()`: the client sees a
connection that went silent, e.g. a request stored by the server whose answer
never comes. Bytes from the client always go through.

    port = await nursery.start(relay.run)
"""

from __future__ import annotations

import trio


class FreezableRelay:
    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._flowing = trio.Event()
        self._flowing.set()
        self.connections = 0

    def freeze_replies(self) -> None:
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def thaw(self) -> None:
        self._flowing.set()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Relay every connection until cancelled; `started(port)` once listening."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        server = await trio.open_tcp_stream(*self._target)
        async with client, server, trio.open_nursery() as nursery:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream, gated: bool) -> None:
                try:
                    while data := await src.receive_some(65536):
                        if gated:
                            await self._flowing.wait()
                        await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()  # one side gone: close both

            nursery.start_soon(pump, client, server, False)
            nursery.start_soon(pump, server, client, True)
