"""Strict envelope decoding (docs/contract.md wire contract, Rule Zero, Behaviour 2)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from notip_trio import envelope
from notip_trio.envelope import Rejection, Row, decode, parse_subject

SUBJECT = "telemetry.data.tenant-1.gw-1"
GOOD: dict[str, Any] = {
    "gatewayId": "gw-1",
    "sensorId": "s-1",
    "sensorType": "pressure",
    "timestamp": "2026-11-27T08:03:37.123456Z",
    "keyVersion": 3,
    # Odd-looking but valid JSON strings: they must come through untouched.
    "encryptedData": "  QUJD+/==  ",
    "iv": "aXY=\\u00e9",
    "authTag": "dGFn\n",
}


def _body(**changes: Any) -> bytes:
    fields = {**GOOD, **changes}
    return json.dumps({k: v for k, v in fields.items() if v is not ...}).encode()


def test_good_envelope_becomes_a_row_with_blobs_untouched() -> None:
    row = decode(SUBJECT, _body(), max_body=4096)
    assert isinstance(row, Row)
    assert row.tenant_id == "tenant-1"
    assert row.gateway_id == "gw-1"
    assert row.time == dt.datetime(2026, 11, 27, 8, 3, 37, 123456, tzinfo=dt.UTC)
    assert (row.encrypted_data, row.iv, row.auth_tag) == (
        GOOD["encryptedData"],
        GOOD["iv"],
        GOOD["authTag"],
    )
    assert row.key_version == 3


def test_offset_timestamps_are_accepted() -> None:
    row = decode(SUBJECT, _body(timestamp="2026-11-27T10:03:37+02:00"), max_body=4096)
    assert isinstance(row, Row)
    assert row.time == dt.datetime(2026, 11, 27, 8, 3, 37, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("subject", "body", "reason"),
    [
        ("telemetry.data.t1", _body(), envelope.BAD_SUBJECT),
        ("telemetry.data.t1.gw-1.extra", _body(), envelope.BAD_SUBJECT),
        ("telemetry.other.t1.gw-1", _body(), envelope.BAD_SUBJECT),
        ("telemetry.data..gw-1", _body(), envelope.BAD_SUBJECT),
        (SUBJECT, b"{not json", envelope.MALFORMED_JSON),
        (SUBJECT, b"", envelope.MALFORMED_JSON),
        (SUBJECT, b"[1, 2]", envelope.INVALID_FIELD),
        (SUBJECT, _body(iv=...), envelope.MISSING_FIELD),
        (SUBJECT, _body(keyVersion="3"), envelope.INVALID_FIELD),
        (SUBJECT, _body(keyVersion=3.0), envelope.INVALID_FIELD),
        (SUBJECT, _body(keyVersion=2**31), envelope.INVALID_FIELD),
        (SUBJECT, _body(sensorId=5), envelope.INVALID_FIELD),
        (SUBJECT, _body(sensorId=""), envelope.INVALID_FIELD),
        (SUBJECT, _body(encryptedData=None), envelope.INVALID_FIELD),
        (SUBJECT, _body(authTag="a\u0000b"), envelope.INVALID_FIELD),
        (SUBJECT, _body(sensorType="radiation"), envelope.UNKNOWN_SENSOR_TYPE),
        (SUBJECT, _body(sensorType=1), envelope.INVALID_FIELD),
        (SUBJECT, _body(timestamp="yesterday"), envelope.INVALID_TIMESTAMP),
        (SUBJECT, _body(timestamp="2026-11-27T08:03:37"), envelope.INVALID_TIMESTAMP),
        (SUBJECT, _body(timestamp="2026-13-27T08:03:37Z"), envelope.INVALID_TIMESTAMP),
        (SUBJECT, _body(gatewayId="gw-2"), envelope.GATEWAY_MISMATCH),
        (SUBJECT, _body(encryptedData="A" * 5000), envelope.OVERSIZED),
    ],
)
def test_every_bad_input_has_its_reason(subject: str, body: bytes, reason: str) -> None:
    result = decode(subject, body, max_body=4096)
    assert isinstance(result, Rejection)
    assert result.reason == reason
    assert result.reason in envelope.REASONS


def test_parse_subject() -> None:
    assert parse_subject("telemetry.data.a.b") == ("a", "b")
    assert parse_subject("telemetry.data.a") is None
    assert parse_subject("telemetry.data.a.b.c") is None
