"""The NATS side of the preflight: the connection (mTLS), the streams, the
durables, the clock against the stream's, and the management API."""

from __future__ import annotations

import json
import time
from typing import Final

import nats.errors
import trio

from .. import wire
from ..config import Settings
from ..errors import MgmtError, NatsRequestError, StartupError
from ..horizon import parse_stream_time
from ..js.bridge import NatsBridge
from ..js.specs import PullSpec, decommission_spec, durable_problems, telemetry_spec
from ..mgmt import SUBJECT_LIST_CONFIGS, MgmtClient
from ..wire import STREAMS
from .result import STEP_TIMEOUT_S, Emit, Result

#: A subject each stream must capture: what the platform publishes, or the daemon does.
SAMPLE_SUBJECTS: Final = {
    "TELEMETRY": "telemetry.data.tenant.gateway",
    "ALERTS": "alert.tenant.gw_offline",
    "DECOMMISSION": "gateway.decommissioned.tenant.gateway",
}


# --- NATS --------------------------------------------------------------------


async def check_nats(settings: Settings, emit: Emit) -> None:
    specs = (telemetry_spec(settings), decommission_spec())
    try:
        with trio.fail_after(settings.nats_connect_timeout_s + 2):
            bridge = await NatsBridge.from_settings(settings, name="notip-trio-check", retry=False)
    except (StartupError, trio.TooSlowError) as exc:
        reason = str(exc).removeprefix("NATS: ") or "no connection"
        emit(Result("FAILED", "nats", reason, nats_hint(reason)))
        why = "no NATS connection"
        for name in STREAMS:
            emit(Result("skip", f"stream {name}", f"not checked ({why})"))
        for spec in specs:
            emit(Result("skip", _durable_check(spec), f"not checked ({why})"))
        emit(Result("skip", "management API", f"not checked ({why})"))
        return
    try:
        v = bridge.nc.connected_server_version
        emit(
            Result(
                "ok",
                "nats",
                f"connected to {settings.nats_url} with {settings.nats_tls_cert} "
                f"(nats-server {v.major}.{v.minor}.{v.patch})",
            )
        )
        subjects = {name: await _check_stream(bridge, name, emit) for name in STREAMS}
        for spec in specs:
            await _check_durable(bridge, spec, subjects.get(spec.stream), emit)
        await _check_clock(bridge, emit)
        await _check_mgmt(bridge, emit)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(STEP_TIMEOUT_S):
            await bridge.close()


def nats_hint(reason: str) -> str:
    """What to do about a failed NATS connection, from its reason."""
    r = reason.lower()
    if "hostname mismatch" in r or "ip address mismatch" in r:
        return "NATS_URL's host is not named in the server's certificate"
    if "certificate verify failed" in r:
        return "NATS_TLS_CA must be the CA that signed the server's certificate"
    if "authorization violation" in r:
        return (
            "the server trusts the certificate but maps it to no user: add its identity "
            "(SAN e-mail, SAN DNS or subject DN) to the server's authorization users"
        )
    if "alert" in r and ("certificate" in r or "unknown ca" in r):
        return "the server does not trust NATS_TLS_CERT: it must be issued by the server's CA"
    if "nats_tls_" in r:
        return "NATS_TLS_KEY must be the key of NATS_TLS_CERT; all three files PEM"
    if "broken pipe" in r or "connection reset" in r:
        # TLS 1.3: a refused client certificate often shows as the server hanging up.
        return (
            "the server hung up during the TLS handshake: it may not trust NATS_TLS_CERT "
            "(issued by another CA?)"
        )
    return "check NATS_URL (host, port, tls://) and that nats-server is reachable from here"


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: `*` is one token, a final `>` one or more."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return i == len(want) - 1 and len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(want) == len(got)


async def _check_stream(bridge: NatsBridge, name: str, emit: Emit) -> list[str] | None:
    check = f"stream {name}"
    try:
        with trio.fail_after(STEP_TIMEOUT_S):
            subjects = await bridge.stream_subjects(name)
    except trio.TooSlowError:
        emit(Result("FAILED", check, f"no answer within {STEP_TIMEOUT_S:g}s", _JS_HINT))
        return None
    except (nats.errors.Error, OSError) as exc:
        emit(Result("FAILED", check, f"{type(exc).__name__}: {exc}", _JS_HINT))
        return None
    if subjects is None:
        emit(
            Result(
                "FAILED",
                check,
                "missing",
                "the platform creates the streams; notip-trio never does",
            )
        )
        return None
    sample = SAMPLE_SUBJECTS[name]
    listed = ", ".join(subjects) or "none"
    if not any(subject_matches(p, sample) for p in subjects):
        emit(
            Result(
                "FAILED",
                check,
                f"its subjects ({listed}) do not capture {sample}",
                "the stream's subjects must follow docs/contract.md",
            )
        )
        return subjects
    emit(Result("ok", check, f"present (subjects {listed})"))
    return subjects


_JS_HINT: Final = "JetStream must be enabled for this client's account"


def _durable_check(spec: PullSpec) -> str:
    return f"durable {spec.durable}"


async def _check_durable(
    bridge: NatsBridge, spec: PullSpec, subjects: list[str] | None, emit: Emit
) -> None:
    check = _durable_check(spec)
    if subjects is None:
        emit(Result("skip", check, f"not checked (stream {spec.stream} unusable)"))
        return
    try:
        with trio.fail_after(STEP_TIMEOUT_S):
            cfg = await bridge.durable_config(spec.stream, spec.durable)
    except trio.TooSlowError:
        emit(Result("FAILED", check, f"no answer within {STEP_TIMEOUT_S:g}s", _JS_HINT))
        return
    except (nats.errors.Error, OSError) as exc:
        emit(Result("FAILED", check, f"{type(exc).__name__}: {exc}", _JS_HINT))
        return
    if cfg is None:
        emit(
            Result(
                "info",
                check,
                f"absent on {spec.stream}; the daemon creates it at start (pull, explicit ack)",
            )
        )
        return
    problems = durable_problems(
        cfg,
        subjects,
        stream=spec.stream,
        durable=spec.durable,
        max_ack_pending=spec.max_ack_pending,
    )
    # Refused ones stop the daemon; the redundant filter makes it crawl: both fail here.
    bad = [p for p in problems if p.refused or p.kind == "filter_redundant"]
    if bad:
        emit(
            Result(
                "FAILED",
                check,
                "; ".join(p.message for p in bad),
                "recreate it as a pull consumer with explicit ack and no filter, from its "
                "ack floor (README: Migrating from the Go service)",
            )
        )
        return
    filt = f"filter {cfg.filter_subject}" if cfg.filter_subject else "no filter"
    emit(Result("ok", check, f"pull consumer on {spec.stream}, explicit ack, {filt}"))
    for p in problems:
        emit(Result("info", check, p.message))


# --- clocks ------------------------------------------------------------------

#: Beyond this age the newest message says nothing useful about the clocks.
CLOCK_RECENT_S: Final = 60.0


async def _check_clock(bridge: NatsBridge, emit: Emit) -> None:
    """How this host's clock compares with the stream's (the NATS server's): the
    newest TELEMETRY message's stream time against this host's clock."""
    try:
        with trio.fail_after(STEP_TIMEOUT_S):
            raw = await bridge.request(f"$JS.API.STREAM.INFO.{wire.TELEMETRY_STREAM}", b"")
        state = json.loads(raw)["state"]
        newest = parse_stream_time(state["last_ts"])
        messages = int(state["messages"])
    except (trio.TooSlowError, NatsRequestError, KeyError, TypeError, ValueError) as exc:
        emit(Result("skip", "clock", f"stream time not read ({type(exc).__name__}: {exc})"))
        return
    emit(clock_result(time.time(), newest if messages else None))


def clock_result(now: float, newest: float | None) -> Result:
    """The `clock` line from this host's time and the newest message's stream time.

    Last-seen is stream time; the leader judges silence in stream time too and
    corrects for the skew it measures (docs/architecture.md, One clock), so
    this line informs, it does not fail: a skew of seconds means NTP is broken
    somewhere, and alerts' `timestamp` fields carry this host's time."""
    if newest is None:
        return Result("info", "clock", "TELEMETRY is empty: no stream time to compare with")
    age = now - newest
    if age < 0:
        return Result(
            "info",
            "clock",
            f"this host's clock is {-age:.3f} s behind the NATS server's "
            "(the newest message is from its future); the daemon corrects for it",
        )
    if age > CLOCK_RECENT_S:
        return Result(
            "info", "clock", f"the newest message is {age:.0f} s old: no recent one to compare with"
        )
    return Result(
        "info",
        "clock",
        f"the newest message is {age:.3f} s old by this host's clock: this host runs at most "
        "that far ahead of the NATS server; the daemon corrects for the skew it measures",
    )


async def _check_mgmt(bridge: NatsBridge, emit: Emit) -> None:
    client = MgmtClient(bridge, attempt_timeout_s=STEP_TIMEOUT_S, retry_delays_s=())
    try:
        configs = await client.list_alert_configs()
    except MgmtError as exc:
        emit(
            Result(
                "FAILED",
                "management API",
                str(exc),
                f"the management service must answer {SUBJECT_LIST_CONFIGS} on this NATS; "
                "without it there are no alert configs and no status updates",
            )
        )
        return
    emit(
        Result(
            "ok",
            "management API",
            f"{SUBJECT_LIST_CONFIGS} answered with {len(configs)} alert config(s)",
        )
    )
