"""The developer stack (`scripts/trio-run`): its pieces, and one short run of the whole.

The whole-stack run starts real servers and the daemon as subprocesses; it is
marked `integration` and skipped where nats-server or PostgreSQL is missing
(failed under CI=true, like the server fixtures).
Child processes get an absolute timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack import natsd, postgres, simulator, stack
from devstack._common import free_port
from devstack._summary import Summary, db_counts, readiness, scrape
from devstack.proc import Child, exit_status
from tests.fix_servers import require

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def test_missing_servers_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(natsd, "find_nats_server", lambda: None)
    monkeypatch.setattr(postgres, "find_pg_bindir", lambda: None)
    args = stack._parse_args(["--state-dir", str(tmp_path / "state")])
    assert stack.run_stack(args, stack._Signals()) == 2
    err = capsys.readouterr().err
    assert "apt-get install nats-server postgresql" in err
    assert not (tmp_path / "state").exists()  # nothing started, nothing made


def test_state_lock_admits_one_holder_and_names_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with stack.state_lock(state):
        assert (state / stack.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        # flock excludes a second open of the file, even in the same process
        with pytest.raises(stack.StateDirInUse) as info, stack.state_lock(state):
            pass
        assert info.value.pid == os.getpid()
        message = str(info.value)
        assert f"pid {os.getpid()}" in message
        assert str(state) in message
        assert "\n" not in message
    with stack.state_lock(state):  # released on exit
        pass
    assert (state / stack.LOCK_FILE).read_text() == ""


_HOLD_LOCK = """
import sys
from pathlib import Path
from devstack import stack
with stack.state_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_on_a_held_state_dir_exits_1_naming_the_holder(tmp_path: Path) -> None:
    """Issue 15: two trio-runs on one directory; the second must not touch the first's."""
    if stack.missing_servers():
        require(f"not installed: {stack.missing_servers()}")  # checked before the lock
    state = tmp_path / "state"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(state)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        (state / "logs").mkdir()
        (state / "logs" / "first-run.log").write_text("the first run's\n")
        second = subprocess.run(
            [sys.executable, "-m", "devstack.stack", "--state-dir", str(state),
             "--metrics-port", "0", "--duration", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1, f"{second.stdout}\n{second.stderr}"
        [line] = second.stderr.splitlines()
        assert line.startswith(f"trio-run: state directory {state} is in use")
        assert f"pid {holder.pid}: " in line  # with the holder's command line
        assert "--state-dir" in line
        assert second.stdout == ""  # nothing started
        assert sorted(p.name for p in state.iterdir()) == ["logs", stack.LOCK_FILE]
        assert (state / "logs" / "first-run.log").read_text() == "the first run's\n"
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own runs
        holder.wait(timeout=10)
    # The kernel dropped the dead holder's lock: the next run may have the directory.
    with stack.state_lock(state):
        pass


def test_only_the_missing_package_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(natsd, "find_nats_server", lambda: "/usr/sbin/nats-server")
    monkeypatch.setattr(postgres, "find_pg_bindir", lambda: None)
    assert stack.missing_servers() == [("PostgreSQL server (initdb, pg_ctl)", "postgresql")]


def test_stand_in_configuration_names_simulated_gateways() -> None:
    fleet = {(g.tenant_id, g.gateway_id) for g in simulator.make_fleet(2, 40)}
    tenants = {t for t, _ in fleet}
    configs = stack.alert_configs()
    assert {c["tenant_id"] for c in configs} <= tenants
    per_gateway = [(c["tenant_id"], c["gateway_id"]) for c in configs if "gateway_id" in c]
    assert len(per_gateway) == 1
    assert set(per_gateway) <= fleet
    paused = stack.paused_gateways(2, 40)
    assert paused
    assert set(paused) <= fleet
    assert {t for t, _ in paused} == tenants  # some of every tenant


def test_child_stop_takes_its_whole_group(tmp_path: Path) -> None:
    # a child that ignores SIGTERM and has a grandchild that does too
    script = "trap '' TERM; sleep 60 & echo $! > grandchild; wait"
    child = Child.spawn("stubborn", ["sh", "-c", script], tmp_path / "log", cwd=tmp_path)
    pid_file = tmp_path / "grandchild"
    try:
        deadline = time.monotonic() + 5
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline, "no grandchild"
            time.sleep(0.02)
        grandchild = int(pid_file.read_text())
        assert exit_status(child.stop(0.3)) == 128 + signal.SIGKILL
        deadline = time.monotonic() + 5
        while _alive(grandchild):
            assert time.monotonic() < deadline, "grandchild survived"
            time.sleep(0.02)
    finally:
        child.stop(0)
    assert not child.running
    assert child.stop(0) == -signal.SIGKILL  # idempotent


def test_child_stop_is_sigterm_first(tmp_path: Path) -> None:
    child = Child.spawn(
        "polite", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log"
    )
    assert exit_status(child.stop(10)) == 128 + signal.SIGTERM


def test_summary_line_with_nothing_running() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    assert scrape(f"{base}/metrics") is None
    assert readiness(f"{base}/readyz") == "down"
    conninfo = f"host=127.0.0.1 port={port} dbname=x user=x password=x"
    assert db_counts(conninfo) == (None, None)
    line = Summary(f"{base}/metrics", f"{base}/readyz", conninfo, 5).line(12.0)
    assert line.startswith("[    12s] down | rows - |")
    assert "alerts - |" in line


@pytest.mark.integration
@pytest.mark.slow
def test_whole_stack_runs_and_stops_cleanly(tmp_path: Path) -> None:
    if stack.missing_servers():
        require(f"not installed: {stack.missing_servers()}")
    state = tmp_path / "state"
    # Gateways fall silent 10 s in (the simulator's lead), for 10 s; a 4 s timeout
    # with 2 s ticks alerts within ~16 s, and they are back online from ~20 s.
    cmd = [
        sys.executable, "-m", "devstack.stack", "--duration", "28",
        "--metrics-port", "0", "--state-dir", str(state), "--summary-every", "2",
        "--gateways", "8", "--rate", "80", "--silent-seconds", "10",
        "--silent-fraction", "0.5", "--alert-timeout-ms", "4000", "--replicas", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    assert "notip-trio dev stack is up" in out
    status_lines = [line for line in out.splitlines() if line.startswith("[")]
    assert any(line.split("] ")[1].startswith("ready") for line in status_lines), out
    fields = [_status_fields(line) for line in status_lines]
    assert any(f["rows"] > 0 for f in fields), out
    # An offline alert, then the recovery: offline gateways back to zero after it.
    first_alert = next((i for i, f in enumerate(fields) if f["offline"] > 0), None)
    assert first_alert is not None, out
    assert fields[first_alert]["alerts"] >= 1, out
    assert any(f["offline"] == 0 for f in fields[first_alert + 1 :]), out
    # Two replicas share the durable; exactly one leads liveness.
    assert any("| leader r1 of 2 (2 up)" in line or "| leader r2 of 2 (2 up)" in line
               for line in status_lines), out  # fmt: skip
    assert "stopping daemon-2 ... exit status 0" in out
    assert "stopping daemon ... exit status 0" in out
    assert out.index("stopping daemon-2") < out.index("stopping daemon ...")
    assert out.index("stopping daemon") < out.index("stopping simulator")
    assert out.index("stopping mgmt-standin") < out.index("stopping PostgreSQL")
    assert out.rstrip().endswith("trio-run: stopped")
    # nothing left behind that this stack started
    leftovers = subprocess.run(
        ["pgrep", "-f", str(state)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert leftovers == []
    assert not (state / "postgres.json").exists()


def test_summary_sums_replicas_and_names_the_leader(tmp_path: Path) -> None:
    import http.server
    import threading

    pages = {
        1: "notip_consumer_messages_written_total 10\nnotip_consumer_liveness_leader 0\n"
        "notip_consumer_gateways_online 0\nnotip_consumer_consumer_pending_messages 5\n",
        2: "notip_consumer_messages_written_total 32\nnotip_consumer_liveness_leader 1\n"
        "notip_consumer_gateways_online 7\nnotip_consumer_consumer_pending_messages 2\n",
    }
    servers = []
    for i in (1, 2):
        body = pages[i].encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            page = body

            def do_GET(self) -> None:
                self.send_response(200)
                self.end_headers()
                self.wfile.write(self.page)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        urls = tuple(f"http://127.0.0.1:{s.server_address[1]}/metrics" for s in servers)
        conninfo = f"host=127.0.0.1 port={free_port()} dbname=x user=x password=x"
        line = Summary(urls[0], urls[0], conninfo, 5, replica_urls=urls).line(3.0)
    finally:
        for server in servers:
            server.shutdown()
    fields = _status_fields(line)
    assert (fields["written"], fields["online"], fields["lag"]) == (42, 7, 5)
    assert "| leader r2 of 2 (2 up)" in line


def _status_fields(line: str) -> dict[str, int]:
    """`[ 12s] ready | rows 1,072 (+481/5s) | ... | alerts 1 | online 39 | offline 1 | lag 0`."""
    out: dict[str, int] = {}
    for part in line.split("] ", 1)[1].split(" | ")[1:]:
        name, _, value = part.partition(" ")
        number = value.split(" ")[0].replace(",", "")
        if number.isdigit():
            out[name] = int(number)
    return out
