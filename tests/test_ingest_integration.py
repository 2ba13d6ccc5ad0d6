"""Ingest end to end, in-process, on real mTLS NATS and PostgreSQL.

Rules: servers come from the fixtures (port 0 style, throwaway); the daemon
runs in the test's nursery and stops through its `stop` event; every test has
an absolute hang guard; waits poll real state with a deadline, never fixed sleeps
as assertions.
"""

from __future__ import annotations

import datetime as dt
import json
import random

import psycopg
import pytest
import trio

from devstack import js as _js
from devstack import simulator
from devstack.env import daemon_env
from notip_trio.config import Settings
from notip_trio.metrics import Metrics

from .fix_daemon import daemon_settings, running_daemon, until
from .fix_servers import DURABLE, drained, telemetry_rows


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, **extra: str) -> Settings:
    base = {"HEARTBEAT_GRACE_PERIOD_MS": "600000", "SHUTDOWN_DRAIN_MS": "2000"}
    return daemon_settings(env, monkeypatch, **{**base, **extra})


def _envelopes(n: int, gateways: int, tenant: str = "t1", seed: int = 7) -> list[tuple[str, bytes]]:
    """`n` valid envelopes, distinct keys; times with microseconds, key versions 1-5."""
    rng = random.Random(seed)
    base = dt.datetime(2026, 11, 27, tzinfo=dt.UTC)
    out = []
    for i in range(n):
        gw = f"gw-{i % gateways:03d}"
        ts = base + dt.timedelta(seconds=i, microseconds=(i * 7919) % 1_000_000)
        body = simulator.make_envelope(
            gw, f"s{i % 3}", "temperature", ts, key_version=1 + i % 5, rng=rng
        )
        out.append((f"telemetry.data.{tenant}.{gw}", body))
    return out


async def test_10k_messages_exactly_once_blobs_identical(
    private_nats_server, pg_server, pg_database, monkeypatch
):
    env = daemon_env(private_nats_server, pg_server, pg_database.name)
    settings = _settings(env, monkeypatch)
    msgs = _envelopes(10_000, 100)
    metrics = Metrics()
    with trio.fail_after(120):
        async with running_daemon(settings, metrics):
            await trio.to_thread.run_sync(_js.publish, private_nats_server, msgs)
            await until(lambda: telemetry_rows(pg_database.conninfo) >= 10_000, 60, "10,000 rows")
            await until(
                lambda: (
                    _js.consumer_state(private_nats_server, "TELEMETRY", DURABLE).num_ack_pending
                    == 0
                ),
                30,
                "all acks",
            )
        state = await trio.to_thread.run_sync(
            _js.consumer_state, private_nats_server, "TELEMETRY", DURABLE
        )
    assert state.num_pending == 0
    assert state.num_ack_pending == 0
    assert telemetry_rows(pg_database.conninfo) == 10_000
    assert metrics.messages_written._value.get() == 10_000
    # Blobs byte-identical (Rule Zero), and every other field exact: each
    # published envelope is one row, to the microsecond and the key version.
    published = {}
    for subject, body in msgs:
        env = json.loads(body)
        time = dt.datetime.fromisoformat(env["timestamp"])
        key = (subject.split(".")[2], env["gatewayId"], env["sensorId"], time)
        published[key] = (
            env["sensorType"],
            env["encryptedData"],
            env["iv"],
            env["authTag"],
            env["keyVersion"],
        )
    assert len(published) == 10_000
    assert {k[3].microsecond for k in published} != {0}  # sub-second times are checked
    assert {v[4] for v in published.values()} == {1, 2, 3, 4, 5}
    with psycopg.connect(pg_database.conninfo) as conn:
        rows = conn.execute(
            "SELECT tenant_id, gateway_id, sensor_id, time, sensor_type, encrypted_data, iv,"
            " auth_tag, key_version FROM telemetry"
        ).fetchall()
    stored = {(t, gw, s, time): tuple(rest) for t, gw, s, time, *rest in rows}
    assert len(stored) == len(rows) == 10_000
    assert stored == {k: tuple(v) for k, v in published.items()}


async def test_redelivery_from_a_new_durable_adds_no_rows(
    private_nats_server, pg_server, pg_database, monkeypatch
):
    env = daemon_env(private_nats_server, pg_server, pg_database.name)
    msgs = _envelopes(10_000, 100, seed=11)
    await trio.to_thread.run_sync(_js.publish, private_nats_server, msgs)
    with trio.fail_after(120):
        for durable in ("first-durable", "second-durable"):
            settings = _settings(env, monkeypatch, NATS_CONSUMER_DURABLE_NAME=durable)
            metrics = Metrics()
            async with running_daemon(settings, metrics):
                # Poll our own counters first, consumer info only at the end: it is
                # not free for the server (BENCHMARKS.md, Findings).
                await until(
                    lambda d=durable, m=metrics: (
                        m.messages_written._value.get() + m.duplicates_skipped._value.get()
                        >= 10_000
                        and drained(private_nats_server, d)
                    ),
                    60,
                    f"{durable} to drain",
                )
            assert telemetry_rows(pg_database.conninfo) == 10_000
    # The second pass found every row already there.
    assert metrics.messages_written._value.get() == 0
    assert metrics.duplicates_skipped._value.get() == 10_000


BAD_CASES = [
    ("telemetry.data.t1.gw-1", b'{"gatewayId": "gw-1", ', "malformed_json"),
    ("telemetry.data.t1.gw-1", None, "missing_field"),
    ("telemetry.data.t1.gw-1", "keyVersion", "invalid_field"),
    ("telemetry.data.t1.gw-1", "sensorType", "unknown_sensor_type"),
    ("telemetry.data.t1.gw-1", "timestamp", "invalid_timestamp"),
    ("telemetry.data.t1", "subject", "bad_subject"),
    ("telemetry.data.t1.gw-2", "mismatch", "gateway_mismatch"),
    ("telemetry.data.t1.gw-1", "oversized", "oversized"),
]


MAX_BODY = 16384  # TELEMETRY_MAX_BODY_BYTES here
KEPT_BODY = 100  # REJECTED_BODY_MAX_BYTES here: a different cap, so each shows which cut


def _padded(body: bytes, size: int) -> bytes:
    """`body` (JSON) with trailing whitespace to exactly `size` bytes."""
    assert len(body) <= size
    return body + b" " * (size - len(body))


def _bad_body(kind: object) -> bytes:
    good = json.loads(
        simulator.make_envelope(
            "gw-1",
            "s-bad",
            "humidity",
            dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            rng=random.Random(1),
        )
    )
    if isinstance(kind, bytes):
        return kind
    if kind is None:
        del good["iv"]
    elif kind == "keyVersion":
        good["keyVersion"] = "1"
    elif kind == "sensorType":
        good["sensorType"] = "radiation"
    elif kind == "timestamp":
        good["timestamp"] = "yesterday"
    elif kind == "oversized":  # valid but for its size: one byte over the cap
        return _padded(json.dumps(good).encode(), MAX_BODY + 1)
    return json.dumps(good).encode()


async def test_each_bad_input_kept_once_terminated_and_good_ones_written(
    private_nats_server, pg_server, pg_database, monkeypatch
):
    env = daemon_env(private_nats_server, pg_server, pg_database.name)
    settings = _settings(
        env,
        monkeypatch,
        TELEMETRY_MAX_BODY_BYTES=str(MAX_BODY),
        REJECTED_BODY_MAX_BYTES=str(KEPT_BODY),
    )
    good = _envelopes(200, 10, seed=3)
    # A valid envelope of exactly the cap is accepted (the cap is inclusive).
    subject, body = good[-1]
    good[-1] = (subject, _padded(body, MAX_BODY))
    msgs: list[tuple[str, bytes]] = []
    for i, (subject, kind, _reason) in enumerate(BAD_CASES):
        msgs.extend(good[i * 20 : (i + 1) * 20])
        msgs.append((subject, _bad_body(kind)))
    msgs.extend(good[len(BAD_CASES) * 20 :])
    metrics = Metrics()
    with trio.fail_after(90):
        async with running_daemon(settings, metrics):
            await trio.to_thread.run_sync(_js.publish, private_nats_server, msgs)
            await until(
                lambda: (
                    telemetry_rows(pg_database.conninfo) >= 200 and drained(private_nats_server)
                ),
                60,
                "the consumer to drain",
            )
    assert telemetry_rows(pg_database.conninfo) == 200
    with psycopg.connect(pg_database.conninfo) as conn:
        kept = conn.execute(
            "SELECT reason, subject, body, body_length FROM telemetry_rejected ORDER BY id"
        ).fetchall()
        at_cap = conn.execute(
            "SELECT count(*) FROM telemetry WHERE encrypted_data = %s",
            (json.loads(good[-1][1])["encryptedData"],),
        ).fetchone()
    assert at_cap == (1,)
    assert sorted(r[0] for r in kept) == sorted(reason for *_, reason in BAD_CASES)
    for reason, subject, body, length in kept:
        case = next(c for c in BAD_CASES if c[2] == reason)
        sent = _bad_body(case[1])
        assert subject == case[0]
        assert length == len(sent)
        assert bytes(body) == sent[:KEPT_BODY]
    # The cut is REJECTED_BODY_MAX_BYTES's: shorter bodies whole, the rest at 100.
    lengths = {reason: (len(bytes(body)), length) for reason, _, body, length in kept}
    assert lengths["malformed_json"] == (22, 22)
    assert lengths["oversized"] == (KEPT_BODY, MAX_BODY + 1)
    assert all(len(bytes(body)) == KEPT_BODY for _, _, body, length in kept if length > KEPT_BODY)
    for *_, reason in BAD_CASES:
        assert metrics.message_parsing_errors.labels(reason)._value.get() == 1
    # Not redelivered: nothing pending, nothing awaiting ack, nothing redelivered.
    state = _js.consumer_state(private_nats_server, "TELEMETRY", DURABLE)
    assert (state.num_pending, state.num_ack_pending, state.num_redelivered) == (0, 0, 0)


async def test_database_outage_loses_nothing_and_daemon_recovers(
    private_nats_server, private_pg_server, monkeypatch
):
    db = private_pg_server.create_database()
    env = daemon_env(private_nats_server, private_pg_server, db.name)
    settings = _settings(env, monkeypatch)
    msgs = _envelopes(2_000, 50, seed=5)
    metrics = Metrics()
    with trio.fail_after(180):
        async with running_daemon(settings, metrics):
            await trio.to_thread.run_sync(private_pg_server.stop)
            await trio.to_thread.run_sync(_js.publish, private_nats_server, msgs)
            # One failed write, nak'd (0.5 s); then ingest waits for the database to
            # answer (tests/test_ingest_unit.py), the batch redelivered meanwhile.
            await until(lambda: metrics.write_errors._value.get() >= 1, 60, "a failed write")
            await trio.sleep(3)
            assert metrics.write_errors._value.get() == 1  # one per outage
            assert metrics.messages_written._value.get() == 0
            await trio.to_thread.run_sync(private_pg_server.start)
            await until(
                lambda: telemetry_rows(db.conninfo) >= 2_000, 90, "2,000 rows after the outage"
            )
            await until(
                lambda: drained(private_nats_server),
                60,
                "the consumer to drain",
            )
    assert telemetry_rows(db.conninfo) == 2_000
    assert metrics.messages_written._value.get() == 2_000  # each row written once
