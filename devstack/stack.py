"""The complete local stack for a developer: `scripts/trio-run` (or `python -m` this module).

Brings up, in this order, and stops in the reverse order:

1. a nats-server with mutual TLS, certificate-mapped users and the platform's
   three streams (`natsd`), with a fresh PKI (`certs`);
2. a throwaway PostgreSQL (`postgres`);
3. the management-API stand-in (`mgmt_standin`): short alert timeouts (15 s for
   tenant-1, 20 s for tenant-2, 10 s for one gateway) and some gateways paused;
4. the gateway simulator (`simulator`): N gateways, some falling silent for a
   while and coming back, the occasional malformed message;
5. the daemon itself, `python -m notip_trio`, configured through its
   environment (docs/contract.md, Configuration) with a short grace period and tick.

It then prints where /metrics and /readyz are and, every few seconds, one
status line (`_summary`). SIGINT (Ctrl-C), SIGTERM or `--duration` stop the
daemon first (SIGTERM, then a bounded wait), then the simulator, the stand-in
and the servers; every child runs in its own process group and is killed with
its group if it does not stop in time, also when the stack fails.

The stack runs in a session of its own under a small supervisor
(`_children.run_supervised`), so the terminal's Ctrl-C reaches only the stack
and not the servers directly. State (PKI, nats store, logs, the daemon's
environment) lives in `--state-dir` (default `.trio-run/`, gitignored);
PostgreSQL's data lives in a temporary directory removed on exit.

One run at a time per state directory: a run holds an exclusive lock on
`<state-dir>/trio-run.lock` (with its PID in it) from before anything starts
until everything stopped; a second run on the same directory says which
process holds it and exits 1 without touching anything.

Exit status: 0 after a clean stop; 1 if a part failed or exited by itself, or
the state directory or the metrics port is in use by another run; 2 if
nats-server or PostgreSQL is not installed (with what to install).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from devstack import certs, js, mgmt_standin, natsd, postgres, simulator
from devstack._common import DevstackError, free_port, port_accepts, wait_until
from devstack._summary import Summary, readiness
from devstack.env import daemon_env
from devstack.proc import Child, child_env, exit_status, python_module, run_supervised

_SUPERVISED = "NOTIP_TRIO_STACK_SUPERVISED"
LOCK_FILE = "trio-run.lock"  # in the state directory; flock'ed for the run's lifetime
DAEMON_STOP_GRACE_S = 30.0  # the daemon drains (SHUTDOWN_DRAIN_MS, 10 s by default) first
CHILD_STOP_GRACE_S = 10.0
READY_TIMEOUT_S = 60.0
DAEMON_SETTINGS = {
    "HEARTBEAT_GRACE_PERIOD_MS": "5000",
    "HEARTBEAT_TICK_MS": "2000",
    "ALERT_CONFIG_REFRESH_MS": "30000",
}


class StopRequested(Exception):
    """A stop signal arrived while the stack was still starting."""


class _Signals:
    """SIGINT/SIGTERM/SIGHUP: raise StopRequested while starting, set a flag afterwards."""

    def __init__(self) -> None:
        self.stop_requested: str | None = None
        self.raising = True

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.stop_requested is None
        self.stop_requested = signal.Signals(signum).name
        if first and self.raising:
            self.raising = False
            raise StopRequested(self.stop_requested)


def missing_servers() -> list[tuple[str, str]]:
    """(what, Debian package) for each local server binary that is not installed."""
    missing = []
    if natsd.find_nats_server() is None:
        missing.append(("nats-server", "nats-server"))
    if postgres.find_pg_bindir() is None:
        missing.append(("PostgreSQL server (initdb, pg_ctl)", "postgresql"))
    return missing


def alert_configs(timeout_ms: int = 0) -> list[dict[str, object]]:
    """The stand-in's alert configs: short timeouts so silences show within a minute.

    `timeout_ms` > 0 puts that one timeout in every entry (for quick smoke runs).
    """
    return [
        {"tenant_id": simulator.tenant_name(0), "timeout_ms": timeout_ms or 15000},
        {"tenant_id": simulator.tenant_name(1), "timeout_ms": timeout_ms or 20000},
        {
            "tenant_id": simulator.tenant_name(1),
            "gateway_id": simulator.gateway_name(1, 0),
            "timeout_ms": timeout_ms or 10000,
        },
    ]


def paused_gateways(tenants: int, gateways: int) -> list[tuple[str, str]]:
    """Every ninth gateway of the simulated fleet from the third (so from every tenant)."""
    return [(g.tenant_id, g.gateway_id) for g in simulator.make_fleet(tenants, gateways)[2::9]]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/trio-run",
        description="Run notip-trio with a local nats-server, PostgreSQL, a management-API "
        "stand-in and a gateway simulator. Ctrl-C stops everything.",
        epilog="One run per state directory: a second run on a directory in use says which "
        "process holds it and exits 1. Exit status: 0 clean stop; 1 a part failed, or the "
        "state directory or metrics port is in use; 2 nats-server or PostgreSQL not installed.",
    )
    p.add_argument("--duration", type=float, default=0, help="stop after SECONDS (0: never)")
    p.add_argument("--metrics-port", type=int, default=9090, help="daemon's port (0: any free)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".trio-run"),
        help="default .trio-run; locked while a run uses it",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="daemons sharing the durables (one leads liveness); replica i serves "
        "/metrics on --metrics-port + i - 1",
    )
    p.add_argument("--gateways", type=int, default=40)
    p.add_argument("--tenants", type=int, default=2)
    p.add_argument("--rate", type=float, default=100.0, help="messages per second in all")
    p.add_argument("--silent-fraction", type=float, default=0.15)
    p.add_argument("--silent-seconds", type=float, default=30.0)
    p.add_argument("--malformed-every", type=int, default=250, help="0: none")
    p.add_argument("--summary-every", type=float, default=5.0, help="seconds between lines")
    p.add_argument(
        "--alert-timeout-ms",
        type=int,
        default=0,
        help="one timeout for every alert config (0: 15 s / 20 s / 10 s as shipped)",
    )
    p.add_argument(
        "--no-daemon",
        action="store_true",
        help="start everything but the daemon (run it yourself with the printed environment)",
    )
    args = p.parse_args(argv)
    if args.replicas < 1:
        p.error("--replicas must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: parse, then run the stack under a supervisor; return the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(args_list)  # --help and usage errors before anything starts
    if os.environ.get(_SUPERVISED) != "1":
        cmd = python_module("devstack.stack", *args_list)
        return run_supervised(cmd, child_env({_SUPERVISED: "1"}))
    # asyncio warns about eof_received() on every TLS close: noise, not news.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    signals = _Signals()
    signals.install()
    try:
        return run_stack(args, signals)
    except StopRequested as exc:
        print(f"trio-run: stopped by {exc} while starting", flush=True)
        return 0
    except DevstackError as exc:
        print(f"trio-run: {exc}", file=sys.stderr, flush=True)
        return 1


def run_stack(args: argparse.Namespace, signals: _Signals) -> int:
    """Start everything, report until stopped, stop everything in order; the exit status."""
    missing = missing_servers()
    if missing:
        names = ", ".join(what for what, _ in missing)
        packages = " ".join(pkg for _, pkg in missing)
        print(f"trio-run: not installed: {names}", file=sys.stderr)
        print(f"Install with:  apt-get install {packages}", file=sys.stderr)
        return 2
    state: Path = args.state_dir.resolve()
    with contextlib.ExitStack() as held:
        try:  # before anything else touches the directory or starts
            held.enter_context(state_lock(state))
        except StateDirInUse as exc:
            print(f"trio-run: {exc}", file=sys.stderr, flush=True)
            return 1
        return _run_locked(args, signals, state)


class StateDirInUse(DevstackError):
    """Another process holds the state directory's lock."""

    def __init__(self, state: Path, pid: int | None) -> None:
        self.state = state
        self.pid = pid
        holder = f"pid {pid}{_command_of(pid)}" if pid is not None else "pid unknown"
        super().__init__(
            f"state directory {state} is in use by another run ({holder}); "
            "stop that one or pass another --state-dir"
        )


@contextlib.contextmanager
def state_lock(state: Path) -> Iterator[None]:
    """Hold `state` for one run: an exclusive `flock` on `state/trio-run.lock`, our PID in it.

    Raises StateDirInUse (naming the holder's PID) at once if another process
    holds it. The kernel drops the lock when this process ends, however it ends
    (the descriptor is not inherited by children), so a killed run never leaves
    the directory locked.
    """
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateDirInUse(state, _read_pid(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _read_pid(fd: int) -> int | None:
    """The holder's PID, or None if it has not written it yet (or wrote garbage)."""
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None


def _command_of(pid: int) -> str:
    """`: <command line>` of a running process, or "" if it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    command = " ".join(raw.replace(b"\0", b" ").decode(errors="replace").split())  # one line
    return f": {command[:120]}" if command else ""


def _run_locked(args: argparse.Namespace, signals: _Signals, state: Path) -> int:
    if args.metrics_port:
        ports = [args.metrics_port + i for i in range(args.replicas)]
    else:
        ports = [free_port() for _ in range(args.replicas)]
    metrics_port = ports[0]
    busy = [p for p in ports if port_accepts("127.0.0.1", p)]
    if not args.no_daemon and busy:
        print(
            f"trio-run: port {busy[0]} is in use; pick another with --metrics-port "
            f"(replica i listens on it + i - 1)",
            file=sys.stderr,
        )
        return 1

    logs = state / "logs"
    _fresh_state(state)
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        print(f"trio-run: state in {state}", flush=True)
        pki = certs.make_pki(state / "pki")
        print("trio-run: starting nats-server ...", flush=True)
        nats = natsd.start_nats_server(pki, state / "nats")
        stack.callback(_stop_nats, nats)
        js.create_streams(nats)
        print("trio-run: starting PostgreSQL ...", flush=True)
        pg = postgres.start_postgres()
        stack.callback(_stop_postgres, pg, state)
        _remember_postgres(state, pg)

        standin = mgmt_standin.spawn_standin(
            nats,
            logs / "mgmt-standin.log",
            configs=alert_configs(args.alert_timeout_ms),
            paused=paused_gateways(args.tenants, args.gateways),
            timeout_s=READY_TIMEOUT_S,
        )
        stack.callback(_stop_child, standin, CHILD_STOP_GRACE_S)
        sim = _start_child(stack, "simulator", _simulator_argv(args, nats), logs)

        env = daemon_env(nats, pg, metrics_port=metrics_port, **DAEMON_SETTINGS)
        _write_env_file(state / "daemon.env", env)
        base = f"http://127.0.0.1:{metrics_port}"
        children = [standin, sim]
        if not args.no_daemon:
            for i, port in enumerate(ports, start=1):
                name = "daemon" if i == 1 else f"daemon-{i}"
                print(f"trio-run: starting the {name} (:{port}) ...", flush=True)
                daemon = _start_child(
                    stack,
                    name,
                    python_module("notip_trio"),
                    logs,
                    env={**env, "METRICS_ADDR": f"127.0.0.1:{port}"},
                    grace_s=DAEMON_STOP_GRACE_S,
                )
                children.append(daemon)
                _wait_for_daemon(daemon, f"http://127.0.0.1:{port}/readyz")

        signals.raising = False  # from here on a signal only asks the loop to stop
        if signals.stop_requested:
            return 0
        _print_banner(base, nats, pg, state, args)
        summary = Summary(
            f"{base}/metrics",
            f"{base}/readyz",
            pg.conninfo(),
            args.summary_every,
            replica_urls=tuple(f"http://127.0.0.1:{p}/metrics" for p in ports),
        )
        status = _report_until_stopped(args, signals, summary, children, t0)
        print("trio-run: stopping (daemon first) ...", flush=True)
    print("trio-run: stopped", flush=True)
    return status


def _report_until_stopped(
    args: argparse.Namespace,
    signals: _Signals,
    summary: Summary,
    children: list[Child],
    t0: float,
) -> int:
    next_line = time.monotonic()
    while True:
        now = time.monotonic()
        if signals.stop_requested:
            print(f"trio-run: {signals.stop_requested} received", flush=True)
            return 0
        if args.duration and now - t0 >= args.duration:
            print(f"trio-run: --duration {args.duration:g} s reached", flush=True)
            return 0
        for child in children:
            if not child.running:
                print(
                    f"trio-run: {child.name} exited by itself with status "
                    f"{exit_status(child.returncode or 0)}; last lines of {child.log_path}:\n"
                    f"{child.tail()}",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
        if now >= next_line:
            print(summary.line(now - t0), flush=True)
            next_line = now + args.summary_every
        time.sleep(0.2)


def _start_child(
    stack: contextlib.ExitStack,
    name: str,
    argv: list[str],
    logs: Path,
    *,
    env: dict[str, str] | None = None,
    grace_s: float = CHILD_STOP_GRACE_S,
) -> Child:
    """Spawn a child and register its stop (SIGTERM to its group, wait, SIGKILL)."""
    child = Child.spawn(name, argv, logs / f"{name}.log", env=env)
    stack.callback(_stop_child, child, grace_s)
    return child


def _stop_child(child: Child, grace_s: float) -> None:
    if not child.running:
        child.stop(0)
        return
    print(f"trio-run: stopping {child.name} ...", end=" ", flush=True)
    started = time.monotonic()
    code = exit_status(child.stop(grace_s))
    print(f"exit status {code} after {time.monotonic() - started:.1f} s", flush=True)


def _stop_nats(nats: natsd.NatsServer) -> None:
    print("trio-run: stopping nats-server", flush=True)
    with contextlib.suppress(DevstackError, OSError):
        nats.stop()
    nats.close()


def _stop_postgres(pg: postgres.PgServer, state: Path) -> None:
    print("trio-run: stopping PostgreSQL", flush=True)
    with contextlib.suppress(DevstackError):
        pg.stop(mode="fast")
    pg.close()
    (state / "postgres.json").unlink(missing_ok=True)


def _fresh_state(state: Path) -> None:
    """Empty the state directory, stopping a PostgreSQL a killed earlier run left behind."""
    _reap_stale_postgres(state)
    for sub in ("nats", "pki", "logs"):
        shutil.rmtree(state / sub, ignore_errors=True)
    (state / "logs").mkdir(parents=True)


def _remember_postgres(state: Path, pg: postgres.PgServer) -> None:
    from psycopg.conninfo import conninfo_to_dict

    base = conninfo_to_dict(pg.admin_conninfo).get("host")
    (state / "postgres.json").write_text(json.dumps({"base": base}), encoding="utf-8")


def _reap_stale_postgres(state: Path) -> None:
    record = state / "postgres.json"
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError, IndexError):
        base = Path(json.loads(record.read_text(encoding="utf-8"))["base"])
        if not base.parent.name.startswith("notip-pg-"):
            return  # not a directory start_postgres made: leave it alone
        pid_file = base / "data" / "postmaster.pid"
        if pid_file.is_file():
            pid = int(pid_file.read_text(encoding="utf-8").splitlines()[0])
            if b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes():
                print(f"trio-run: stopping a PostgreSQL left behind (pid {pid})", flush=True)
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown
                with contextlib.suppress(DevstackError):
                    wait_until(lambda: not pid_file.exists(), timeout=10, what="old PostgreSQL")
        shutil.rmtree(base.parent, ignore_errors=True)
    record.unlink(missing_ok=True)


def _tls_args(nats: natsd.NatsServer, identity: str) -> list[str]:
    client = nats.client(identity)
    return [
        "--url", nats.url, "--ca", str(client.ca), "--cert", str(client.cert),
        "--key", str(client.key),
    ]  # fmt: skip


def _simulator_argv(args: argparse.Namespace, nats: natsd.NatsServer) -> list[str]:
    return [
        *python_module("devstack.simulator"), *_tls_args(nats, "gateway-sim"),
        "--gateways", str(args.gateways), "--tenants", str(args.tenants),
        "--rate", str(args.rate), "--silent-fraction", str(args.silent_fraction),
        "--silent-seconds", str(args.silent_seconds),
        "--malformed-every", str(args.malformed_every),
    ]  # fmt: skip


def _wait_for_daemon(daemon: Child, readyz_url: str) -> None:
    """Until /readyz answers 200; DevstackError (with its log) if the daemon exits first."""

    def ready() -> bool:
        if not daemon.running:
            raise DevstackError(
                f"the daemon exited with status {exit_status(daemon.returncode or 0)}; "
                f"last lines of {daemon.log_path}:\n{daemon.tail()}"
            )
        return readiness(readyz_url) == "ready"

    try:
        wait_until(ready, timeout=READY_TIMEOUT_S, what="the daemon's /readyz", step=0.25)
    except DevstackError as exc:
        if "timed out" in str(exc):  # keep going: the status lines say what is wrong
            print(f"trio-run: {exc}; carrying on, see {daemon.log_path}", flush=True)
        else:
            raise


def _write_env_file(path: Path, env: dict[str, str]) -> None:
    lines = [f"{name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _print_banner(
    base: str,
    nats: natsd.NatsServer,
    pg: postgres.PgServer,
    state: Path,
    args: argparse.Namespace,
) -> None:
    logs = state / "logs"
    print(
        f"""
notip-trio dev stack is up
  metrics   {base}/metrics
  readiness {base}/readyz   (also /livez, /healthz)
  nats      {nats.url}   monitor {nats.monitor_url}   certs {state / "pki"}
  postgres  host={pg.host} port={pg.port} dbname={pg.dbname} user={pg.user} \
password file {pg.password_file}
  logs      {logs}/{{daemon,simulator,mgmt-standin}}.log (replica i: daemon-i.log)
  daemon environment: {state / "daemon.env"}""",
        flush=True,
    )
    if args.no_daemon:
        print(
            f"  --no-daemon: run it yourself with\n"
            f"    set -a; . {state / 'daemon.env'}; set +a; python -m notip_trio",
            flush=True,
        )
    stop = f"stops after {args.duration:g} s or on Ctrl-C" if args.duration else "Ctrl-C stops it"
    print(f"One status line every {args.summary_every:g} s; {stop}.\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
