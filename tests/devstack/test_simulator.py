"""The gateway simulator's message making, without a network.

`publish_burst` and `run_simulation` run against a recording fake client.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import random
from collections import Counter
from typing import Any

import pytest

from devstack import simulator as sim

TS = dt.datetime(2026, 11, 27, 8, 3, 37, 123456, tzinfo=dt.UTC)
FIELDS = {
    "gatewayId": str,
    "sensorId": str,
    "sensorType": str,
    "timestamp": str,
    "keyVersion": int,
    "encryptedData": str,
    "iv": str,
    "authTag": str,
}


class FakeNats:
    """Records core publishes; flush does nothing. With `stop_after`, sets `stop`
    once that many messages were published (a run ends by count, not by time)."""

    def __init__(self, stop_after: int = 0) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.flushes = 0
        self.stop_after = stop_after
        self.stop = asyncio.Event()

    async def publish(self, subject: str, payload: bytes) -> None:
        self.published.append((subject, payload))
        if self.stop_after and len(self.published) >= self.stop_after:
            self.stop.set()

    async def flush(self, **_options: object) -> None:
        self.flushes += 1


def _b64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


def _parse_ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_envelope_has_every_field_with_its_type() -> None:
    body = sim.make_envelope("gw-1", "s-1", "humidity", TS, key_version=3)
    env = json.loads(body)
    assert set(env) == set(FIELDS)
    for name, typ in FIELDS.items():
        assert type(env[name]) is typ, name
    assert (env["gatewayId"], env["sensorId"], env["sensorType"], env["keyVersion"]) == (
        "gw-1",
        "s-1",
        "humidity",
        3,
    )


def test_envelope_timestamp_is_rfc3339_utc() -> None:
    env = json.loads(sim.make_envelope("gw-1", "s-1", "humidity", TS))
    assert env["timestamp"] == "2026-11-27T08:03:37.123456Z"
    assert _parse_ts(env["timestamp"]) == TS


def test_timestamp_in_another_zone_is_written_in_utc() -> None:
    cet = dt.timezone(dt.timedelta(hours=1))
    assert sim.format_timestamp(TS.astimezone(cet)) == "2026-11-27T08:03:37.123456Z"


def test_envelope_blobs_are_base64() -> None:
    env = json.loads(sim.make_envelope("gw-1", "s-1", "pressure", TS))
    assert 16 <= len(_b64(env["encryptedData"])) <= 64
    assert len(_b64(env["iv"])) == 12
    assert len(_b64(env["authTag"])) == 16


def test_envelope_blobs_are_random_but_reproducible() -> None:
    a = sim.make_envelope("gw-1", "s-1", "pressure", TS, rng=random.Random(7))
    b = sim.make_envelope("gw-1", "s-1", "pressure", TS, rng=random.Random(7))
    c = sim.make_envelope("gw-1", "s-1", "pressure", TS, rng=random.Random(8))
    assert a == b
    assert a != c


def test_malformed_rotation() -> None:
    kinds = [sim.malformed_kind(i, 3) for i in range(18)]
    assert kinds[:6] == [None, None, "bad_json", None, None, "missing_field"]
    malformed = [k for k in kinds if k is not None]
    assert malformed == [*sim.MALFORMED_KINDS, sim.MALFORMED_KINDS[0]]


@pytest.mark.parametrize("every", [0, -1])
def test_malformed_never_when_disabled(every: int) -> None:
    assert all(sim.malformed_kind(i, every) is None for i in range(1000))


def test_malformed_every_message() -> None:
    assert [sim.malformed_kind(i, 1) for i in range(6)] == [
        *sim.MALFORMED_KINDS,
        sim.MALFORMED_KINDS[0],
    ]


def _malformed(kind: str) -> bytes:
    return sim.make_malformed(kind, "gw-1", "s-1", "movement", TS)


def test_malformed_bad_json() -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(_malformed("bad_json"))


def test_malformed_missing_field() -> None:
    env = json.loads(_malformed("missing_field"))
    assert set(FIELDS) - set(env) == {"authTag"}


def test_malformed_unknown_sensor_type() -> None:
    assert json.loads(_malformed("unknown_sensor_type"))["sensorType"] not in sim.SENSOR_TYPES


def test_malformed_bad_timestamp() -> None:
    with pytest.raises(ValueError, match="Invalid isoformat"):
        _parse_ts(json.loads(_malformed("bad_timestamp"))["timestamp"])


def test_malformed_gateway_mismatch() -> None:
    env = json.loads(_malformed("gateway_mismatch"))
    assert env["gatewayId"] != "gw-1"
    assert set(env) == set(FIELDS)


def test_malformed_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown malformed kind"):
        _malformed("cosmic_ray")


def test_fleet_deals_gateways_round_robin() -> None:
    fleet = sim.make_fleet(2, 5)
    assert [(g.tenant_id, g.gateway_id) for g in fleet] == [
        ("tenant-1", "gw-1-001"),
        ("tenant-2", "gw-2-001"),
        ("tenant-1", "gw-1-002"),
        ("tenant-2", "gw-2-002"),
        ("tenant-1", "gw-1-003"),
    ]
    assert fleet[0].subject == "telemetry.data.tenant-1.gw-1-001"
    for gw in fleet:
        assert len(gw.sensors) == sim.SENSORS_PER_GATEWAY
        assert all(t in sim.SENSOR_TYPES for _, t in gw.sensors)
        # subject tokens must not contain NATS wildcards or dots
        assert not set(gw.tenant_id + gw.gateway_id) & set(".*> ")


async def _burst(count: int, **kwargs: Any) -> FakeNats:
    nc = FakeNats()
    assert await sim.publish_burst(nc, count, 2, 3, **kwargs) == count  # type: ignore[arg-type]
    return nc


def test_burst_publishes_valid_distinct_envelopes() -> None:
    nc = asyncio.run(_burst(250, chunk=100, start=TS))
    assert len(nc.published) == 250
    assert nc.flushes == 3  # one per chunk
    keys = set()
    for subject, body in nc.published:
        env = json.loads(body)
        _, _, tenant, gateway = subject.split(".")
        assert env["gatewayId"] == gateway
        assert env["sensorType"] in sim.SENSOR_TYPES
        keys.add((tenant, gateway, env["sensorId"], env["timestamp"]))
    assert len(keys) == 250
    assert len({s for s, _ in nc.published}) == 6  # 2 tenants x 3 gateways
    assert json.loads(nc.published[1][1])["timestamp"] == "2026-11-27T08:03:37.123457Z"


def test_silence_schedule_cycles() -> None:
    fleet = sim.make_fleet(2, 20)
    sched = sim._SilenceSchedule(fleet, 0.25, seconds=30, lead=10, rng=random.Random(1))
    assert not sched.update(5.0)
    assert sched.silent == frozenset()
    assert sched.update(10.0)
    first = sched.silent
    assert len(first) == 5
    assert not sched.update(39.9)
    assert sched.silent == first
    assert sched.update(40.0)  # back after 30 s
    assert sched.silent == frozenset()
    assert not sched.update(69.9)
    assert sched.update(70.0)  # the next cycle, a fresh set
    assert len(sched.silent) == 5
    assert sched.cycles == 2


def test_no_silence_with_zero_fraction() -> None:
    sched = sim._SilenceSchedule(sim.make_fleet(1, 10), 0.0, 30, 0, random.Random(1))
    assert not any(sched.update(t) for t in range(200))


def test_simulation_follows_the_malformed_rotation() -> None:
    async def run() -> tuple[FakeNats, sim.SimStats]:
        # Three rounds of the malformed kinds: ends by count, not by time.
        nc = FakeNats(stop_after=7 * len(sim.MALFORMED_KINDS) * 3)
        stats = await sim.run_simulation(
            nc,  # type: ignore[arg-type]
            gateways=4,
            tenants=2,
            rate_per_s=2000,
            silent_fraction=0,
            malformed_every=7,
            stop_event=nc.stop,
            rng=random.Random(3),
        )
        return nc, stats

    nc, stats = asyncio.run(asyncio.wait_for(run(), 60))  # the hang guard
    assert stats.sent == len(nc.published) >= nc.stop_after
    kinds = [sim.malformed_kind(i, 7) for i in range(stats.sent)]
    assert stats.valid == kinds.count(None)
    assert stats.malformed == Counter(k for k in kinds if k is not None)
    assert set(stats.malformed) == set(sim.MALFORMED_KINDS)
    checked = Counter[str]()
    for (subject, body), kind in zip(nc.published, kinds, strict=True):
        if kind is None:
            env = json.loads(body)
            assert subject.endswith("." + env["gatewayId"])
            checked["valid"] += 1
        elif kind != "bad_json":
            json.loads(body)  # well-formed JSON, bad content
            checked["bad content"] += 1
        else:
            with pytest.raises(json.JSONDecodeError):
                json.loads(body)
            checked["bad_json"] += 1
    assert checked["valid"] == stats.valid
    assert checked["bad_json"] == stats.malformed["bad_json"]
    assert checked["bad content"] == sum(stats.malformed.values()) - stats.malformed["bad_json"]
    valid = [json.loads(b) for i, (_, b) in enumerate(nc.published) if not sim.malformed_kind(i, 7)]
    keys = {(e["gatewayId"], e["sensorId"], e["timestamp"]) for e in valid}
    assert len(keys) == len(valid)


def test_simulation_stops_on_the_event() -> None:
    nc = FakeNats(stop_after=1)

    async def run() -> sim.SimStats:
        return await sim.run_simulation(
            nc,  # type: ignore[arg-type]
            gateways=2,
            rate_per_s=100,
            stop_event=nc.stop,
        )

    # Without the event the run would go on forever (no duration): it returns.
    stats = asyncio.run(asyncio.wait_for(run(), 30))  # the hang guard
    assert stats.sent == len(nc.published) >= 1
    assert stats.publish_errors == 0
