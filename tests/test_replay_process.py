"""`notip-trio replay` as its own process: beside a running daemon, its exit 1
line, and its progress line on a terminal (docs/contract.md Behaviour 13).

Rules: the daemon and the command are real processes (`spawn_daemon`,
`python -m notip_trio`) with exactly the variables of `daemon_env`; every wait
polls real state with a deadline; counts are exact.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from typing import Any

import pytest
import trio

from devstack import js as _js
from devstack._common import free_port
from devstack.env import daemon_env
from devstack.proc import PROJECT_ROOT, child_env

from .fix_daemon import spawn_daemon, until
from .fix_servers import drained, scalar, telemetry_rows
from .test_replay import _expected, _rows, _valid

pytestmark = pytest.mark.slow


def _replay_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "notip_trio", "replay", *args]


async def test_replay_beside_a_running_daemon_stores_every_row_once(
    clean_nats_server, pg_server, pg_database, tmp_path
):
    env = daemon_env(
        clean_nats_server, pg_server, pg_database.name, HEARTBEAT_GRACE_PERIOD_MS="600000"
    )
    first, second = _valid(4000), _valid(4000, seed=8, start=4000)
    conninfo = pg_database.conninfo
    with trio.fail_after(240), spawn_daemon(env, tmp_path / "daemon.log") as daemon:
        await daemon.wait_ready()
        await trio.to_thread.run_sync(_js.publish, clean_nats_server, first)
        done: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            # The second half arrives while the replay reads the first again.
            nursery.start_soon(trio.to_thread.run_sync, _js.publish, clean_nats_server, second)
            done["replay"] = await trio.run_process(
                _replay_argv("--from-seq", "1"),
                env=child_env(env),
                cwd=PROJECT_ROOT,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        await until(
            lambda: telemetry_rows(conninfo) >= 8000 and drained(clean_nats_server),
            90,
            "the daemon to drain",
        )
        assert daemon.running
    result = done["replay"]
    assert (result.returncode, result.stderr) == (0, b"")
    summary = json.loads(result.stdout)
    assert summary["complete"] is True
    assert summary["first_seq"] == 1
    # It read up to the stream's last message when it started: at least the first half.
    assert summary["last_seq"] == summary["messages"] >= 4000
    assert summary["new"] + summary["already_stored"] == summary["messages"]
    assert summary["rejected"] == 0
    assert telemetry_rows(conninfo) == 8000
    assert _rows(conninfo) == _expected(first + second)
    assert scalar(conninfo, "SELECT count(*) FROM telemetry_rejected") == 0


def test_the_real_process_exits_1_with_one_line_when_nats_is_unreachable(
    pg_server, pg_database, nats_server
):
    env = daemon_env(
        nats_server,
        pg_server,
        pg_database.name,
        NATS_URL=f"tls://127.0.0.1:{free_port()}",
        NATS_CONNECT_TIMEOUT_SECONDS="1",
    )
    done = subprocess.run(
        _replay_argv("--since", "1h"),
        env=child_env(env),
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("notip-trio replay: FAILED nats: ")
    assert json.loads(done.stdout)["complete"] is False


def test_progress_on_a_terminal(clean_nats_server, pg_server, pg_database):
    env = daemon_env(clean_nats_server, pg_server, pg_database.name)
    _js.publish(clean_nats_server, _valid(12_000))
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            _replay_argv("--from-seq", "1"),
            env=child_env(env),
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
        )
        os.close(slave)
        out, _ = proc.communicate(timeout=120)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert json.loads(out)["new"] == 12_000
    text = seen.decode()
    assert re.search(
        r"\rseq \d+/12000  [\d,]+ msg/s  new [\d,]+  already stored 0  rejected 0  left ~\S+", text
    ), text
    assert text.endswith("\r\x1b[K")  # the line is cleared before the summary
