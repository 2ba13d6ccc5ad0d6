"""Ingest with several replicas on one durable (docs/contract.md Behaviour 9).

`run_replicas_bench(stack, messages, total, replicas)` pre-publishes the
message file, starts `replicas` daemons (their own processes, default
settings, one management-API stand-in) on the same durable and database, and
times from the first replica's `started` log line until every message is
committed (rows in the table) and acked (the durable drained). One replica
leads liveness; JetStream spreads the deliveries over all of them.

On this 2-core machine, nats-server, PostgreSQL and the replicas share the
same two cores, so a second replica cannot double anything here: the figure
says what a second process gains when the cores are already busy, not what
two pods on two nodes would do.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import DURABLE, BenchError
from benchmarks.daemon import _check_alive, _query, _started_at, _written
from benchmarks.stack import Stack
from devstack import js
from devstack._common import free_port
from devstack.mgmt_standin import spawn_standin
from devstack.proc import Child, python_module

POLL_S = 0.05


def run_replicas_bench(
    stack: Stack, messages: Path, total: int, replicas: int
) -> dict[str, Any]:
    logs = stack.workdir / "logs"
    logs.mkdir(exist_ok=True)
    with stack.nats(messages) as server, stack.database() as dbname:
        conninfo = stack.admin_conninfo(dbname)
        standin = spawn_standin(server, logs / f"mgmt-replicas-{replicas}.log")
        daemons: list[Child] = []
        urls: list[str] = []
        try:
            for i in range(replicas):
                log = logs / f"daemon-replicas-{replicas}-{i + 1}.log"
                log.unlink(missing_ok=True)
                addr = f"127.0.0.1:{free_port()}"
                env = stack.env(server, dbname, METRICS_ADDR=addr)
                urls.append(f"http://{addr}/metrics")
                argv = python_module("notip_trio")
                daemons.append(Child.spawn(f"daemon-{i + 1}", argv, log, env=env))
            t0 = min(_started_at(d, timeout_s=60) for d in daemons)
            deadline = time.monotonic() + 600
            while True:
                now = time.time()
                (rows,) = _query(conninfo, "SELECT count(*) FROM telemetry")
                if rows >= total and js.consumer_state(server, "TELEMETRY", DURABLE).drained:
                    break
                for d in daemons:
                    _check_alive(d)
                if time.monotonic() > deadline:
                    raise BenchError(f"{replicas} replicas: only {rows} of {total} rows")
                time.sleep(POLL_S)
            if rows != total:
                raise BenchError(f"{rows} rows committed, {total} expected")
            written = [_written(url) for url in urls]
        finally:
            for d in daemons:
                d.stop(30.0)
            standin.stop(10.0)
    return {
        "replicas": replicas,
        "msgs": total,
        "seconds": now - t0,
        "rate": total / (now - t0),
        "written_by_replica": written,
    }
