"""Blocking NATS helpers for tests: each runs its own asyncio loop, so call them
from sync code or through `trio.to_thread.run_sync` (never inside a running loop).
Independent of the daemon's trio-asyncio loop, as a separate client would be."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from devstack.natsd import NatsServer


def _run(server: NatsServer, fn: Any) -> Any:
    async def main() -> Any:
        nc = await server.connect("test-client", allow_reconnect=False)
        try:
            async with asyncio.timeout(60):
                return await fn(nc)
        finally:
            await nc.close()

    # A plain selector loop: asyncio.run() would ask trio-asyncio's global policy,
    # whose loops in a worker thread slow the daemon's loop to a crawl.
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main())


def publish(
    server: NatsServer, msgs: Sequence[tuple[str, bytes]], stream: str = "TELEMETRY"
) -> None:
    """Publish (core NATS, flushed), then wait until `stream` holds them all."""

    async def fn(nc: Any) -> None:
        js = nc.jetstream()
        before = (await js.stream_info(stream)).state.messages
        for i, (subject, body) in enumerate(msgs):
            await nc.publish(subject, body)
            if i % 1000 == 999:
                await nc.flush()
        await nc.flush()
        while (await js.stream_info(stream)).state.messages < before + len(msgs):  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    _run(server, fn)


@dataclass(frozen=True)
class ConsumerState:
    num_pending: int
    num_ack_pending: int
    num_redelivered: int
    delivered: int
    ack_floor: int


def consumer_state(server: NatsServer, stream: str, durable: str) -> ConsumerState:
    """From the server's monitoring endpoint (plain HTTP, no NATS client).

    Cheap for the test, but not free for the server: with a filtered consumer,
    consumer info on nats-server 2.9 stalled deliveries (BENCHMARKS.md, Findings);
    poll our own counters or the database first where a test can.
    """
    with urllib.request.urlopen(f"{server.monitor_url}/jsz?consumers=true", timeout=5) as r:
        jsz = json.loads(r.read())
    for account in jsz.get("account_details", []):
        for detail in account.get("stream_detail", []):
            if detail["name"] != stream:
                continue
            for c in detail.get("consumer_detail", []):
                if c["name"] == durable:
                    return ConsumerState(
                        c["num_pending"],
                        c["num_ack_pending"],
                        c["num_redelivered"],
                        c["delivered"]["stream_seq"],
                        c["ack_floor"]["stream_seq"],
                    )
    raise LookupError(f"no consumer {durable} on stream {stream}")


def stream_count(server: NatsServer, stream: str) -> int:
    """Messages in `stream`, from the monitoring endpoint (safe while the daemon runs)."""
    with urllib.request.urlopen(f"{server.monitor_url}/jsz?streams=true", timeout=5) as r:
        jsz = json.loads(r.read())
    for account in jsz.get("account_details", []):
        for detail in account.get("stream_detail", []):
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

    result: list[tuple[str, dict[str, Any], dict[str, str]]] = _run(server, fn)
    return result
