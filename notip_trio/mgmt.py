"""Management-API client: the three core-NATS request-reply calls of docs/contract.md.

Every call follows one policy: each attempt runs inside `trio.fail_after(5)`;
a failed attempt (transport error, timeout, undecodable or invalid reply) is
retried up to three times after waiting 1 s, 2 s and 4 s. The waits are plain
`trio.sleep`s, so cancelling the caller (shutdown) ends them at once. When every
attempt failed the call raises `MgmtError` (from None: the cause is in the
message). Cancellation is never turned into `MgmtError`. The liveness check's
get-status calls go through a circuit breaker (`breaker.py`) that ends them
early while the API is failing.

Replies are validated strictly:

- alert-configs.list: a JSON array of `{tenant_id, gateway_id?, timeout_ms}`;
  one bad entry makes the whole reply invalid (the caller keeps its last good
  list). An empty-string or null `gateway_id` means a tenant-wide entry.
- get-status: `gateway_id` must be present and equal the request's, `state`
  one of online, offline, paused, provisioning.
- update-status: `success: false` is an error (its `error` text is reported).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Final, Literal, Protocol, TypeVar

import msgspec
import trio

from .errors import MgmtError, NatsRequestError
from .js.bridge import Requester
from .log import get_logger
from .wire import format_rfc3339

log = get_logger(__name__)

_T = TypeVar("_T")

SUBJECT_LIST_CONFIGS: Final = "internal.mgmt.alert-configs.list"
SUBJECT_GET_STATUS: Final = "internal.mgmt.gateway.get-status"
SUBJECT_UPDATE_STATUS: Final = "internal.mgmt.gateway.update-status"

ATTEMPT_TIMEOUT_S: Final = 5.0
RETRY_DELAYS_S: Final = (1.0, 2.0, 4.0)

GatewayState = Literal["online", "offline", "paused", "provisioning"]
ReportedStatus = Literal["online", "offline"]


class AlertConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One alert-config entry; `gateway_id=None` is the tenant-wide entry."""

    tenant_id: Annotated[str, msgspec.Meta(min_length=1)]
    timeout_ms: Annotated[int, msgspec.Meta(gt=0)]
    gateway_id: str | None = None


class _StatusReply(msgspec.Struct):
    gateway_id: str
    state: GatewayState


class _UpdateReply(msgspec.Struct):
    success: bool
    error: str | None = None


class _InvalidReply(Exception):
    """A reply that decoded but breaks the contract (retried like any failure)."""


_configs_decoder: Final = msgspec.json.Decoder(list[AlertConfig])
_status_decoder: Final = msgspec.json.Decoder(_StatusReply)
_update_decoder: Final = msgspec.json.Decoder(_UpdateReply)
_encoder: Final = msgspec.json.Encoder()


class MgmtClient:
    """The management API over a `Requester` (one attempt per `request` call).

    `attempt_timeout_s` and `retry_delays_s` exist for tests and tools; the
    daemon uses the docs/contract.md defaults.
    """

    def __init__(
        self,
        requester: Requester,
        *,
        attempt_timeout_s: float = ATTEMPT_TIMEOUT_S,
        retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
    ) -> None:
        self._requester = requester
        self._attempt_timeout_s = attempt_timeout_s
        self._retry_delays_s = tuple(retry_delays_s)

    async def list_alert_configs(self) -> list[AlertConfig]:
        """All alert-config entries, validated; raises MgmtError."""

        def parse(raw: bytes) -> list[AlertConfig]:
            configs = _configs_decoder.decode(raw)
            # "" and null both mean "no gateway": normalise so lookups need one case.
            return [
                msgspec.structs.replace(c, gateway_id=None) if c.gateway_id == "" else c
                for c in configs
            ]

        return await self._call(SUBJECT_LIST_CONFIGS, b"", parse)

    async def get_status(
        self, tenant_id: str, gateway_id: str, *, gate: CallGate | None = None
    ) -> GatewayState:
        """The gateway's lifecycle state; raises MgmtError (also for invalid replies).

        `gate` (a circuit breaker, `breaker.py`) sees every attempt and may end
        the call before or during any of them: MgmtError with `skipped`.
        """
        payload = _encoder.encode({"gateway_id": gateway_id, "tenant_id": tenant_id})

        def parse(raw: bytes) -> GatewayState:
            reply = _status_decoder.decode(raw)
            if reply.gateway_id != gateway_id:
                raise _InvalidReply(
                    f"reply for gateway {reply.gateway_id!r}, asked for {gateway_id!r}"
                )
            return reply.state

        return await self._call(SUBJECT_GET_STATUS, payload, parse, gate)

    async def update_status(
        self, gateway_id: str, status: ReportedStatus, last_seen_at: datetime
    ) -> None:
        """Report a gateway online/offline; raises MgmtError (also for success=false)."""
        payload = _encoder.encode(
            {
                "gateway_id": gateway_id,
                "status": status,
                "last_seen_at": format_rfc3339(last_seen_at),
            }
        )

        def parse(raw: bytes) -> None:
            reply = _update_decoder.decode(raw)
            if not reply.success:
                raise _InvalidReply(f"success=false: {reply.error or 'no error text'}")

        await self._call(SUBJECT_UPDATE_STATUS, payload, parse)

    async def _call(
        self,
        subject: str,
        payload: bytes,
        parse: Callable[[bytes], _T],
        gate: CallGate | None = None,
    ) -> _T:
        attempts = len(self._retry_delays_s) + 1
        refused = False
        for attempt in range(attempts):
            if attempt:
                delay_s = self._retry_delays_s[attempt - 1]
                if gate is not None:
                    await gate.wait(delay_s)  # ends early when the gate opens
                else:
                    await trio.sleep(delay_s)
            if gate is not None and not await gate.admit():
                raise MgmtError(f"{subject}: not asked (circuit open)", skipped=True)
            # One scope per attempt: its deadline is the attempt's timeout, and
            # the gate may cancel it (a bare scope: cheaper than fail_after).
            attempt_scope = trio.CancelScope(
                deadline=trio.current_time() + self._attempt_timeout_s
            )
            if gate is not None:
                gate.track(attempt_scope)
            try:
                with attempt_scope:
                    raw = await self._requester.request(subject, payload)
                if attempt_scope.cancelled_caught:
                    if gate is not None and gate.is_open:
                        raise MgmtError(f"{subject}: given up (circuit open)", skipped=True)
                    raise trio.TooSlowError
                result = parse(raw)
            except trio.TooSlowError:
                reason, refused = f"no reply within {self._attempt_timeout_s:g} s", False
            except NatsRequestError as exc:
                reason, refused = f"{type(exc).__name__}: {exc}", False
            except (msgspec.DecodeError, _InvalidReply) as exc:
                # msgspec.ValidationError is a DecodeError: wrong types, missing fields.
                reason, refused = f"{type(exc).__name__}: {exc}", True
            else:
                if gate is not None:
                    gate.succeeded()
                return result
            finally:
                if gate is not None:
                    gate.untrack(attempt_scope)
            if gate is not None:
                gate.failed()
            log.debug("mgmt_attempt_failed", subject=subject, attempt=attempt + 1, reason=reason)
        raise MgmtError(
            f"{subject}: {attempts} attempts failed, last: {reason}", refused=refused
        ) from None


class CallGate(Protocol):
    """Sees each attempt of a call and may end it early (`breaker.Breaker`)."""

    async def admit(self) -> bool:
        """May the next attempt go? False ends the call (MgmtError, skipped)."""
        ...

    @property
    def is_open(self) -> bool:
        """True once the gate ended the calls in flight (and fails new ones)."""
        ...

    def track(self, scope: trio.CancelScope) -> None:
        """An attempt in flight: the gate may cancel `scope` to end the call."""
        ...

    def untrack(self, scope: trio.CancelScope) -> None: ...

    async def wait(self, delay_s: float) -> None:
        """The wait before a retry (may end early)."""
        ...

    def succeeded(self) -> None: ...

    def failed(self) -> None: ...
