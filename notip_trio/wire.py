"""Wire-format helpers shared by the parts of the daemon (docs/contract.md "Wire contract").

- `format_rfc3339`: UTC timestamps as Go's `time.RFC3339Nano` writes them
  (`2024-05-01T12:00:00.5Z`; trailing zeros of the fraction dropped, no fraction
  when it is zero), so the management API and alert consumers see exactly what
  the Go service sent.
- The platform's streams and their subjects (`STREAMS`, owned by the platform:
  the daemon only checks they exist; tests and the dev stack create them).
- The offline alert's body (`offline_alert_body`) and its `Nats-Msg-Id`.
- Subject builders and parsers for `alert.{tenant}.gw_offline` and
  `gateway.decommissioned.{tenant}.{gateway}`. Parsers return `None` for a
  subject that does not have the exact shape; they never raise.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final

import msgspec

TELEMETRY_STREAM: Final = "TELEMETRY"
ALERTS_STREAM: Final = "ALERTS"
DECOMMISSION_STREAM: Final = "DECOMMISSION"
TELEMETRY_SUBJECTS: Final = "telemetry.data.>"
DECOMMISSION_SUBJECTS: Final = "gateway.decommissioned.>"
#: The platform's streams: name -> subjects (docs/contract.md, Wire contract).
STREAMS: Final[Mapping[str, tuple[str, ...]]] = {
    TELEMETRY_STREAM: (TELEMETRY_SUBJECTS,),
    ALERTS_STREAM: ("alert.>",),
    DECOMMISSION_STREAM: (DECOMMISSION_SUBJECTS,),
}
DECOMMISSION_DURABLE: Final = "data-consumer-decommission-listener"

ALERT_SUBJECT_PREFIX = "alert."
ALERT_SUBJECT_SUFFIX = ".gw_offline"
DECOMMISSION_SUBJECT_PREFIX = "gateway.decommissioned."

# Characters that cannot appear inside one NATS subject token.
_BAD_TOKEN_CHARS = frozenset(".*> \t\r\n")


def format_rfc3339(when: datetime) -> str:
    """Format an aware datetime in UTC like Go's RFC3339Nano, with a 'Z' suffix.

    Raises ValueError for a naive datetime: guessing its zone would put a wrong
    time on the wire.
    """
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("format_rfc3339 needs a timezone-aware datetime")
    utc = when.astimezone(UTC)
    base = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        base += "." + f"{utc.microsecond:06d}".rstrip("0")
    return base + "Z"


def is_valid_token(token: str) -> bool:
    """True if `token` is a non-empty NATS subject token without wildcards or dots."""
    return bool(token) and _BAD_TOKEN_CHARS.isdisjoint(token)


def alert_subject(tenant_id: str) -> str:
    """`alert.{tenant}.gw_offline`; ValueError if the tenant is not a valid token."""
    if not is_valid_token(tenant_id):
        raise ValueError(f"invalid tenant id for a subject: {tenant_id!r}")
    return f"{ALERT_SUBJECT_PREFIX}{tenant_id}{ALERT_SUBJECT_SUFFIX}"


def parse_alert_subject(subject: str) -> str | None:
    """The tenant of `alert.{tenant}.gw_offline`, or None if the shape differs."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[0] != "alert" or parts[2] != "gw_offline":
        return None
    return parts[1] if is_valid_token(parts[1]) else None


def decommission_subject(tenant_id: str, gateway_id: str) -> str:
    """`gateway.decommissioned.{tenant}.{gateway}`; ValueError for invalid tokens."""
    if not (is_valid_token(tenant_id) and is_valid_token(gateway_id)):
        raise ValueError(f"invalid ids for a subject: {tenant_id!r}, {gateway_id!r}")
    return f"{DECOMMISSION_SUBJECT_PREFIX}{tenant_id}.{gateway_id}"


def parse_decommission_subject(subject: str) -> tuple[str, str] | None:
    """(tenant, gateway) of `gateway.decommissioned.{tenant}.{gateway}`, else None."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != "gateway" or parts[1] != "decommissioned":
        return None
    tenant, gateway = parts[2], parts[3]
    if not (is_valid_token(tenant) and is_valid_token(gateway)):
        return None
    return tenant, gateway


class OfflineAlert(msgspec.Struct, frozen=True):
    """The body of `alert.{tenant}.gw_offline`, field names as on the wire."""

    gatewayId: str
    lastSeen: str
    timeoutMs: int
    timestamp: str  # when the silence was detected (RFC 3339)


_encoder: Final = msgspec.json.Encoder()


def offline_alert_body(
    gateway_id: str, last_seen: datetime, timeout_ms: int, detected_at: datetime
) -> bytes:
    """The JSON body of an offline alert; ValueError for a naive datetime."""
    return offline_alert_body_of(
        gateway_id, format_rfc3339(last_seen), timeout_ms, format_rfc3339(detected_at)
    )


def offline_alert_body_of(
    gateway_id: str, last_seen: str, timeout_ms: int, detected_at: str
) -> bytes:
    """`offline_alert_body` from times already formatted (`format_rfc3339`): a
    mass outage formats each time once."""
    return _encoder.encode(OfflineAlert(gateway_id, last_seen, timeout_ms, detected_at))


def offline_alert_msg_id(tenant_id: str, gateway_id: str, last_seen: datetime) -> str:
    """`Nats-Msg-Id` of the offline alert for one silence of one gateway.

    Derived only from (tenant, gateway, last-seen), so every retry of the same
    alert, from this process or another replica, is deduplicated by JetStream,
    while the next silence (a later last-seen) gets a new id.
    """
    return offline_alert_msg_id_of(tenant_id, gateway_id, format_rfc3339(last_seen))


def offline_alert_msg_id_of(tenant_id: str, gateway_id: str, last_seen: str) -> str:
    """`offline_alert_msg_id` from a last-seen already formatted."""
    return f"gw_offline.{tenant_id}.{gateway_id}.{last_seen}"
