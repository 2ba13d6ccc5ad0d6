"""The telemetry lifecycle plan (db.lifecycle.plan_lifecycle): a pure function of
what the hypertable has and what the settings ask for. The TimescaleDB side is
in test_lifecycle_timescaledb.py (skipped where the extension is absent)."""

from __future__ import annotations

import logging

import pytest

from notip_trio.db.lifecycle import (
    ORDERBY,
    SEGMENTBY,
    Lifecycle,
    LifecycleFacts,
    LifecyclePlan,
    Op,
    Policy,
    Step,
    describe_hours,
    note_plain,
    plan_lifecycle,
    version_tuple,
)

D = 24  # hours a day
ENABLE = Step(Op.ENABLE_COMPRESSION)
RM_C = Step(Op.REMOVE_COMPRESSION_POLICY)
RM_R = Step(Op.REMOVE_RETENTION_POLICY)


def add_c(hours: int) -> Step:
    return Step(Op.ADD_COMPRESSION_POLICY, hours)


def add_r(hours: int) -> Step:
    return Step(Op.ADD_RETENTION_POLICY, hours)


def facts(
    *,
    version: str = "2.13.0",
    enabled: bool = True,
    segmentby: tuple[str, ...] = SEGMENTBY,
    orderby: tuple[str, ...] = ORDERBY,
    compression: Policy | None = None,
    retention: Policy | None = None,
) -> LifecycleFacts:
    return LifecycleFacts(
        version=version,
        chunk_interval_s=86400.0,
        compression_enabled=enabled,
        segmentby=segmentby if enabled else (),
        orderby=orderby if enabled else (),
        compression_policy=compression,
        retention_policy=retention,
    )


def ours(days: float) -> Policy:
    return Policy(job_id=1000, after_s=days * 86400, ours=True)


def theirs(days: float) -> Policy:
    return Policy(job_id=1001, after_s=days * 86400, ours=False)


@pytest.mark.parametrize(
    ("current", "wanted", "steps"),
    [
        # A fresh hypertable, the defaults: enable compression, add its policy.
        (facts(enabled=False), Lifecycle(7 * D, None), (ENABLE, add_c(7 * D))),
        # ... and a retention too.
        (facts(enabled=False), Lifecycle(7 * D, 90 * D), (ENABLE, add_c(7 * D), add_r(90 * D))),
        # Everything in place: nothing to do (the second start).
        (facts(compression=ours(7), retention=ours(90)), Lifecycle(7 * D, 90 * D), ()),
        # Equal though made by hand: kept, nothing to do.
        (facts(compression=theirs(7), retention=theirs(90)), Lifecycle(7 * D, 90 * D), ()),
        # A changed value replaces the policy, ours or not.
        (facts(compression=ours(7)), Lifecycle(14 * D, None), (RM_C, add_c(14 * D))),
        (facts(compression=theirs(7)), Lifecycle(12, None), (RM_C, add_c(12))),
        (
            facts(compression=ours(7), retention=ours(90)),
            Lifecycle(7 * D, 30 * D),
            (RM_R, add_r(30 * D)),
        ),
        # A policy whose setting is no interval (compress_created_before) is replaced.
        (
            facts(compression=Policy(1000, None, ours=False)),
            Lifecycle(7 * D, None),
            (RM_C, add_c(7 * D)),
        ),
        # Off removes what we made ...
        (facts(compression=ours(7), retention=ours(90)), Lifecycle(7 * D, None), (RM_R,)),
        (facts(compression=ours(7)), Lifecycle(None, None), (RM_C,)),
        # ... but never disables compression, and leaves a hand-made policy alone.
        (facts(retention=theirs(90)), Lifecycle(None, None), ()),
        (facts(compression=theirs(7)), Lifecycle(None, None), ()),
        # Compression off and nothing there: nothing enabled.
        (facts(enabled=False), Lifecycle(None, None), ()),
        (facts(enabled=False), Lifecycle(None, 365 * D), (add_r(365 * D),)),
        # Compression enabled by someone else with other columns: kept, policy still set.
        (
            facts(segmentby=("gateway_id",), orderby=("time DESC",)),
            Lifecycle(7 * D, None),
            (add_c(7 * D),),
        ),
    ],
)
def test_plan_steps(current: LifecycleFacts, wanted: Lifecycle, steps: tuple[Step, ...]) -> None:
    assert plan_lifecycle(current, wanted).steps == steps


def test_a_second_start_after_the_plan_has_nothing_to_do() -> None:
    wanted = Lifecycle(7 * D, 90 * D)
    assert plan_lifecycle(facts(compression=ours(7), retention=ours(90)), wanted) == LifecyclePlan(
        (), ()
    )


def test_notes_say_what_stays_different() -> None:
    plan = plan_lifecycle(facts(retention=theirs(90)), Lifecycle(None, None))
    assert plan.notes == (
        "a retention policy made outside notip-trio (job 1001, after 90 days) is left alone",
    )
    plan = plan_lifecycle(
        facts(segmentby=("gateway_id",), orderby=("time DESC",)), Lifecycle(7 * D, None)
    )
    assert plan.notes == (
        "compression was enabled with segment by (gateway_id) and order by (time DESC), "
        "not (tenant_id, gateway_id) and (time DESC, sensor_id); left as it is",
    )


@pytest.mark.parametrize("version", ["2.10.3", "2.9.0", "1.7.5"])
def test_compression_needs_2_11(version: str) -> None:
    """Before 2.11 an insert with ON CONFLICT into a compressed chunk is refused:
    the writer could not store a late row, so compression stays off."""
    plan = plan_lifecycle(facts(version=version, enabled=False), Lifecycle(7 * D, 90 * D))
    assert plan.steps == (add_r(90 * D),)
    assert plan.notes == (
        "TELEMETRY_COMPRESS_AFTER needs TimescaleDB 2.11.0 or later (the dedup key on "
        f"compressed chunks); {version} keeps telemetry uncompressed",
    )


@pytest.mark.parametrize(
    ("version", "expected"),
    [("2.11.0", (2, 11, 0)), ("2.13.1", (2, 13, 1)), ("2.18.0-dev", (2, 18, 0)), ("2.9", (2, 9))],
)
def test_version_tuple(version: str, expected: tuple[int, ...]) -> None:
    assert version_tuple(version) == expected


@pytest.mark.parametrize(
    ("hours", "text"),
    [
        (1, "1 hour"),
        (12, "12 hours"),
        (24, "1 day"),
        (36, "36 hours"),
        (168, "1 week"),
        (240, "10 days"),
    ],
)
def test_describe_hours(hours: int, text: str) -> None:
    assert describe_hours(hours) == text


def test_steps_describe_themselves() -> None:
    assert add_c(7 * D).describe() == "add a compression policy after 1 week"
    assert RM_R.describe() == "remove the retention policy"


@pytest.mark.parametrize(
    ("wanted", "level"),
    [
        (Lifecycle(7 * D, None), logging.INFO),  # the default: compression only
        (Lifecycle(None, 90 * D), logging.WARNING),  # rows expected dropped are kept
        (Lifecycle(7 * D, 90 * D), logging.WARNING),
        (Lifecycle(None, None), None),  # nothing asked: nothing said
    ],
)
def test_plain_postgresql_says_so_once(
    wanted: Lifecycle, level: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="notip_trio.db.lifecycle"):
        note_plain(wanted)
    lines = [r for r in caplog.records if r.getMessage() == "telemetry_lifecycle_needs_timescaledb"]
    if level is None:
        assert lines == []
    else:
        assert [r.levelno for r in lines] == [level]
