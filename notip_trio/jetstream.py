"""JetStream and core-NATS access for the Trio side of the daemon.

nats-py runs inside trio-asyncio. Everything here crosses the asyncio bridge
once per *batch*, never once per message (a crossing costs ~66 µs).

Public surface used by the rest of the daemon:

- `JsMsg`: one delivered JetStream message (subject, body, ack reply subject).
- `Delivery`: what a message's ack subject says (stream sequence and time, lag).
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
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, Protocol, TypeVar

import nats
import nats.errors
import nats.js.errors
import trio
import trio_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from .batching import BatchPolicy
from .config import Settings
from .errors import NatsRequestError, StartupError
from .log import get_logger
from .metrics import Metrics

log = get_logger(__name__)
R = TypeVar("R")

# The server's answer to a request nobody subscribes to: a status-only message.
_STATUS_HEADER = "Status"
_NO_RESPONDERS = "503"
FLUSH_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a JetStream ack subject says about its delivery (like nats.py's
    `Msg.Metadata.from_reply`), at no cost: no consumer-info call, which on
    nats-server 2.9 stalled the pull deliveries of a filtered consumer.

    v1: `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`;
    v2: `$JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>`
    `.<pending>[.<token>]`.
    """

    delivered: int  # delivery count: 1 the first time, more on redelivery
    stream_seq: int
    timestamp_ns: int  # when the message reached the stream: the same on every replica
    pending: int  # messages left for the consumer after this one: its lag

    @classmethod
    def from_reply(cls, reply: str) -> Delivery | None:
        """The delivery's metadata, or None if `reply` is not an ack subject."""
        tokens = reply.split(".")
        if len(tokens) == 9:
            fields = tokens[4], tokens[5], tokens[7], tokens[8]
        elif len(tokens) >= 11:
            fields = tokens[6], tokens[7], tokens[9], tokens[10]
        else:
            return None
        if tokens[0] != "$JS" or tokens[1] != "ACK" or not all(f.isdigit() for f in fields):
            return None
        delivered, seq, ts, pending = map(int, fields)
        return cls(delivered, seq, ts, pending)

    @staticmethod
    def timestamp_of(reply: str) -> int | None:
        """`from_reply(reply).timestamp_ns` (None alike) without building the rest:
        ingest reads it for every message, so no generator and no dataclass."""
        tokens = reply.split(".")
        count = len(tokens)
        if count == 9:
            i = 4
        elif count >= 11:
            i = 6
        else:
            return None
        ts = tokens[i + 3]
        if (
            tokens[0] == "$JS"
            and tokens[1] == "ACK"
            and tokens[i].isdigit()
            and tokens[i + 1].isdigit()
            and ts.isdigit()
            and tokens[i + 4].isdigit()
        ):
            return int(ts)
        return None


class JsMsg(NamedTuple):
    """One delivery, as the pull path keeps it: a plain tuple (cheap to build per message)."""

    subject: str
    data: bytes
    reply: str  # the $JS.ACK... subject used to ack/nak/term this delivery

    @property
    def delivery(self) -> Delivery | None:
        return Delivery.from_reply(self.reply)


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


# ---------------------------------------------------------------------------
# The real thing: nats-py inside trio-asyncio.
# ---------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class DurableProblem:
    """Something wrong with an existing durable consumer.

    `refused`: the daemon will not start on it (a push consumer, an ack policy
    other than explicit). The others it runs with, badly, and logs `event` with
    `context` at start. `message` is one line for people.
    """

    kind: Literal["push", "ack_policy", "filter_redundant", "max_ack_pending_low"]
    message: str
    event: str
    context: dict[str, Any]

    @property
    def refused(self) -> bool:
        return self.kind in ("push", "ack_policy")


def durable_problems(
    cfg: ConsumerConfig,
    stream_subjects: Sequence[str],
    *,
    stream: str,
    durable: str,
    max_ack_pending: int,
) -> list[DurableProblem]:
    """What is wrong with durable `durable` (configuration `cfg`) on `stream`.

    Pure: the start-up check (`ensure_pull_consumer`) and the preflight
    (`notip-trio check`) both judge a durable with it. `max_ack_pending` is
    what this configuration keeps in flight.
    """
    where = f"durable consumer {durable} on stream {stream}"
    out: list[DurableProblem] = []
    if cfg.deliver_subject:
        out.append(
            DurableProblem(
                "push",
                f"{where} is a push consumer; notip-trio needs a pull consumer (README: "
                "Migrating from the Go service)",
                "consumer_push_refused",
                {"durable": durable, "deliver_subject": cfg.deliver_subject},
            )
        )
    if cfg.ack_policy != AckPolicy.EXPLICIT:
        out.append(
            DurableProblem(
                "ack_policy",
                f"{where} has ack policy {cfg.ack_policy}; explicit is required",
                "consumer_ack_policy_refused",
                {"durable": durable, "ack_policy": str(cfg.ack_policy)},
            )
        )
    if cfg.filter_subject and list(stream_subjects) == [cfg.filter_subject]:
        out.append(
            DurableProblem(
                "filter_redundant",
                f"{where} filters on {cfg.filter_subject}, the stream's own subjects: on "
                "nats-server 2.9 that slows deliveries to a trickle",
                "consumer_filter_redundant",
                {
                    "durable": durable,
                    "filter_subject": cfg.filter_subject,
                    "detail": "equal to the stream's subjects; on nats-server 2.9 it slows "
                    "deliveries; recreate the durable without it (README: Migrating)",
                },
            )
        )
    if cfg.max_ack_pending is not None and 0 < cfg.max_ack_pending < max_ack_pending:
        out.append(
            DurableProblem(
                "max_ack_pending_low",
                f"{where} allows {cfg.max_ack_pending} unacked messages; this configuration "
                f"keeps up to {max_ack_pending} in flight, so deliveries will be throttled",
                "consumer_max_ack_pending_low",
                {
                    "durable": durable,
                    "max_ack_pending": cfg.max_ack_pending,
                    "wanted": max_ack_pending,
                },
            )
        )
    return out


def _aio(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Run an asyncio coroutine function from Trio: one bridge crossing per call."""
    return trio_asyncio.aio_as_trio(fn)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class PullSpec:
    stream: str
    durable: str
    filter_subject: str
    batch: int  # the largest pull request (and batch); the fixed size without batch_min
    expires_s: float
    depth: int  # pull requests outstanding at once
    max_ack_pending: int
    # The smallest pull request: with it, each slot adapts its request size between
    # batch_min and batch (notip_trio.batching); None keeps every request at `batch`.
    batch_min: int | None = None

    def policy(self) -> BatchPolicy:
        """A fresh size policy for one slot: fill in about half the expiry."""
        low = self.batch if self.batch_min is None else min(self.batch_min, self.batch)
        return BatchPolicy(low, self.batch, target_fill_s=self.expires_s / 2)


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
                nc = await _aio(_connect)()
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

        await _aio(_close)()

    # ---- JetStream management -------------------------------------------

    async def stream_subjects(self, name: str) -> list[str] | None:
        """The subjects of stream `name`, or None if it does not exist."""

        async def _info() -> list[str] | None:
            try:
                info = await self.js.stream_info(name)
            except nats.js.errors.NotFoundError:
                return None
            return list(info.config.subjects or [])

        return await _aio(_info)()

    async def durable_config(self, stream: str, durable: str) -> ConsumerConfig | None:
        """The configuration of durable consumer `durable`, or None if it does not exist."""

        async def _info() -> ConsumerConfig | None:
            try:
                info = await self.js.consumer_info(stream, durable)
            except nats.js.errors.NotFoundError:
                return None
            cfg: ConsumerConfig = info.config
            return cfg

        return await _aio(_info)()

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

        redundant = await _aio(_create)()
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
            return await _aio(_request)()
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
            await _aio(_publish)()
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
            await _aio(_send)()
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
        """Keep `spec.depth` pull requests outstanding; send each non-empty batch to `out`.

        After every pull, `observe_pending` (if given) learns the consumer's lag:
        the pending count of the batch's last delivery, or 0 for a pull that
        expired empty. Never returns unless cancelled or `out` is closed by its
        receiver. Each delivered batch crosses the asyncio bridge once.
        """
        slots = [_PullSlot(self.nc, spec, i) for i in range(spec.depth)]
        for slot in slots:
            await _aio(slot.subscribe)()
        async with out:
            task_status.started()
            try:
                async with trio.open_nursery() as nursery:
                    for slot in slots:
                        nursery.start_soon(self._pull_loop, slot, out.clone(), observe_pending)
            finally:
                # Deliveries still in a slot were never handed over: give them back
                # at once (NAK) instead of leaving them to ack_wait (30 s). Every
                # slot stops receiving first, or a NAK'd message could be redelivered
                # straight into a sibling slot's open request.
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    leftovers: list[JsMsg] = []
                    for slot in slots:
                        leftovers += await _aio(slot.close)()
                    if leftovers:
                        await self.nak(leftovers)
                        log.info(
                            "pull_leftovers_returned", stream=spec.stream, count=len(leftovers)
                        )

    async def _pull_loop(
        self,
        slot: _PullSlot,
        out: trio.MemorySendChannel[list[JsMsg]],
        observe_pending: Callable[[int], None] | None,
    ) -> None:
        policy = slot.policy
        async with out:
            fetch = _aio(slot.fetch)
            while True:
                if not self.connected:
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
