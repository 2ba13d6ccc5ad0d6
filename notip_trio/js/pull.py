"""The pull engine: `spec.depth` pull requests outstanding, each batch handed on whole.

Each pull slot lives in asyncio land (`_PullSlot`), one loop per slot on the
Trio side (`_pull_loop`); a delivered batch crosses the asyncio bridge once.
`NatsBridge.run_pull` (bridge.py) runs it on the bridge's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import nats.errors
import trio
import trio_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from ..log import get_logger
from .delivery import Delivery, JsMsg
from .specs import PullSpec

log = get_logger(__name__)
R = TypeVar("R")


def aio(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Run an asyncio coroutine function from Trio: one bridge crossing per call."""
    return trio_asyncio.aio_as_trio(fn)  # type: ignore[no-any-return]


class PullHost(Protocol):
    """What the pull engine needs of the bridge: its connection and a bulk NAK."""

    @property
    def nc(self) -> NatsClient: ...

    @property
    def connected(self) -> bool: ...

    async def nak(self, msgs: Sequence[JsMsg], delay_s: float | None = None) -> None: ...


async def run_pull(
    host: PullHost,
    spec: PullSpec,
    out: trio.MemorySendChannel[list[JsMsg]],
    *,
    observe_pending: Callable[[int], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep `spec.depth` pull requests outstanding; send each non-empty batch to `out`.

    After every pull, `observe_pending` (if given) learns the consumer's lag:
    the pending count of the batch's last delivery, or 0 for a pull that
    expired empty. Never returns unless cancelled or `out` is closed by its
    receiver. Each delivered batch crosses the asyncio bridge once.
    """
    slots = [_PullSlot(host.nc, spec, i) for i in range(spec.depth)]
    for slot in slots:
        await aio(slot.subscribe)()
    async with out:
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                for slot in slots:
                    nursery.start_soon(_pull_loop, host, slot, out.clone(), observe_pending)
        finally:
            # Deliveries still in a slot were never handed over: give them back
            # at once (NAK) instead of leaving them to ack_wait (30 s). Every
            # slot stops receiving first, or a NAK'd message could be redelivered
            # straight into a sibling slot's open request.
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                leftovers: list[JsMsg] = []
                for slot in slots:
                    leftovers += await aio(slot.close)()
                if leftovers:
                    await host.nak(leftovers)
                    log.info("pull_leftovers_returned", stream=spec.stream, count=len(leftovers))


async def _pull_loop(
    host: PullHost,
    slot: _PullSlot,
    out: trio.MemorySendChannel[list[JsMsg]],
    observe_pending: Callable[[int], None] | None,
) -> None:
    policy = slot.policy
    async with out:
        fetch = aio(slot.fetch)
        while True:
            if not host.connected:
                await trio.sleep(0.2)
                continue
            size = policy.size
            batch, elapsed_s = await fetch(size)
            pending = 0
            if batch:
                last = Delivery.from_reply(batch[-1][2])
                pending = last.pending if last is not None else 0
            if observe_pending is not None:
                observe_pending(pending)
            policy.observe(requested=size, got=len(batch), elapsed_s=elapsed_s, pending=pending)
            if batch:
                try:
                    await out.send(batch)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    slot.give_back(batch)
                    return
                except trio.Cancelled:
                    slot.give_back(batch)  # NAK'd with the leftovers at close
                    raise


# How long after its expiry a pull request is given up on when its 408 does not
# come. nats-server 2.9.10 drops about 2 % of expiring requests silently: their
# messages arrive, the 408 never does (measured at 500 msgs/s: 7 of 291 requests,
# each holding ~50 messages; benchmarks/lightprobe.py). Waiting 0.5 s for it was
# the light-load p99 of 600-700 ms. Deliveries that come after this margin are not
# lost: they go out with the slot's next batch.
EXPIRY_MARGIN_S = 0.03


class _PullSlot:
    """One pull request at a time on its own inbox. Lives in asyncio land.

    Deliveries go to `_msgs` from the subscription callback; a request ends when
    the wanted number of new messages arrived, a status message (408 expired,
    409, 404) for the current inbox arrived, or the request's expiry passed by
    EXPIRY_MARGIN_S (the server sometimes sends no 408, and a request lost in a
    reconnect gets none). Messages that arrive late stay in `_msgs` and go out
    with the next batch, so no delivery is dropped on the floor.
    """

    def __init__(self, nc: NatsClient, spec: PullSpec, index: int) -> None:
        self._nc = nc
        self._spec = spec
        self.policy = spec.policy()
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}"
        self._prefix = f"_INBOX.notip.{uuid.uuid4().hex}.{index}"
        self._seq = 0
        self._inbox = ""
        self._msgs: list[JsMsg] = []
        self._want = 0
        self._done: asyncio.Future[None] | None = None
        self._sub: Any = None
        self._expires_ns = int(spec.expires_s * 1e9)

    async def subscribe(self) -> None:
        self._sub = await self._nc.subscribe(
            self._prefix + ".*", cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )

    def give_back(self, msgs: list[JsMsg]) -> None:
        """Return a batch that could not be handed over; `close` will hand it back."""
        self._msgs[:0] = msgs

    async def close(self) -> list[JsMsg]:
        """Stop receiving; return the deliveries not handed over yet."""
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
        self._finish()
        msgs, self._msgs = self._msgs, []
        return msgs

    async def _on_msg(self, msg: Msg) -> None:
        reply = msg.reply
        if reply:
            msgs = self._msgs
            msgs.append(JsMsg(msg.subject, msg.data, reply))
            if len(msgs) >= self._want:
                self._finish()
            return
        # A status message: 408 expired, 404/409, 100 heartbeat.
        status = msg.headers.get("Status") if msg.headers else None
        if status != "100" and msg.subject == self._inbox:
            self._finish()

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def fetch(self, size: int) -> tuple[list[JsMsg], float]:
        """One pull request for `size` messages; its batch and how long it took."""
        loop = asyncio.get_running_loop()
        self._seq += 1
        self._inbox = f"{self._prefix}.{self._seq}"
        self._want = len(self._msgs) + size
        self._done = loop.create_future()
        started = loop.time()
        request = b'{"batch":%d,"expires":%d}' % (size, self._expires_ns)
        await self._nc.publish(self._api, request, reply=self._inbox)
        try:
            await asyncio.wait_for(
                asyncio.shield(self._done), self._spec.expires_s + EXPIRY_MARGIN_S
            )
        except TimeoutError:
            pass
        finally:
            self._done = None
        msgs, self._msgs = self._msgs, []
        return msgs, loop.time() - started
