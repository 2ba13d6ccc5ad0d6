"""`notip-trio check` reports what the daemon will do with TimescaleDB.

Both get the same server facts (the row of the probe query): the daemon's
migration decides through `decide_timescaledb` (hypertable, plain table with a
warning, or stop), the preflight judges `DbFacts` with `timescaledb_result`.
For every combination of facts they must agree.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest

from notip_trio.check import timescaledb_result
from notip_trio.db.facts import DbFacts
from notip_trio.db.schema import (
    TimescalePlan,
    TimescaleProbe,
    decide_timescaledb,
    probe_timescaledb,
)
from notip_trio.errors import DatabaseError


class _ProbeConn:
    """A connection that answers the probe query with one row, as the server would."""

    def __init__(self, row: tuple[object, ...]) -> None:
        self.row = row

    def execute(self, query: str, params: object = None) -> _ProbeConn:
        assert "pg_available_extensions" in query
        return self

    def fetchone(self) -> tuple[object, ...]:
        return self.row


# Every answer the probe can give: package installed, extension created, the
# preloaded loader seen, and shared_preload_libraries (None: not readable).
ROWS = list(
    itertools.product(
        (False, True),
        (False, True),
        (False, True),
        (None, "", "pg_stat_statements", "pg_stat_statements,timescaledb", "$libdir/timescaledb"),
    )
)


def _daemon(conn: Any, caplog: pytest.LogCaptureFixture) -> tuple[str, bool]:
    """What the daemon's migration does: its plan, and whether it warns."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="notip_trio.db.schema"):
        try:
            plan = decide_timescaledb(conn)
        except DatabaseError:
            return "stop", False
    warned = any(r.getMessage() == "timescaledb_not_preloaded" for r in caplog.records)
    return ("hypertable" if plan is TimescalePlan.HYPERTABLE else "plain"), warned


def _check(probe: TimescaleProbe, *, created_version: bool) -> tuple[str, str]:
    """What the preflight reports for the same facts: (status, detail)."""
    facts = DbFacts(
        user="notip",
        server_version="15.5",
        ssl=False,
        schema="public",
        can_create=True,
        timescale=probe,
        timescaledb_available="2.13.0" if probe.available else None,
        timescaledb_installed="2.13.0" if created_version else None,
    )
    result = timescaledb_result(facts)
    return result.status, result.detail


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_check_and_daemon_agree(row: tuple[object, ...], caplog: pytest.LogCaptureFixture) -> None:
    conn: Any = _ProbeConn(row)
    daemon, warned = _daemon(conn, caplog)
    probe = probe_timescaledb(conn)
    status, detail = _check(probe, created_version=probe.created)

    if daemon == "stop":
        assert status == "FAILED", detail
        assert "stops at start" in detail
    else:
        assert status == "info", detail
        if daemon == "hypertable":
            assert "hypertable" in detail
            assert "plain" not in detail
        else:
            assert "hypertable" not in detail
            assert "plain" in detail
    # The daemon warns exactly where check says it runs plain although TimescaleDB is there.
    assert warned == (status == "info" and "not preloaded" in detail)


@pytest.mark.parametrize(
    ("probe", "daemon"),
    [
        # The two cases in which the old preflight said otherwise (issue 18).
        (
            TimescaleProbe(available=True, created=False, loader_running=False, preload=None),
            "plain",
        ),
        (TimescaleProbe(available=True, created=True, loader_running=False, preload=""), "stop"),
    ],
)
def test_the_cases_check_used_to_get_wrong(probe: TimescaleProbe, daemon: str) -> None:
    status, detail = _check(probe, created_version=probe.created)
    if daemon == "plain":
        assert status == "info"
        assert "runs on plain PostgreSQL" in detail
    else:
        assert status == "FAILED"
        assert "hypertable" not in detail
