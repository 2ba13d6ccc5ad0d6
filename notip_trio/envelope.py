"""Strict decoding of telemetry envelopes into table rows (docs/contract.md: wire contract).

`decode(subject, body)` returns either a `Row` ready for COPY or a `Rejection`
with a stable reason code. The blobs are passed through as the JSON strings they
are: never decoded, trimmed or re-encoded (Rule Zero).

msgspec is used because it is the fastest strict decoder measured here
(README: Decoding); `strict=True` refuses `1.0` for an integer, `"1"` for a
number and a naive timestamp.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated, Final, Literal, NamedTuple

import msgspec

SUBJECT_PREFIX: Final = "telemetry.data."
SENSOR_TYPES: Final = ("temperature", "humidity", "movement", "pressure", "biometric")
_INT4_MIN, _INT4_MAX = -(2**31), 2**31 - 1

# Stable reason codes: the `reason` label of notip_consumer_message_parsing_errors_total
# and the `reason` column of telemetry_rejected.
BAD_SUBJECT: Final = "bad_subject"
OVERSIZED: Final = "oversized"
MALFORMED_JSON: Final = "malformed_json"
MISSING_FIELD: Final = "missing_field"
INVALID_FIELD: Final = "invalid_field"
UNKNOWN_SENSOR_TYPE: Final = "unknown_sensor_type"
INVALID_TIMESTAMP: Final = "invalid_timestamp"
GATEWAY_MISMATCH: Final = "gateway_mismatch"
REASONS: Final = (
    BAD_SUBJECT,
    OVERSIZED,
    MALFORMED_JSON,
    MISSING_FIELD,
    INVALID_FIELD,
    UNKNOWN_SENSOR_TYPE,
    INVALID_TIMESTAMP,
    GATEWAY_MISMATCH,
)


class _Envelope(msgspec.Struct, rename="camel"):
    gateway_id: str
    sensor_id: str
    sensor_type: Literal["temperature", "humidity", "movement", "pressure", "biometric"]
    timestamp: Annotated[dt.datetime, msgspec.Meta(tz=True)]
    key_version: int
    encrypted_data: str
    iv: str
    auth_tag: str


_decoder: Final = msgspec.json.Decoder(_Envelope, strict=True)


class Row(NamedTuple):
    """One `telemetry` row, in the table's column order (see db.schema.COLUMNS)."""

    time: dt.datetime
    tenant_id: str
    gateway_id: str
    sensor_id: str
    sensor_type: str
    encrypted_data: str
    iv: str
    auth_tag: str
    key_version: int


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str
    detail: str


def parse_subject(subject: str) -> tuple[str, str] | None:
    """`telemetry.data.<tenant>.<gateway>` → (tenant, gateway); anything else → None."""
    if not subject.startswith(SUBJECT_PREFIX):
        return None
    parts = subject[len(SUBJECT_PREFIX) :].split(".")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1]


def _classify(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    if "missing required field" in text:
        return MISSING_FIELD
    if "$.sensorType" in text:
        return UNKNOWN_SENSOR_TYPE if "Invalid enum value" in text else INVALID_FIELD
    if "$.timestamp" in text:
        return INVALID_TIMESTAMP
    return INVALID_FIELD


def decode(subject: str, body: bytes, *, max_body: int) -> Row | Rejection:
    """Validate one message against every rule of docs/contract.md Behaviour 2."""
    ids = parse_subject(subject)
    if ids is None:
        return Rejection(BAD_SUBJECT, "subject is not telemetry.data.<tenant>.<gateway>")
    if len(body) > max_body:
        return Rejection(OVERSIZED, f"body of {len(body)} bytes exceeds {max_body}")
    try:
        env = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        return Rejection(_classify(exc), str(exc))
    except msgspec.DecodeError as exc:
        return Rejection(MALFORMED_JSON, str(exc))
    tenant_id, gateway_id = ids
    if env.gateway_id != gateway_id:
        return Rejection(GATEWAY_MISMATCH, "payload gatewayId differs from the subject's")
    if not _INT4_MIN <= env.key_version <= _INT4_MAX:
        return Rejection(INVALID_FIELD, "keyVersion out of 32-bit range - at `$.keyVersion`")
    if not env.sensor_id:
        return Rejection(INVALID_FIELD, "sensorId is empty - at `$.sensorId`")
    # PostgreSQL TEXT cannot hold NUL; one such string would fail the whole COPY.
    # (Four plain tests first: this runs for every message.)
    if (
        "\x00" in env.sensor_id
        or "\x00" in env.encrypted_data
        or "\x00" in env.iv
        or "\x00" in env.auth_tag
    ):
        for name, value in (
            ("sensorId", env.sensor_id),
            ("encryptedData", env.encrypted_data),
            ("iv", env.iv),
            ("authTag", env.auth_tag),
        ):
            if "\x00" in value:
                return Rejection(INVALID_FIELD, f"NUL character - at `$.{name}`")
    return Row(
        env.timestamp,
        tenant_id,
        gateway_id,
        env.sensor_id,
        env.sensor_type,
        env.encrypted_data,
        env.iv,
        env.auth_tag,
        env.key_version,
    )
