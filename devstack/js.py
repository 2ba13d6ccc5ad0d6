"""Blocking NATS helpers shared by tests, the benchmark and the dev stack.

Each call runs its own plain asyncio loop with its own nats-py client, so call
them from sync code or through `trio.to_thread.run_sync` (never inside a
running loop). They are independent of the daemon's trio-asyncio loop, as a
separate client would be.

- `run_nats(server, fn)`: `await fn(nc)` on a fresh client.
- `create_streams(server, reset=...)`: the platform's streams (`notip_trio.wire.STREAMS`).
- `publish(server, msgs)`: publish-and-wait: returns once the stream holds them.
- `consumer_state` / `stream_count`: from the monitoring endpoint (plain HTTP).
- `stream_messages`: every message of a stream with its headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from devstack._common import DevstackError
from devstack.natsd import NatsServer
from notip_trio.wire import STREAMS

T = TypeVar("T")


def run_nats(
    server: NatsServer,
    fn: Callable[[Any], Awaitable[T]],
    name: str = "test-client",
    *,
    timeout_s: float = 120.0,
) -> T:
    """Run `await fn(nc)` on a fresh nats-py client as `name` (blocking)."""

    async def main() -> T:
        nc = await server.connect(name, allow_reconnect=False)
        try:
            async with asyncio.timeout(timeout_s):
                return await fn(nc)
        finally:
            await nc.close()

    # A plain selector loop: asyncio.run() would ask trio-asyncio's global policy,
    # whose loops in a worker thread slow the daemon's loop to a crawl (docs/pitfalls.md).
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main())


async def acreate_streams(nc: Any, *, reset: bool = False) -> None:
    """asyncio: create each platform stream (file storage), or fix its subjects;
    with `reset`, delete them first (messages and consumers go with them)."""
    from nats.js.errors import NotFoundError

    js = nc.jetstream()
    for name, subjects in STREAMS.items():
        if reset:
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(name)
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            await js.add_stream(name=name, subjects=list(subjects))
            continue
        if tuple(info.config.subjects or ()) != subjects:
            await js.update_stream(name=name, subjects=list(subjects))


def create_streams(server: NatsServer, *, reset: bool = False) -> None:
    """Blocking: the platform's streams on `server`, emptied first if `reset`."""

    async def fn(nc: Any) -> None:
        await acreate_streams(nc, reset=reset)

    run_nats(server, fn, timeout_s=30)


def publish(
    server: NatsServer,
    msgs: Sequence[tuple[str, bytes]],
    stream: str = "TELEMETRY",
    *,
    name: str = "test-client",
    flush_every: int = 1000,
    timeout_s: float = 120.0,
) -> int:
    """Publish (core NATS, flushed), then wait until `stream` holds them all.

    Returns the number published. The stream must take nothing else meanwhile.
    """

    async def fn(nc: Any) -> int:
        js = nc.jetstream()
        before = (await js.stream_info(stream)).state.messages
        for i, (subject, body) in enumerate(msgs):
            await nc.publish(subject, body)
            if i % flush_every == flush_every - 1:
                await nc.flush(timeout=30)
        await nc.flush(timeout=30)
        while (await js.stream_info(stream)).state.messages < before + len(msgs):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return len(msgs)

    try:
        return run_nats(server, fn, name, timeout_s=timeout_s)
    except TimeoutError:
        raise DevstackError(f"{stream} did not take all {len(msgs)} messages") from None


@dataclass(frozen=True, slots=True)
class ConsumerState:
    num_pending: int
    num_ack_pending: int
    num_redelivered: int
    delivered: int  # stream sequence of the last delivery
    ack_floor: int  # stream sequence below which everything is acked

    @property
    def drained(self) -> bool:
        """Nothing left to deliver and nothing awaiting an ack."""
        return self.num_pending == 0 and self.num_ack_pending == 0


def _jsz(server: NatsServer, query: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.monitor_url}/jsz?{query}", timeout=5) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def _stream_details(server: NatsServer, query: str) -> list[dict[str, Any]]:
    return [
        detail
        for account in _jsz(server, query).get("account_details", [])
        for detail in account.get("stream_detail", [])
    ]


def consumer_state(server: NatsServer, stream: str, durable: str) -> ConsumerState:
    """A durable's state from the monitoring endpoint (plain HTTP, no NATS client);
    LookupError while the durable does not exist.

    Cheap for the caller, but not free for the server: with a filtered consumer,
    consumer info on nats-server 2.9 stalled deliveries (BENCHMARKS.md, Findings);
    poll the daemon's own counters or the database first where you can.
    """
    for detail in _stream_details(server, "consumers=true"):
        if detail["name"] != stream:
            continue
        for c in detail.get("consumer_detail", []):
            if c["name"] == durable:
                return ConsumerState(
                    int(c["num_pending"]),
                    int(c["num_ack_pending"]),
                    int(c["num_redelivered"]),
                    int(c["delivered"]["stream_seq"]),
                    int(c["ack_floor"]["stream_seq"]),
                )
    raise LookupError(f"no consumer {durable} on stream {stream}")


def stream_count(server: NatsServer, stream: str) -> int:
    """Messages in `stream`, from the monitoring endpoint (safe while the daemon runs)."""
    for detail in _stream_details(server, "streams=true"):
        if detail["name"] == stream:
            return int(detail["state"]["messages"])
    raise LookupError(f"no stream {stream}")


def stream_messages(
    server: NatsServer, stream: str
) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """Every message in `stream`: (subject, JSON body, headers)."""

    async def fn(nc: Any) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
        js = nc.jetstream()
        state = (await js.stream_info(stream)).state
        out = []
        for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
            msg = await js.get_msg(stream, seq)
            out.append((msg.subject, json.loads(msg.data), dict(msg.headers or {})))
        return out

    return run_nats(server, fn)
