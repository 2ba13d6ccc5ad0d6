"""A gateway simulator: telemetry envelopes published to NATS, in plain asyncio.

It runs as its own process (``python -m devstack.simulator``) and
its functions are imported by the benchmark and the tests. Nothing here uses
Trio: it talks to nats-py directly.

- `make_envelope` builds one valid envelope (docs/contract.md, Wire contract), with
  random base64 blobs; `make_malformed` builds one bad message of a given kind
  (`MALFORMED_KINDS`), and `malformed_kind` says which kind, if any, the n-th
  message of a run is.
- `publish_burst` publishes N valid, all-distinct envelopes as fast as core
  publish goes (the TELEMETRY stream captures core publishes) and returns once
  the server has them all.
- `run_simulation` paces a fleet of gateways at a total message rate; a
  fraction of them falls silent for a while and comes back, cycle after cycle;
  every n-th message is malformed. It returns (and logs) a `SimStats`.

CLI::

    python -m devstack.simulator --url tls://127.0.0.1:4222 \\
        --ca ca.pem --cert c.pem --key k.pem [--gateways 50] [--tenants 2] \\
        [--rate 200] [--silent-fraction 0.1] [--silent-seconds 40] \\
        [--malformed-every 500] [--duration 0] [--burst N]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import random
import signal
import ssl
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from notip_trio.log import get_logger, setup_logging

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

log = get_logger("devstack.simulator")  # also when run as __main__

SENSOR_TYPES: tuple[str, ...] = ("temperature", "humidity", "movement", "pressure", "biometric")
MALFORMED_KINDS: tuple[str, ...] = (
    "bad_json",
    "missing_field",
    "unknown_sensor_type",
    "bad_timestamp",
    "gateway_mismatch",
)
SENSORS_PER_GATEWAY = 3
_PACE_S = 0.02  # publishing granularity of run_simulation
_MAX_PER_STEP = 5000  # after a stall, catch up at most this much at once
_MICROSECOND = dt.timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Gateway:
    """One simulated gateway: its tenant, id and sensors (id, type)."""

    tenant_id: str
    gateway_id: str
    sensors: tuple[tuple[str, str], ...]

    @property
    def subject(self) -> str:
        return subject_for(self.tenant_id, self.gateway_id)


@dataclass
class SimStats:
    """What a run published. `malformed` counts by kind."""

    sent: int = 0
    valid: int = 0
    malformed: Counter[str] = field(default_factory=Counter)
    skipped_silent: int = 0
    publish_errors: int = 0
    silence_cycles: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "valid": self.valid,
            "malformed": dict(self.malformed),
            "skipped_silent": self.skipped_silent,
            "publish_errors": self.publish_errors,
            "silence_cycles": self.silence_cycles,
            "seconds": round(self.seconds, 3),
        }


def subject_for(tenant_id: str, gateway_id: str) -> str:
    return f"telemetry.data.{tenant_id}.{gateway_id}"


def tenant_name(index: int) -> str:
    """The id of the `index`-th tenant (0-based): tenant-1, tenant-2, ..."""
    return f"tenant-{index + 1}"


def gateway_name(tenant_index: int, index: int) -> str:
    """The id of a tenant's `index`-th gateway (both 0-based): gw-1-001, ..."""
    return f"gw-{tenant_index + 1}-{index + 1:03d}"


def make_fleet(tenants: int, gateways: int) -> list[Gateway]:
    """`gateways` gateways dealt round-robin over `tenants` tenants (ids as above).

    Gateway k of the list belongs to tenant k % tenants, so every tenant gets
    gateways // tenants of them, the first ones one more.
    """
    if tenants < 1 or gateways < 0:
        raise ValueError("need at least one tenant and a non-negative gateway count")
    fleet = []
    for k in range(gateways):
        t, i = k % tenants, k // tenants
        gw = gateway_name(t, i)
        sensors = tuple(
            (f"{gw}-s{j + 1}", SENSOR_TYPES[(k + j) % len(SENSOR_TYPES)])
            for j in range(SENSORS_PER_GATEWAY)
        )
        fleet.append(Gateway(tenant_name(t), gw, sensors))
    return fleet


def format_timestamp(ts: dt.datetime) -> str:
    """RFC 3339 in UTC with microseconds and a Z: 2026-11-27T08:03:37.123456Z."""
    return ts.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _blob(rng: random.Random, size: int) -> str:
    return base64.b64encode(rng.randbytes(size)).decode("ascii")


def envelope_fields(
    gateway_id: str,
    sensor_id: str,
    sensor_type: str,
    ts: dt.datetime,
    *,
    key_version: int = 1,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """The fields of a valid envelope as a dict (see `make_envelope`)."""
    rng = rng or random.Random()
    return {
        "gatewayId": gateway_id,
        "sensorId": sensor_id,
        "sensorType": sensor_type,
        "timestamp": format_timestamp(ts),
        "keyVersion": key_version,
        "encryptedData": _blob(rng, rng.randint(16, 64)),
        "iv": _blob(rng, 12),
        "authTag": _blob(rng, 16),
    }


def make_envelope(
    gateway_id: str,
    sensor_id: str,
    sensor_type: str,
    ts: dt.datetime,
    *,
    key_version: int = 1,
    rng: random.Random | None = None,
) -> bytes:
    """One valid telemetry envelope, JSON-encoded.

    `encryptedData` (16-64 bytes), `iv` (12) and `authTag` (16) are random
    bytes in standard base64; pass `rng` for reproducible blobs.
    """
    fields = envelope_fields(
        gateway_id, sensor_id, sensor_type, ts, key_version=key_version, rng=rng
    )
    return json.dumps(fields, separators=(",", ":")).encode()


def malformed_kind(index: int, every: int) -> str | None:
    """The malformed kind of message number `index` (0-based) of a run, or None.

    Every `every`-th message (the every-th, 2*every-th, ...) is malformed, the
    kinds taken in turn from MALFORMED_KINDS. `every` <= 0: never.
    """
    if every <= 0 or (index + 1) % every:
        return None
    return MALFORMED_KINDS[((index + 1) // every - 1) % len(MALFORMED_KINDS)]


def make_malformed(
    kind: str,
    gateway_id: str,
    sensor_id: str,
    sensor_type: str,
    ts: dt.datetime,
    *,
    rng: random.Random | None = None,
) -> bytes:
    """A message the daemon must reject, of `kind` (one of MALFORMED_KINDS).

    It is published on the subject of `gateway_id`: `gateway_mismatch` names
    another gateway in the payload.
    """
    fields = envelope_fields(gateway_id, sensor_id, sensor_type, ts, rng=rng)
    if kind == "bad_json":
        return json.dumps(fields).encode()[:-7] + b"<<oops"
    if kind == "missing_field":
        del fields["authTag"]
    elif kind == "unknown_sensor_type":
        fields["sensorType"] = "radiation"
    elif kind == "bad_timestamp":
        fields["timestamp"] = "27/11/2026 08:03"
    elif kind == "gateway_mismatch":
        fields["gatewayId"] = f"{gateway_id}-impostor"
    else:
        raise ValueError(f"unknown malformed kind {kind!r}; have {MALFORMED_KINDS}")
    return json.dumps(fields, separators=(",", ":")).encode()


async def publish_burst(
    nc: NATS,
    count: int,
    tenants: int,
    gateways_per_tenant: int,
    *,
    chunk: int = 5000,
    rng: random.Random | None = None,
    start: dt.datetime | None = None,
) -> int:
    """Publish `count` valid envelopes, round-robin over the fleet; return the count.

    Core publishes, `chunk` at a time with a flush after each (the PING/PONG
    round trip is the back-pressure), so every message is with the server on
    return. Every envelope has its own (gateway, sensor, timestamp) key, which
    the daemon's dedup needs: the n-th carries `start` (default now) plus n
    microseconds. `nc` is a connected nats-py client.
    """
    fleet = make_fleet(tenants, tenants * gateways_per_tenant)
    rng = rng or random.Random()
    start = start or dt.datetime.now(dt.UTC)
    sent = 0
    while sent < count:
        n = min(chunk, count - sent)
        for i in range(sent, sent + n):
            gw = fleet[i % len(fleet)]
            sensor_id, sensor_type = gw.sensors[(i // len(fleet)) % len(gw.sensors)]
            body = make_envelope(
                gw.gateway_id, sensor_id, sensor_type, start + i * _MICROSECOND, rng=rng
            )
            await nc.publish(gw.subject, body)
        await nc.flush()
        sent += n
    return sent


class _WireClock:
    """Strictly increasing wall-clock timestamps, at least 1 µs apart.

    The daemon drops a row whose (tenant, gateway, sensor, time) it already
    has (redelivery dedup), so a simulator must never repeat a timestamp.
    """

    def __init__(self) -> None:
        self._last = dt.datetime.now(dt.UTC)

    def next(self) -> dt.datetime:
        self._last = max(dt.datetime.now(dt.UTC), self._last + _MICROSECOND)
        return self._last


class _SilenceSchedule:
    """Which gateways are silent when: cycle k starts at lead + k * 2 * seconds and
    silences a fresh random `fraction` of the fleet for `seconds`."""

    def __init__(
        self,
        fleet: Sequence[Gateway],
        fraction: float,
        seconds: float,
        lead: float,
        rng: random.Random,
    ) -> None:
        self._fleet = fleet
        self._count = round(max(0.0, min(1.0, fraction)) * len(fleet)) if seconds > 0 else 0
        self._seconds = seconds
        self._lead = lead
        self._rng = rng
        self._cycle = -1
        self.silent: frozenset[str] = frozenset()

    def update(self, elapsed: float) -> bool:
        """Advance to `elapsed` seconds; True if the silent set changed."""
        if self._count == 0 or elapsed < self._lead:
            return False
        cycle, into = divmod(elapsed - self._lead, 2 * self._seconds)
        if int(cycle) != self._cycle:
            self._cycle = int(cycle)
            chosen = self._rng.sample(list(self._fleet), self._count)
            self.silent = frozenset(gw.gateway_id for gw in chosen)
            return True
        if into >= self._seconds and self.silent:
            self.silent = frozenset()
            return True
        return False

    @property
    def cycles(self) -> int:
        return self._cycle + 1


async def run_simulation(
    nc: NATS,
    *,
    gateways: int = 50,
    tenants: int = 2,
    rate_per_s: float = 200.0,
    silent_fraction: float = 0.1,
    silent_seconds: float = 40.0,
    silent_lead_seconds: float = 10.0,
    malformed_every: int = 500,
    duration: float | None = None,
    stop_event: asyncio.Event | None = None,
    rng: random.Random | None = None,
) -> SimStats:
    """Publish telemetry for `gateways` gateways at `rate_per_s` messages per second.

    Message slots go round-robin over the fleet; a silent gateway's slot is
    skipped (counted in `skipped_silent`), so the rate drops while some are
    silent. After `silent_lead_seconds`, and again every 2 * `silent_seconds`,
    a fresh random `silent_fraction` of the fleet falls silent for
    `silent_seconds`. Every `malformed_every`-th slot is a malformed message
    (kinds in turn). Runs until `duration` seconds have passed (None or 0:
    forever) or `stop_event` is set; publish failures are counted, not raised.
    """
    fleet = make_fleet(tenants, gateways)
    if not fleet or rate_per_s <= 0:
        raise ValueError("need at least one gateway and a positive rate")
    rng = rng or random.Random()
    schedule = _SilenceSchedule(fleet, silent_fraction, silent_seconds, silent_lead_seconds, rng)
    stats = SimStats()
    clock = _WireClock()
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    slot = 0
    next_report = 10.0
    log.info("simulation_started", gateways=len(fleet), tenants=tenants, rate_per_s=rate_per_s)
    while not stop.is_set():
        elapsed = loop.time() - t0
        if duration and elapsed >= duration:
            break
        if schedule.update(elapsed):
            stats.silence_cycles = schedule.cycles
            if schedule.silent:
                log.info(
                    "gateways_silent", seconds=silent_seconds, gateways=sorted(schedule.silent)
                )
            else:
                log.info("gateways_back")
        due = min(int(elapsed * rate_per_s) - slot, _MAX_PER_STEP)
        for _ in range(max(due, 0)):
            ts = clock.next()
            await _publish_slot(nc, fleet, slot, schedule.silent, malformed_every, ts, rng, stats)
            slot += 1
        if elapsed >= next_report:
            next_report += 10.0
            log.info("simulation_progress", **stats.summary())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _PACE_S)
    with contextlib.suppress(Exception):
        await nc.flush(timeout=5)
    stats.seconds = loop.time() - t0
    log.info("simulation_summary", **stats.summary())
    return stats


async def _publish_slot(
    nc: NATS,
    fleet: Sequence[Gateway],
    slot: int,
    silent: frozenset[str],
    malformed_every: int,
    ts: dt.datetime,
    rng: random.Random,
    stats: SimStats,
) -> None:
    gw = fleet[slot % len(fleet)]
    if gw.gateway_id in silent:
        stats.skipped_silent += 1
        return
    sensor_id, sensor_type = gw.sensors[(slot // len(fleet)) % len(gw.sensors)]
    kind = malformed_kind(slot, malformed_every)
    if kind is None:
        body = make_envelope(gw.gateway_id, sensor_id, sensor_type, ts, rng=rng)
    else:
        body = make_malformed(kind, gw.gateway_id, sensor_id, sensor_type, ts, rng=rng)
    try:
        await nc.publish(gw.subject, body)
    except Exception as exc:  # disconnected, buffer full: count it and go on
        stats.publish_errors += 1
        if stats.publish_errors == 1 or stats.publish_errors % 1000 == 0:
            log.warning("publish_failed", errors=stats.publish_errors, error=str(exc))
        return
    stats.sent += 1
    if kind is None:
        stats.valid += 1
    else:
        stats.malformed[kind] += 1


def tls_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """Client TLS: trust `ca`, present `cert`/`key` (nats-server maps it to a user)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    return ctx


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m devstack.simulator",
        description="Publish simulated gateway telemetry to NATS over mutual TLS.",
    )
    p.add_argument("--url", required=True, help="e.g. tls://127.0.0.1:4222")
    p.add_argument("--ca", required=True, help="CA certificate file")
    p.add_argument("--cert", required=True, help="client certificate file")
    p.add_argument("--key", required=True, help="client key file")
    p.add_argument("--tls-hostname", help="server name to verify, if not the URL's host")
    p.add_argument("--gateways", type=int, default=50)
    p.add_argument("--tenants", type=int, default=2)
    p.add_argument("--rate", type=float, default=200.0, help="messages per second, all gateways")
    p.add_argument("--silent-fraction", type=float, default=0.1)
    p.add_argument("--silent-seconds", type=float, default=40.0)
    p.add_argument("--silent-lead", type=float, default=10.0, help="seconds before the first")
    p.add_argument("--malformed-every", type=int, default=500, help="0: never")
    p.add_argument("--duration", type=float, default=0.0, help="seconds; 0: until SIGINT/SIGTERM")
    p.add_argument("--burst", type=int, default=0, help="publish N valid messages and exit")
    p.add_argument("--seed", type=int, default=None)
    return p.parse_args(argv)


async def _amain(args: argparse.Namespace) -> int:
    import nats

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    rng = random.Random(args.seed)
    nc = await nats.connect(
        args.url,
        tls=tls_context(args.ca, args.cert, args.key),
        tls_hostname=args.tls_hostname,
        name="notip-gateway-simulator",
        connect_timeout=10,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
    )
    try:
        if args.burst > 0:
            per_tenant = max(1, args.gateways // max(1, args.tenants))
            t0 = time.perf_counter()
            sent = await publish_burst(nc, args.burst, args.tenants, per_tenant, rng=rng)
            secs = time.perf_counter() - t0
            log.info("burst_published", sent=sent, seconds=round(secs, 3), per_s=round(sent / secs))
        else:
            await run_simulation(
                nc,
                gateways=args.gateways,
                tenants=args.tenants,
                rate_per_s=args.rate,
                silent_fraction=args.silent_fraction,
                silent_seconds=args.silent_seconds,
                silent_lead_seconds=args.silent_lead,
                malformed_every=args.malformed_every,
                duration=args.duration or None,
                stop_event=stop,
                rng=rng,
            )
    finally:
        await nc.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = _parse_args(argv)
    setup_logging("INFO")
    # asyncio warns about eof_received() on every TLS close: noise, not news.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    try:
        return asyncio.run(_amain(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        log.error("simulator_failed", error=f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
