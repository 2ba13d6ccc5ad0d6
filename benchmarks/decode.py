"""Decision benchmark b: envelope decoding with json, orjson and msgspec.

Each decoder turns (subject, body) into the same `Row` with the same rules as
`notip_trio.envelope.decode` (docs/contract.md Behaviour 2): subject shape, body size,
every field present and of its type (an integer that is not a bool, strings),
sensorType in the enumeration, an RFC 3339 timestamp with an offset, gatewayId
equal to the subject's, keyVersion in int4 range, no NUL in the strings.

- `msgspec`: the daemon's own `envelope.decode` (a strict typed Struct decode).
- `orjson` / `json`: `loads` into a dict, then the same checks by hand, with
  `datetime.fromisoformat` for the timestamp (Python 3.11 takes the `Z`).

Runs on the message file (all valid envelopes); the best of 3 passes counts.
Usage: python -m benchmarks.decode '{"mode": "decode", "file": "..."}'
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import child_main, read_messages
from notip_trio.envelope import SENSOR_TYPES, Rejection, Row, decode, parse_subject

_MAX_BODY = 16384
_STRINGS = ("gatewayId", "sensorId", "sensorType", "timestamp", "encryptedData", "iv", "authTag")
_SENSORS = frozenset(SENSOR_TYPES)
_INT4_MIN, _INT4_MAX = -(2**31), 2**31 - 1


def _validate(subject: str, obj: Any) -> Row | Rejection:
    """The checks msgspec's typed decode and `envelope.decode` make, by hand."""
    ids = parse_subject(subject)
    if ids is None:
        return Rejection("bad_subject", "")
    if not isinstance(obj, dict):
        return Rejection("invalid_field", "not an object")
    for name in _STRINGS:
        value = obj.get(name)
        if value is None:
            return Rejection("missing_field", name)
        if type(value) is not str or "\x00" in value:
            return Rejection("invalid_field", name)
    key_version = obj.get("keyVersion")
    if key_version is None:
        return Rejection("missing_field", "keyVersion")
    if type(key_version) is not int or not _INT4_MIN <= key_version <= _INT4_MAX:
        return Rejection("invalid_field", "keyVersion")
    if obj["sensorType"] not in _SENSORS:
        return Rejection("unknown_sensor_type", "")
    try:
        ts = dt.datetime.fromisoformat(obj["timestamp"])
    except ValueError:
        return Rejection("invalid_timestamp", "")
    if ts.tzinfo is None or "T" not in obj["timestamp"]:
        return Rejection("invalid_timestamp", "")
    tenant_id, gateway_id = ids
    if obj["gatewayId"] != gateway_id:
        return Rejection("gateway_mismatch", "")
    if not obj["sensorId"]:
        return Rejection("invalid_field", "sensorId")
    return Row(
        ts,
        tenant_id,
        gateway_id,
        obj["sensorId"],
        obj["sensorType"],
        obj["encryptedData"],
        obj["iv"],
        obj["authTag"],
        key_version,
    )


def _by_hand(loads: Callable[[bytes], Any]) -> Callable[[str, bytes], Row | Rejection]:
    def run(subject: str, body: bytes) -> Row | Rejection:
        if len(body) > _MAX_BODY:
            return Rejection("oversized", "")
        try:
            obj = loads(body)
        except ValueError:
            return Rejection("malformed_json", "")
        return _validate(subject, obj)

    return run


def _msgspec(subject: str, body: bytes) -> Row | Rejection:
    return decode(subject, body, max_body=_MAX_BODY)


DECODERS: dict[str, Callable[[str, bytes], Row | Rejection]] = {
    "json": _by_hand(json.loads),
    "orjson": _by_hand(orjson.loads),
    "msgspec": _msgspec,
}


def _decode(spec: dict[str, Any]) -> dict[str, Any]:
    msgs = read_messages(Path(spec["file"]))
    reference = [_msgspec(s, b) for s, b in msgs[:1000]]
    out: dict[str, Any] = {"envelopes": len(msgs)}
    for name, fn in DECODERS.items():
        if [fn(s, b) for s, b in msgs[:1000]] != reference:
            raise RuntimeError(f"{name} decodes differently from envelope.decode")
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for subject, body in msgs:
                fn(subject, body)
            best = min(best, time.perf_counter() - t0)
        out[name] = {"us_per_envelope": best / len(msgs) * 1e6, "per_s": len(msgs) / best}
    return out


MODES = {"decode": _decode}

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:], MODES))
