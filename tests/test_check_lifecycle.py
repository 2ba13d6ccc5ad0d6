"""`notip-trio check` on the telemetry lifecycle (check.lifecycle_result): facts
fed in, exact lines. The real servers' side is in test_check.py."""

from __future__ import annotations

import pytest

from notip_trio.check import lifecycle_result
from notip_trio.db.facts import DbFacts
from notip_trio.db.lifecycle import ORDERBY, SEGMENTBY, Lifecycle, LifecycleFacts, Policy
from notip_trio.db.schema import TimescaleProbe

D = 24
PLAIN = TimescaleProbe(available=False, created=False, loader_running=False, preload=None)
READY = TimescaleProbe(available=True, created=True, loader_running=True, preload=None)
AVAILABLE = TimescaleProbe(available=True, created=False, loader_running=True, preload=None)
BROKEN = TimescaleProbe(available=True, created=True, loader_running=False, preload=None)
DEFAULTS = Lifecycle(7 * D, None)


def _facts(
    probe: TimescaleProbe, lifecycle: LifecycleFacts | None = None, *, hypertable: bool = False
) -> DbFacts:
    return DbFacts(
        user="notip",
        server_version="15.5",
        ssl=False,
        schema="public",
        can_create=True,
        timescale=probe,
        hypertable=hypertable,
        lifecycle=lifecycle,
    )


def _hyper(
    *,
    enabled: bool = True,
    compression: Policy | None = None,
    retention: Policy | None = None,
    version: str = "2.13.0",
) -> DbFacts:
    lifecycle = LifecycleFacts(
        version=version,
        chunk_interval_s=86400.0,
        compression_enabled=enabled,
        segmentby=SEGMENTBY if enabled else (),
        orderby=ORDERBY if enabled else (),
        compression_policy=compression,
        retention_policy=retention,
    )
    return _facts(READY, lifecycle, hypertable=True)


HAVE = (
    "hypertable (TimescaleDB 2.13.0), chunk interval 1 day, compression on (segment by "
    "tenant_id, gateway_id, order by time DESC, sensor_id), compressed after 1 week"
)


@pytest.mark.parametrize(
    ("facts", "wanted", "line"),
    [
        (
            _facts(PLAIN),
            DEFAULTS,
            "info   telemetry lifecycle: plain table: uncompressed and kept for ever; "
            "TELEMETRY_COMPRESS_AFTER=1 week, TELEMETRY_RETENTION=off need TimescaleDB "
            "(the daemon says so once at start)",
        ),
        (
            _facts(PLAIN),
            Lifecycle(None, None),
            "ok     telemetry lifecycle: plain table, kept for ever as asked "
            "(TELEMETRY_COMPRESS_AFTER=off, TELEMETRY_RETENTION=off)",
        ),
        (
            _facts(AVAILABLE),
            Lifecycle(7 * D, 90 * D),
            "info   telemetry lifecycle: telemetry becomes a hypertable at start; the daemon "
            "then does: enable compression; add a compression policy after 1 week; add a "
            "retention policy after 90 days (TELEMETRY_COMPRESS_AFTER=1 week, "
            "TELEMETRY_RETENTION=90 days)",
        ),
        (
            _facts(BROKEN),
            DEFAULTS,
            "skip   telemetry lifecycle: not checked (timescaledb unusable, above)",
        ),
        (
            _hyper(compression=Policy(1000, 7 * 86400, ours=True)),
            DEFAULTS,
            f"ok     telemetry lifecycle: {HAVE}, no retention policy (kept for ever); as asked "
            "(TELEMETRY_COMPRESS_AFTER=1 week, TELEMETRY_RETENTION=off)",
        ),
        (
            _hyper(
                compression=Policy(1000, 7 * 86400, ours=True),
                retention=Policy(1001, 90 * 86400, ours=True),
            ),
            Lifecycle(7 * D, 30 * D),
            f"info   telemetry lifecycle: {HAVE}, dropped after 90 days; differs from "
            "TELEMETRY_COMPRESS_AFTER=1 week, TELEMETRY_RETENTION=30 days: the daemon will at "
            "start: remove the retention policy; add a retention policy after 30 days",
        ),
        (
            _hyper(
                compression=Policy(1000, 7 * 86400, ours=True),
                retention=Policy(1001, 400 * 86400, ours=False),
            ),
            DEFAULTS,
            f"info   telemetry lifecycle: {HAVE}, dropped after 400 days (policy made outside "
            "notip-trio); differs from TELEMETRY_COMPRESS_AFTER=1 week, TELEMETRY_RETENTION=off: "
            "a retention policy made outside notip-trio (job 1001, after 400 days) is left alone",
        ),
    ],
)
def test_lifecycle_lines(facts: DbFacts, wanted: Lifecycle, line: str) -> None:
    assert lifecycle_result(facts, wanted).line() == line


def test_a_fresh_hypertable_is_info_naming_what_the_daemon_adds() -> None:
    result = lifecycle_result(_hyper(enabled=False), DEFAULTS)
    assert result.status == "info"
    assert result.detail.startswith(
        "hypertable (TimescaleDB 2.13.0), chunk interval 1 day, compression off, "
        "no retention policy (kept for ever); differs from"
    )
    assert result.detail.endswith(
        "the daemon will at start: enable compression; add a compression policy after 1 week"
    )


def test_an_old_timescaledb_says_why_compression_stays_off() -> None:
    result = lifecycle_result(_hyper(enabled=False, version="2.10.1"), DEFAULTS)
    assert result.status == "info"
    assert "needs TimescaleDB 2.11.0 or later" in result.detail
    assert "the daemon will" not in result.detail


def test_never_a_failure() -> None:
    cases = [
        _facts(PLAIN),
        _facts(AVAILABLE),
        _hyper(),
        _hyper(compression=Policy(1, None, ours=False), retention=Policy(2, 86400, ours=False)),
    ]
    for facts in cases:
        for wanted in (DEFAULTS, Lifecycle(None, None), Lifecycle(1, 24)):
            assert lifecycle_result(facts, wanted).status in ("ok", "info")
