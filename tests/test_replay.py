"""`notip-trio replay` and `notip-trio rejects [redrive]` (docs/contract.md Behaviour 13)
against a real nats-server and PostgreSQL.

Rules for this file: each command runs in-process through `main([...])` with
exactly the variables of `daemon_env` (nothing inherited), reading the JSON
summary it prints; messages are published straight into the TELEMETRY stream
(`devstack.js.publish`), so every count is exact. The tests that run the
daemon and the command as processes are in test_replay_process.py.
"""

from __future__ import annotations

# trio_asyncio must be imported before psycopg (NOTES.md).
import trio_asyncio  # isort: split

import datetime as dt
import json
import random
from typing import Annotated, Any, Literal

import msgspec
import psycopg
import pytest

from devstack import js as _js
from devstack import simulator
from devstack._common import free_port
from devstack.env import daemon_env
from notip_trio import envelope
from notip_trio.__main__ import main

from .fix_daemon import daemon_settings
from .fix_servers import scalar, telemetry_rows

assert trio_asyncio  # imported for its side effect (before psycopg)

BASE = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def _valid(n: int, *, tenant: str = "t1", seed: int = 5, start: int = 0) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    out = []
    for i in range(start, start + n):
        gw = f"gw-{i % 20:02d}"
        ts = BASE + dt.timedelta(seconds=i, microseconds=(i * 7919) % 1_000_000)
        body = simulator.make_envelope(gw, f"s{i % 3}", "temperature", ts, rng=rng)
        out.append((f"telemetry.data.{tenant}.{gw}", body))
    return out


def _radiation(i: int, *, gateway: str = "gw-r", subject_gateway: str | None = None) -> bytes:
    fields = simulator.envelope_fields(
        gateway,
        f"rad-{i}",
        "temperature",
        BASE + dt.timedelta(hours=1, seconds=i),
        rng=random.Random(i),
    )
    fields["sensorType"] = "radiation"
    return json.dumps(fields).encode()


BAD = [
    ("telemetry.data.t1.gw-00", b'{"gatewayId": '),  # malformed_json
    ("telemetry.data.t1.gw-01", _radiation(0, gateway="gw-01")),  # unknown_sensor_type
    ("telemetry.data.t1.gw-02", _valid(1, seed=99)[0][1]),  # gateway_mismatch (gw-00 inside)
]


def _cli(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: Any, *argv: str, **extra: str
) -> tuple[int, str, str]:
    """`notip-trio <argv>` in-process with exactly `env` (+ `extra`): (code, stdout, stderr)."""
    daemon_settings(env, monkeypatch, **extra)
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _summary(out: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    data: dict[str, Any] = json.loads(lines[0])
    return data


def _replay(env, monkeypatch, capsys, *argv: str, **extra: str) -> dict[str, Any]:
    code, out, err = _cli(env, monkeypatch, capsys, "replay", *argv, **extra)
    assert (code, err) == (0, ""), err
    return _summary(out)


def _rows(conninfo: str) -> set[tuple[Any, ...]]:
    with psycopg.connect(conninfo) as conn:
        return set(conn.execute("SELECT * FROM telemetry").fetchall())


def _expected(msgs: list[tuple[str, bytes]]) -> set[tuple[Any, ...]]:
    out = set()
    for subject, body in msgs:
        e = json.loads(body)
        out.add(
            (
                dt.datetime.fromisoformat(e["timestamp"]),
                subject.split(".")[2],
                e["gatewayId"],
                e["sensorId"],
                e["sensorType"],
                e["encryptedData"],
                e["iv"],
                e["authTag"],
                e["keyVersion"],
            )
        )
    return out


def _no_liveness(conninfo: str) -> None:
    assert scalar(conninfo, "SELECT count(*) FROM gateway_liveness") == 0
    assert scalar(conninfo, "SELECT count(*) FROM gateway_status_outbox") == 0


def test_restore_replay_stores_the_streams_rows_once_and_no_liveness(
    clean_nats_server, pg_server, pg_database, monkeypatch, capsys
):
    env = daemon_env(clean_nats_server, pg_server, pg_database.name)
    good = _valid(2000)
    msgs = good[:700] + BAD + good[700:]
    _js.publish(clean_nats_server, msgs)
    first = _replay(env, monkeypatch, capsys, "--from-seq", "1")
    assert {k: first[k] for k in ("complete", "messages", "new", "already_stored", "rejected")} == {
        "complete": True,
        "messages": 2003,
        "new": 2000,
        "already_stored": 0,
        "rejected": 3,
    }
    assert (first["first_seq"], first["last_seq"]) == (1, 2003)
    conninfo = pg_database.conninfo
    assert _rows(conninfo) == _expected(good)
    # The restore: every row lost, then the stream replayed.
    with psycopg.connect(conninfo) as conn:
        conn.execute("TRUNCATE telemetry")
    again = _replay(env, monkeypatch, capsys, "--from-seq", "1")
    assert (again["new"], again["already_stored"], again["rejected"]) == (2000, 0, 3)
    assert _rows(conninfo) == _expected(good)
    assert telemetry_rows(conninfo) == 2000  # no duplicate
    reasons = scalar(conninfo, "SELECT count(DISTINCT reason) FROM telemetry_rejected")
    assert (scalar(conninfo, "SELECT count(*) FROM telemetry_rejected"), reasons) == (3, 3)
    _no_liveness(conninfo)
    # The daemon's durable was never created: the replay reads through its own consumer.
    with pytest.raises(LookupError):
        _js.consumer_state(clean_nats_server, "TELEMETRY", "data-consumer-telemetry")


def test_a_window_replayed_twice_stores_nothing_new(
    clean_nats_server, pg_server, pg_database, monkeypatch, capsys
):
    env = daemon_env(clean_nats_server, pg_server, pg_database.name)
    _js.publish(clean_nats_server, _valid(1500) + BAD)
    one = _replay(env, monkeypatch, capsys, "--from-seq", "1")
    two = _replay(env, monkeypatch, capsys, "--from-seq", "1")
    assert (one["messages"], one["new"], one["already_stored"], one["rejected"]) == (
        1503,
        1500,
        0,
        3,
    )
    assert (two["messages"], two["new"], two["already_stored"], two["rejected"]) == (
        1503,
        0,
        1500,
        3,
    )
    assert telemetry_rows(pg_database.conninfo) == 1500
    assert scalar(pg_database.conninfo, "SELECT count(*) FROM telemetry_rejected") == 3


def test_windows_by_sequence_time_and_subject(
    clean_nats_server, pg_server, pg_database, monkeypatch, capsys
):
    env = daemon_env(clean_nats_server, pg_server, pg_database.name)
    phase_a = _valid(600, tenant="t1") + _valid(400, tenant="t2", seed=6)
    _js.publish(clean_nats_server, phase_a)  # sequences 1-1000
    boundary = dt.datetime.now(dt.UTC)
    phase_b = _valid(300, tenant="t1", seed=7, start=5000)
    _js.publish(clean_nats_server, phase_b)  # 1001-1300
    conninfo = pg_database.conninfo

    by_seq = _replay(env, monkeypatch, capsys, "--from-seq", "101", "--to-seq", "300")
    assert (by_seq["first_seq"], by_seq["last_seq"], by_seq["new"]) == (101, 300, 200)
    assert _rows(conninfo) == _expected(phase_a[100:300])

    stamp = boundary.isoformat()
    later = _replay(env, monkeypatch, capsys, "--since", stamp)
    assert (later["first_seq"], later["last_seq"], later["new"]) == (1001, 1300, 300)
    earlier = _replay(env, monkeypatch, capsys, "--since", "1d", "--until", stamp)
    assert (earlier["messages"], earlier["new"], earlier["already_stored"]) == (1000, 800, 200)
    assert _rows(conninfo) == _expected(phase_a + phase_b)

    with psycopg.connect(conninfo) as conn:
        conn.execute("TRUNCATE telemetry")
    t2 = _replay(
        env, monkeypatch, capsys, "--from-seq", "1", "--subject-filter", "telemetry.data.t2.>"
    )
    assert (t2["messages"], t2["new"], t2["first_seq"], t2["last_seq"]) == (400, 400, 601, 1000)
    assert _rows(conninfo) == _expected(phase_a[600:])
    # A window past the end is done at once.
    empty = _replay(env, monkeypatch, capsys, "--from-seq", "5000")
    assert (empty["complete"], empty["messages"]) == (True, 0)


# --- rejects and redrive ------------------------------------------------------------


class _WiderEnvelope(msgspec.Struct, rename="camel"):
    """A later release's envelope: one more sensor type (tests only)."""

    gateway_id: str
    sensor_id: str
    sensor_type: Literal[
        "temperature", "humidity", "movement", "pressure", "biometric", "radiation"
    ]
    timestamp: Annotated[dt.datetime, msgspec.Meta(tz=True)]
    key_version: int
    encrypted_data: str
    iv: str
    auth_tag: str


def _accept_radiation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envelope, "_decoder", msgspec.json.Decoder(_WiderEnvelope, strict=True))


def _kept(conninfo: str) -> list[tuple[str, str]]:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute("SELECT subject, reason FROM telemetry_rejected ORDER BY id").fetchall()
    return [(str(s), str(r)) for s, r in rows]


def test_rejects_counts_and_redrive_after_a_release_accepts_a_new_sensor_type(
    clean_nats_server, pg_server, pg_database, monkeypatch, capsys
):
    env = daemon_env(clean_nats_server, pg_server, pg_database.name)
    radiation = [
        (f"telemetry.data.t1.gw-r{i}", _radiation(i, gateway=f"gw-r{i}")) for i in range(20)
    ]
    # Radiation *and* naming another gateway: valid sensor now, still rejected.
    mismatch = [("telemetry.data.t1.gw-x", _radiation(99, gateway="gw-y"))]
    malformed = [(f"telemetry.data.t1.gw-m{i}", b"{not json") for i in range(5)]
    _js.publish(clean_nats_server, _valid(50) + radiation + mismatch + malformed)
    conninfo = pg_database.conninfo
    _replay(env, monkeypatch, capsys, "--from-seq", "1")
    assert telemetry_rows(conninfo) == 50

    code, out, err = _cli(env, monkeypatch, capsys, "rejects")
    assert (code, err) == (0, "")
    today = dt.datetime.now(dt.UTC).date().isoformat()
    lines = out.splitlines()
    assert lines[0].split() == ["day", "reason", "count"]
    assert [line.split() for line in lines[1:3]] == [
        [today, "malformed_json", "5"],
        [today, "unknown_sensor_type", "21"],
    ]
    assert lines[-1].split() == ["total", "26"]

    # This release: nothing is valid yet, nothing moves.
    code, out, err = _cli(env, monkeypatch, capsys, "rejects", "redrive")
    same = _summary(out)
    assert (code, err) == (0, "")
    assert (same["examined"], same["stored"], same["removed"], same["still_rejected"]) == (
        26,
        0,
        0,
        26,
    )
    assert same["reason_changed"] == 0

    # A release that accepts "radiation" (the production set is unchanged).
    _accept_radiation(monkeypatch)
    code, out, err = _cli(
        env, monkeypatch, capsys, "rejects", "redrive", "--reason", "unknown_sensor_type"
    )
    done = _summary(out)
    assert (code, err) == (0, "")
    assert {
        k: done[k] for k in ("complete", "examined", "stored", "already_stored", "removed")
    } == {
        "complete": True,
        "examined": 21,
        "stored": 20,
        "already_stored": 0,
        "removed": 20,
    }
    assert (done["still_rejected"], done["reason_changed"], done["read_from_stream"]) == (1, 1, 0)
    assert telemetry_rows(conninfo) == 70
    assert _rows(conninfo) == _expected(_valid(50) + radiation)
    assert sorted(_kept(conninfo)) == sorted(
        [("telemetry.data.t1.gw-x", "gateway_mismatch")]
        + [(s, "malformed_json") for s, _ in malformed]
    )
    # Redriven twice: nothing left to do for that reason.
    code, out, _ = _cli(
        env, monkeypatch, capsys, "rejects", "redrive", "--reason", "unknown_sensor_type"
    )
    assert (_summary(out)["examined"], telemetry_rows(conninfo)) == (0, 70)
    _no_liveness(conninfo)
    assert envelope.SENSOR_TYPES == ("temperature", "humidity", "movement", "pressure", "biometric")


def test_redrive_reads_a_cut_body_again_from_the_stream(
    clean_nats_server, pg_server, pg_database, monkeypatch, capsys
):
    env = daemon_env(clean_nats_server, pg_server, pg_database.name)
    msgs = [(f"telemetry.data.t1.gw-c{i}", _radiation(i, gateway=f"gw-c{i}")) for i in range(3)]
    assert all(len(body) > 100 for _, body in msgs)
    _js.publish(clean_nats_server, msgs)  # sequences 1-3
    conninfo = pg_database.conninfo
    kept_max = {"REJECTED_BODY_MAX_BYTES": "100"}
    summary = _replay(env, monkeypatch, capsys, "--from-seq", "1", **kept_max)
    assert summary["rejected"] == 3
    assert scalar(conninfo, "SELECT count(*) FROM telemetry_rejected WHERE length(body) = 100") == 3

    async def drop(nc: Any) -> None:
        await nc.jetstream().delete_msg("TELEMETRY", 2)

    _js.run_nats(clean_nats_server, drop)  # the second one is gone from the stream
    _accept_radiation(monkeypatch)
    code, out, err = _cli(env, monkeypatch, capsys, "rejects", "redrive", **kept_max)
    done = _summary(out)
    assert (code, err) == (0, "")
    assert {k: done[k] for k in ("examined", "read_from_stream", "cut_and_gone", "stored")} == {
        "examined": 3,
        "read_from_stream": 2,
        "cut_and_gone": 1,
        "stored": 2,
    }
    assert (done["removed"], done["still_rejected"]) == (2, 1)
    assert _rows(conninfo) == _expected([msgs[0], msgs[2]])
    assert _kept(conninfo) == [("telemetry.data.t1.gw-c1", "unknown_sensor_type")]


# --- exit codes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["replay"], "one of the arguments --from-seq --since is required"),
        (["replay", "--from-seq", "1", "--since", "1h"], "not allowed with argument"),
        (["replay", "--from-seq", "5", "--to-seq", "3"], "--to-seq must not be below --from-seq"),
        (["replay", "--from-seq", "0"], "--from-seq must be 1 or more"),
        (["replay", "--since", "2026-05-01T12:00:00"], "has no time zone"),
        (["replay", "--since", "yesterday"], "not a time"),
        (["replay", "--since", "2h", "--until", "3h"], "--until must be after --since"),
        (["replay", "--from-seq", "1", "--subject-filter", "alert.>"], "not a telemetry subject"),
        (["rejects", "redrive", "--since", "soon"], "not a time"),
    ],
)
def test_bad_arguments_exit_2_before_reading_settings(
    argv: list[str], needle: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    for key in ("NATS_URL", "DB_HOST"):
        monkeypatch.delenv(key, raising=False)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: notip-trio")
    assert needle in err.splitlines()[-1]


def test_dependency_errors_exit_1_with_one_line(
    clean_nats_server, pg_server, pg_database, monkeypatch, capsys
):
    env = daemon_env(clean_nats_server, pg_server, pg_database.name)
    no_nats = {"NATS_URL": f"tls://127.0.0.1:{free_port()}", "NATS_CONNECT_TIMEOUT_SECONDS": "1"}
    code, out, err = _cli(env, monkeypatch, capsys, "replay", "--from-seq", "1", **no_nats)
    assert code == 1
    assert len(err.splitlines()) == 1
    assert err.startswith("notip-trio replay: FAILED nats: ")
    assert "(hint: check NATS_URL" in err
    partial = _summary(out)
    assert (partial["complete"], partial["messages"], partial["resume_from_seq"]) == (False, 0, 1)

    no_pg = {"DB_PORT": str(free_port())}
    for argv, prefix in (
        (["replay", "--since", "1h"], "notip-trio replay: FAILED postgres: "),
        (["rejects"], "notip-trio rejects: FAILED postgres: "),
        (["rejects", "redrive"], "notip-trio rejects redrive: FAILED postgres: "),
    ):
        code, out, err = _cli(env, monkeypatch, capsys, *argv, **no_pg)
        assert code == 1, argv
        assert len(err.splitlines()) == 1, err
        assert err.startswith(prefix), err
        assert "(hint: check DB_HOST and DB_PORT" in err
