"""Wire helpers: RFC 3339 formatting like Go's RFC3339Nano, subject shapes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from notip_trio.wire import (
    alert_subject,
    decommission_subject,
    format_rfc3339,
    offline_alert_msg_id,
    parse_alert_subject,
    parse_decommission_subject,
)


@pytest.mark.parametrize(
    ("when", "text"),
    [
        (datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC), "2024-05-01T12:00:00Z"),
        (datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC), "2024-05-01T12:00:00.5Z"),
        (datetime(2024, 5, 1, 12, 0, 0, 123, tzinfo=UTC), "2024-05-01T12:00:00.000123Z"),
        (
            datetime(2024, 5, 1, 14, 0, 0, 10, tzinfo=timezone(timedelta(hours=2))),
            "2024-05-01T12:00:00.00001Z",
        ),
    ],
)
def test_format_rfc3339(when: datetime, text: str) -> None:
    assert format_rfc3339(when) == text


def test_format_rfc3339_refuses_naive() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        format_rfc3339(datetime(2024, 5, 1))


def test_alert_subject_round_trip() -> None:
    assert alert_subject("t1") == "alert.t1.gw_offline"
    assert parse_alert_subject("alert.t1.gw_offline") == "t1"
    for bad in ("alert.t1", "alert..gw_offline", "alert.t1.gw_online", "x.t1.gw_offline"):
        assert parse_alert_subject(bad) is None
    for bad_tenant in ("", "a.b", "*", ">", "a b"):
        with pytest.raises(ValueError, match="invalid tenant"):
            alert_subject(bad_tenant)


def test_decommission_subject_round_trip() -> None:
    assert decommission_subject("t1", "gw1") == "gateway.decommissioned.t1.gw1"
    assert parse_decommission_subject("gateway.decommissioned.t1.gw1") == ("t1", "gw1")
    for bad in (
        "gateway.decommissioned.t1",
        "gateway.decommissioned.t1.gw1.extra",
        "gateway.decommissioned..gw1",
        "gateway.decommissioned.t1.*",
        "gateway.commissioned.t1.gw1",
        "telemetry.data.t1.gw1",
    ):
        assert parse_decommission_subject(bad) is None


def test_offline_alert_msg_id_is_deterministic() -> None:
    seen = datetime(2024, 5, 1, 12, 0, 1, 250000, tzinfo=UTC)
    assert offline_alert_msg_id("t1", "gw1", seen) == "gw_offline.t1.gw1.2024-05-01T12:00:01.25Z"
    assert offline_alert_msg_id("t1", "gw1", seen) == offline_alert_msg_id("t1", "gw1", seen)
    assert offline_alert_msg_id("t1", "gw1", seen) != offline_alert_msg_id(
        "t1", "gw1", seen + timedelta(seconds=1)
    )
