"""`notip-trio check`: the preflight (docs/contract.md Behaviour 11).

`__main__` loads the settings exactly as for the daemon (a bad one: exit 2
there) and hands them to `run_check`, which checks every dependency the daemon
needs, each within its own deadline, and prints one line per check::

    ok     <check>: <detail>
    FAILED <check>: <reason> (hint: <what to do>)
    info   <check>: <detail>                 worth knowing, never a failure
    skip   <check>: not checked (<why>)      it needs a check that failed

It changes nothing: no migration, no stream or consumer created, and the
database session is read-only. Returns 0 when nothing FAILED, 1 otherwise.

By role: `result.py` (one line), `nats.py` (NATS, the streams and durables,
the clock, the management API), `database.py` (PostgreSQL, the schema,
TimescaleDB and the telemetry lifecycle, the leader's lock session), `run.py`
(all of them in order). The NATS checks connect exactly as the daemon does
(`NatsBridge.connect`) but give up at the first TLS or authorization error
instead of retrying; durables are judged by `js.specs.durable_problems`, as at
start-up; the management API is asked through `MgmtClient`, one attempt. The
database facts are gathered in one worker thread (`db.facts.db_facts`) and
judged by pure functions; TimescaleDB by the daemon's own plan
(`db.schema.timescaledb_plan`), so the preflight reports what the daemon will
do. The pull specs come from `js.specs`, not from the task tree.
"""

from __future__ import annotations

# trio_asyncio must be imported before psycopg (docs/pitfalls.md).
import trio_asyncio  # noqa: F401  # isort: split

from .database import (
    LIFECYCLE,
    LockSessionFacts,
    check_database,
    describe_lifecycle,
    lifecycle_result,
    lock_session_facts,
    lock_session_result,
    schema_result,
    timescaledb_result,
)
from .nats import check_nats, clock_result, nats_hint, subject_matches
from .result import Result, Verdict
from .run import check_all, run_check

__all__ = [
    "LIFECYCLE",
    "LockSessionFacts",
    "Result",
    "Verdict",
    "check_all",
    "check_database",
    "check_nats",
    "clock_result",
    "describe_lifecycle",
    "lifecycle_result",
    "lock_session_facts",
    "lock_session_result",
    "nats_hint",
    "run_check",
    "schema_result",
    "subject_matches",
    "timescaledb_result",
]
