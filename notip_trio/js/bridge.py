"""`NatsBridge`: one nats-py connection (inside trio-asyncio) and what the daemon does on it.

Connect with mutual TLS, stream and consumer admin, core-NATS request-reply,
JetStream publish, bulk ack/nak/term, and the pull engine (pull.py) on this
connection. The rest of the daemon sees it through small Protocols:

- `Acker`: acks, naks or terminates delivered messages in bulk; `NatsBridge.run_pull`
  feeds batches of `JsMsg` into a channel, and the consumer of that channel
  settles them through an `Acker` (the bridge).
- `Requester`: core-NATS request-reply, one attempt, no timeout of its own
  (callers put a `trio.fail_after` scope around it).
- `AlertPublisher`: JetStream publish that returns only after the PubAck.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

import nats
import nats.errors
import nats.js.errors
import trio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ..config import Settings
from ..errors import NatsRequestError, StartupError
from ..log import get_logger
from ..metrics import Metrics
from .delivery import JsMsg
from .pull import aio, run_pull
from .specs import PullSpec, durable_problems

log = get_logger(__name__)

# The server's answer to a request nobody subscribes to: a status-only message.
_STATUS_HEADER = "Status"
_NO_RESPONDERS = "503"
FLUSH_TIMEOUT_S: Final = 10.0


class Acker(Protocol):
    """Settles deliveries in bulk: one bridge crossing per call, never per message."""

    async def ack(self, msgs: Sequence[JsMsg]) -> None: ...

    async def nak(self, msgs: Sequence[JsMsg], delay_s: float | None = None) -> None: ...

    async def term(self, msgs: Sequence[JsMsg]) -> None: ...


class Requester(Protocol):
    async def request(self, subject: str, payload: bytes) -> bytes:
        """One core-NATS request; waits for the reply until cancelled.

        Raises `NatsRequestError` when there are no responders or the
        connection fails.
        """
        ...


class AlertPublisher(Protocol):
    async def publish(self, subject: str, payload: bytes, *, msg_id: str) -> None:
        """Publish to JetStream; return once the PubAck arrives, raise otherwise.

        `msg_id` goes into the `Nats-Msg-Id` header for server-side dedup.
        """
        ...


def tls_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """The client side of mutual TLS: trust `ca`, present `cert` with `key`.

    Raises StartupError naming the file problem (unreadable, not PEM, key not
    matching the certificate).
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"NATS_TLS_CA {ca}: {type(exc).__name__}: {exc}") from None
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(
            f"NATS_TLS_CERT/NATS_TLS_KEY {cert}, {key}: {type(exc).__name__}: {exc}"
        ) from None
    return ctx


def _abort_dead_transport(nc: NatsClient) -> None:
    """Let a reconnect drop a dead connection at once.

    nats-py (2.16) closes the old transport before reconnecting and waits until it
    is closed; on TLS that is an SSL shutdown which, when the server stopped
    answering, waits out asyncio's 30 s shutdown timeout: measured here, a stale
    connection found after 10-15 s reconnected after 44 s (nats-io/nats.py#671).
    While reconnecting, nothing unsent on the dead connection can arrive
    anyway, so abort it; a normal close still flushes and shuts down cleanly.
    The transport object lives for the whole client (each reconnect reuses it).
    """
    transport: Any = getattr(nc, "_transport", None)
    if transport is None or not hasattr(transport, "_io_writer"):
        return  # a nats-py that changed inside: keep its own close
    close = transport.close

    def close_or_abort() -> Any:
        writer = transport._io_writer
        if nc.is_reconnecting and writer is not None:
            writer.transport.abort()
            return None
        return close()

    transport.close = close_or_abort


class NatsBridge:
    """One nats-py connection and the operations the daemon needs on it."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        # Request-reply: one wildcard subscription, one future per request in flight.
        self._reply_prefix: str | None = None
        self._reply_sub_lock = asyncio.Lock()
        self._reply_seq = itertools.count()
        self._replies: dict[str, asyncio.Future[Msg]] = {}

    # ---- connection ------------------------------------------------------

    @classmethod
    async def from_settings(
        cls,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        name: str = "notip-trio",
        retry: bool = True,
    ) -> NatsBridge:
        """`connect` with the daemon's NATS settings (URL, mTLS files, timeouts)."""
        return await cls.connect(
            settings.nats_url,
            ca=str(settings.nats_tls_ca),
            cert=str(settings.nats_tls_cert),
            key=str(settings.nats_tls_key),
            connect_timeout_s=settings.nats_connect_timeout_s,
            ping_interval_s=settings.nats_ping_interval_s,
            max_outstanding_pings=settings.nats_max_outstanding_pings,
            metrics=metrics,
            name=name,
            retry=retry,
        )

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        ca: str,
        cert: str,
        key: str,
        connect_timeout_s: float,
        ping_interval_s: int = 5,
        max_outstanding_pings: int = 2,
        metrics: Metrics | None = None,
        name: str = "notip-trio",
        retry: bool = True,
    ) -> NatsBridge:
        """Connect with mutual TLS; raise StartupError naming the cause.

        `retry=False` (the preflight) gives up at the first TLS or protocol
        error instead of trying again until `connect_timeout_s`; unreachable
        servers are still retried until then. Either way the StartupError of a
        timeout names the last error seen. Once connected it reconnects for
        ever: a server that stops answering is noticed when
        `max_outstanding_pings` pings in a row got no pong, within
        (max_outstanding_pings + 1) x ping_interval_s; then nats-py reconnects.
        """
        ctx = tls_context(ca, cert, key)
        last_error = ""

        async def on_error(exc: Exception) -> None:
            nonlocal last_error
            last_error = f"{type(exc).__name__}: {exc}"
            log.warning("nats_error", error=last_error)

        async def on_disconnected() -> None:
            log.warning("nats_disconnected")

        async def on_reconnected() -> None:
            if metrics is not None:
                metrics.nats_reconnects.inc()
            log.info("nats_reconnected")

        async def _connect() -> NatsClient:
            nc = NatsClient()
            await nc.connect(
                servers=[url],
                tls=ctx,
                connect_timeout=int(max(1, connect_timeout_s)),
                allow_reconnect=retry,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                ping_interval=ping_interval_s,
                max_outstanding_pings=max_outstanding_pings,
                # A publish that overflows the pending buffer waits for a flush;
                # on a dead connection that wait ends here (or at the reconnect).
                flush_timeout=FLUSH_TIMEOUT_S,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                name=name,
            )
            return nc

        try:
            with trio.fail_after(connect_timeout_s + 1):
                nc = await aio(_connect)()
                _abort_dead_transport(nc)
        except trio.TooSlowError:
            last = f" (last error: {last_error})" if last_error else ""
            raise StartupError(
                f"NATS: no connection to {url} within {connect_timeout_s:g}s{last}"
            ) from None
        except (OSError, nats.errors.Error, ssl.SSLError) as exc:
            raise StartupError(
                f"NATS: cannot connect to {url}: {type(exc).__name__}: {exc}"
            ) from None
        return cls(nc)

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def close(self) -> None:
        async def _close() -> None:
            with contextlib.suppress(Exception):  # flushing is best effort on the way out
                await self.nc.flush(timeout=2)
            await self.nc.close()

        await aio(_close)()

    # ---- JetStream management -------------------------------------------

    async def stream_subjects(self, name: str) -> list[str] | None:
        """The subjects of stream `name`, or None if it does not exist."""

        async def _info() -> list[str] | None:
            try:
                info = await self.js.stream_info(name)
            except nats.js.errors.NotFoundError:
                return None
            return list(info.config.subjects or [])

        return await aio(_info)()

    async def durable_config(self, stream: str, durable: str) -> ConsumerConfig | None:
        """The configuration of durable consumer `durable`, or None if it does not exist."""

        async def _info() -> ConsumerConfig | None:
            try:
                info = await self.js.consumer_info(stream, durable)
            except nats.js.errors.NotFoundError:
                return None
            cfg: ConsumerConfig = info.config
            return cfg

        return await aio(_info)()

    async def require_streams(self, names: Sequence[str]) -> None:
        for name in names:
            if await self.stream_subjects(name) is None:
                raise StartupError(
                    f"JetStream stream {name} does not exist; the platform must create it"
                )

    async def ensure_pull_consumer(self, spec: PullSpec) -> None:
        """Create the durable pull consumer, or check that the existing one is usable.

        Refuses (StartupError) a durable the daemon cannot use; logs a warning
        for one it can use, but badly (`durable_problems`).
        """
        cfg = await self.durable_config(spec.stream, spec.durable)
        if cfg is None:
            await self._create_pull_consumer(spec)
            return
        subjects = await self.stream_subjects(spec.stream) if cfg.filter_subject else []
        problems = durable_problems(
            cfg,
            subjects or [],
            stream=spec.stream,
            durable=spec.durable,
            max_ack_pending=spec.max_ack_pending,
        )
        for problem in problems:
            if problem.refused:
                raise StartupError(problem.message)
        for problem in problems:
            log.warning(problem.event, **problem.context)

    async def _create_pull_consumer(self, spec: PullSpec) -> None:
        async def _create() -> bool:
            # A filter equal to the stream's own subjects selects nothing less, but
            # nats-server 2.9 then counts pending messages the slow way on every
            # delivery and consumer-info call: measured, deliveries stalled to a
            # trickle while a backlog drained. So leave such a filter out.
            stream = await self.js.stream_info(spec.stream)
            redundant = list(stream.config.subjects or []) == [spec.filter_subject]
            await self.js.add_consumer(
                spec.stream,
                config=ConsumerConfig(
                    durable_name=spec.durable,
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    filter_subject=None if redundant else spec.filter_subject,
                    max_ack_pending=spec.max_ack_pending,
                    ack_wait=30.0,
                    max_waiting=512,
                ),
            )
            return redundant

        redundant = await aio(_create)()
        log.info(
            "consumer_created",
            stream=spec.stream,
            durable=spec.durable,
            filter_subject=None if redundant else spec.filter_subject,
        )

    # ---- Requester / AlertPublisher -------------------------------------

    async def request(self, subject: str, payload: bytes) -> bytes:
        """One request on the bridge's own reply subscription; no timer of its own.

        nats-py's `nc.request` waits with `asyncio.wait_for`, whose timer handle
        trio-asyncio keeps in its heap until it is due even when cancelled: with a
        long backstop every request held a handle (and a copied context) for that
        long. Here the wait is a bare future; the caller's Trio scope is the only
        deadline, and the future leaves the table when the call ends either way.
        """

        async def _request() -> bytes:
            inbox = await self._reply_inbox()
            reply: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
            self._replies[inbox] = reply
            try:
                await self.nc.publish(subject, payload, reply=inbox)
                msg = await reply
            finally:
                del self._replies[inbox]
            if msg.headers and msg.headers.get(_STATUS_HEADER) == _NO_RESPONDERS:
                raise nats.errors.NoRespondersError
            return bytes(msg.data)

        try:
            return await aio(_request)()
        except (nats.errors.Error, OSError) as exc:
            raise NatsRequestError(f"{subject}: {type(exc).__name__}: {exc}") from None

    async def _reply_inbox(self) -> str:
        """A fresh reply subject under the one wildcard reply subscription (asyncio side)."""
        async with self._reply_sub_lock:
            if self._reply_prefix is None:
                prefix = self.nc.new_inbox()
                await self.nc.subscribe(prefix + ".*", cb=self._on_reply)
                self._reply_prefix = prefix
        return f"{self._reply_prefix}.{next(self._reply_seq)}"

    async def _on_reply(self, msg: Msg) -> None:
        # A reply for a request that already ended (cancelled) finds no future: dropped.
        reply = self._replies.get(msg.subject)
        if reply is not None and not reply.done():
            reply.set_result(msg)

    async def publish(self, subject: str, payload: bytes, *, msg_id: str) -> None:
        async def _publish() -> None:
            await self.js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})

        try:
            await aio(_publish)()
        except (nats.errors.Error, OSError) as exc:
            raise NatsRequestError(f"{subject}: {type(exc).__name__}: {exc}") from None

    # ---- acks --------------------------------------------------------------

    async def ack(self, msgs: Sequence[JsMsg]) -> None:
        await self._reply_all(msgs, b"+ACK")

    async def term(self, msgs: Sequence[JsMsg]) -> None:
        await self._reply_all(msgs, b"+TERM")

    async def nak(self, msgs: Sequence[JsMsg], delay_s: float | None = None) -> None:
        body = b"-NAK"
        if delay_s is not None:
            body += b" " + json.dumps({"delay": int(delay_s * 1e9)}).encode()
        await self._reply_all(msgs, body)

    async def _reply_all(self, msgs: Sequence[JsMsg], body: bytes) -> None:
        if not msgs:
            return
        replies = [m.reply for m in msgs]

        async def _send() -> None:
            publish = self.nc.publish
            for reply in replies:
                await publish(reply, body)

        try:
            await aio(_send)()
        except (nats.errors.Error, OSError) as exc:
            # Not fatal: an unacked message is redelivered and deduplicated.
            log.warning("ack_failed", count=len(replies), error=f"{type(exc).__name__}: {exc}")

    # ---- pulling -----------------------------------------------------------

    async def run_pull(
        self,
        spec: PullSpec,
        out: trio.MemorySendChannel[list[JsMsg]],
        *,
        observe_pending: Callable[[int], None] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """`pull.run_pull` on this connection: keep `spec.depth` pull requests
        outstanding and send each non-empty batch to `out` (see there)."""
        await run_pull(self, spec, out, observe_pending=observe_pending, task_status=task_status)
