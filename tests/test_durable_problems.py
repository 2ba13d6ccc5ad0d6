"""`durable_problems`: how the daemon's start-up and `notip-trio check` judge a durable."""

from __future__ import annotations

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from notip_trio.js.specs import durable_problems

SUBJECTS = ["telemetry.data.>"]


def _judge(cfg: ConsumerConfig, wanted: int = 1000) -> list[tuple[str, bool]]:
    problems = durable_problems(
        cfg, SUBJECTS, stream="TELEMETRY", durable="d", max_ack_pending=wanted
    )
    for p in problems:
        assert "\n" not in p.message
        assert "durable consumer d on stream TELEMETRY" in p.message
    return [(p.kind, p.refused) for p in problems]


def test_the_durable_the_daemon_creates_has_no_problem() -> None:
    cfg = ConsumerConfig(durable_name="d", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=5000)
    assert _judge(cfg) == []


def test_a_narrower_filter_is_fine() -> None:
    cfg = ConsumerConfig(
        durable_name="d", ack_policy=AckPolicy.EXPLICIT, filter_subject="telemetry.data.t1.>"
    )
    assert _judge(cfg) == []


def test_push_and_non_explicit_ack_are_refused() -> None:
    cfg = ConsumerConfig(durable_name="d", deliver_subject="go.push", ack_policy=AckPolicy.NONE)
    assert _judge(cfg) == [("push", True), ("ack_policy", True)]


@pytest.mark.parametrize("policy", [AckPolicy.NONE, AckPolicy.ALL])
def test_ack_policy_other_than_explicit_is_refused(policy: AckPolicy) -> None:
    cfg = ConsumerConfig(durable_name="d", ack_policy=policy)
    assert _judge(cfg) == [("ack_policy", True)]


def test_filter_equal_to_the_stream_subjects_is_harmful_but_not_refused() -> None:
    cfg = ConsumerConfig(
        durable_name="d", ack_policy=AckPolicy.EXPLICIT, filter_subject="telemetry.data.>"
    )
    problems = durable_problems(
        cfg, SUBJECTS, stream="TELEMETRY", durable="d", max_ack_pending=1000
    )
    assert [(p.kind, p.refused) for p in problems] == [("filter_redundant", False)]
    assert problems[0].event == "consumer_filter_redundant"
    assert problems[0].context["filter_subject"] == "telemetry.data.>"


def test_low_max_ack_pending_is_reported_with_both_numbers() -> None:
    cfg = ConsumerConfig(durable_name="d", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=500)
    problems = durable_problems(
        cfg, SUBJECTS, stream="TELEMETRY", durable="d", max_ack_pending=7000
    )
    assert [(p.kind, p.refused) for p in problems] == [("max_ack_pending_low", False)]
    assert problems[0].context == {"durable": "d", "max_ack_pending": 500, "wanted": 7000}
    assert "500" in problems[0].message
    assert "7000" in problems[0].message
