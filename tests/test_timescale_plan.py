"""The TimescaleDB decision (db.schema.timescaledb_plan): a pure function of what
the server reports. The real server's side is in test_storage_integration.py."""

from __future__ import annotations

import logging

import pytest

from notip_trio.db.schema import (
    TimescalePlan,
    TimescaleProbe,
    decide_timescaledb,
    preloads_timescaledb,
    timescaledb_plan,
)
from notip_trio.errors import DatabaseError


@pytest.mark.parametrize(
    ("preload", "listed"),
    [
        ("timescaledb", True),
        ("pg_stat_statements, timescaledb", True),
        ('"timescaledb",pg_stat_statements', True),
        ("$libdir/timescaledb", True),
        ("/usr/lib/postgresql/15/lib/timescaledb.so", True),
        ("", False),
        ("pg_stat_statements", False),
        ("timescaledb_toolkit", False),
        ("timescaledb-2.11.0", False),  # a versioned library is not the loader
        ("pg_timescaledb_fake", False),
    ],
)
def test_preload_list_names_the_loader(preload: str, listed: bool) -> None:
    assert preloads_timescaledb(preload) is listed


def _probe(
    available: bool, created: bool, loader: bool, preload: str | None = None
) -> TimescaleProbe:
    return TimescaleProbe(
        available=available, created=created, loader_running=loader, preload=preload
    )


@pytest.mark.parametrize(
    ("probe", "plan"),
    [
        # No TimescaleDB on the server at all.
        (_probe(False, False, False), TimescalePlan.PLAIN),
        (_probe(False, False, False, ""), TimescalePlan.PLAIN),
        # Installed and preloaded: seen by any role through the loader's setting...
        (_probe(True, False, True), TimescalePlan.HYPERTABLE),
        (_probe(True, True, True), TimescalePlan.HYPERTABLE),
        # ...or by a privileged role through shared_preload_libraries.
        (_probe(True, False, False, "pg_stat_statements,timescaledb"), TimescalePlan.HYPERTABLE),
        # Issue 15: installed, not preloaded, not created: CREATE EXTENSION would end
        # the connection with a FATAL. Run on plain PostgreSQL (and warn).
        (_probe(True, False, False), TimescalePlan.PLAIN_NOT_PRELOADED),
        (_probe(True, False, False, "pg_stat_statements"), TimescalePlan.PLAIN_NOT_PRELOADED),
        (_probe(True, False, False, ""), TimescalePlan.PLAIN_NOT_PRELOADED),
        # Created earlier, preload since removed: nothing can run there: stop.
        (_probe(True, True, False), TimescalePlan.STOP_NOT_PRELOADED),
        (_probe(True, True, False, "pg_stat_statements"), TimescalePlan.STOP_NOT_PRELOADED),
        (_probe(False, True, False), TimescalePlan.STOP_NOT_PRELOADED),
        # A loader with no extension files: nothing to create.
        (_probe(False, False, True), TimescalePlan.PLAIN),
    ],
)
def test_plan(probe: TimescaleProbe, plan: TimescalePlan) -> None:
    assert timescaledb_plan(probe) is plan


class _FakeConn:
    """Answers the probe with a fixed row and records every statement."""

    def __init__(self, row: tuple[object, ...]) -> None:
        self.row = row
        self.statements: list[str] = []

    def execute(self, query: str) -> _FakeConn:
        self.statements.append(query)
        return self

    def fetchone(self) -> tuple[object, ...]:
        return self.row


def test_installed_but_not_preloaded_runs_plain_with_one_warning_naming_the_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn = _FakeConn((True, False, False, None))  # the application role: no preload visible
    with caplog.at_level(logging.INFO, logger="notip_trio.db.schema"):
        plan = decide_timescaledb(conn)  # type: ignore[arg-type]
    assert plan is TimescalePlan.PLAIN_NOT_PRELOADED
    assert len(conn.statements) == 1  # the probe only: no CREATE EXTENSION
    assert "CREATE EXTENSION" not in conn.statements[0]
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "timescaledb_not_preloaded"
    assert "shared_preload_libraries = 'timescaledb'" in record.notip_ctx["detail"]
    assert "\n" not in record.notip_ctx["detail"]


def test_created_but_not_preloaded_stops_with_one_line_naming_the_setting() -> None:
    conn = _FakeConn((True, True, False, "pg_stat_statements"))
    with pytest.raises(DatabaseError) as info:
        decide_timescaledb(conn)  # type: ignore[arg-type]
    assert "shared_preload_libraries = 'timescaledb'" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("row", "plan"),
    [
        ((False, False, False, None), TimescalePlan.PLAIN),
        ((True, False, True, None), TimescalePlan.HYPERTABLE),
    ],
)
def test_the_other_plans_log_nothing(
    row: tuple[object, ...], plan: TimescalePlan, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="notip_trio.db.schema"):
        assert decide_timescaledb(_FakeConn(row)) is plan  # type: ignore[arg-type]
    assert caplog.records == []
