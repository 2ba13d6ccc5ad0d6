"""A stand-in for the management API's request-reply side, in plain asyncio nats-py.

It answers the three subjects of docs/contract.md so the daemon can run in the developer
stack and in integration tests without the real management service:

- `internal.mgmt.alert-configs.list` → the configured alert configs (a JSON
  array of `{tenant_id, gateway_id?, timeout_ms}`);
- `internal.mgmt.gateway.get-status` → `{gateway_id, state}`: the per-gateway
  override if set, else `paused` for paused gateways, else the last status
  reported through update-status, else `online`; for gateways in
  `invalid_status` a reply that breaks the contract (an unknown state), so the
  daemon's fail-open path can be exercised;
- `internal.mgmt.gateway.update-status` → `{success: true}` (or `false` for
  gateways listed in `fail_updates`), after recording the request.

Library use (asyncio, or from Trio through trio-asyncio)::

    standin = MgmtStandin(configs=[...], paused={("t1", "gw1")})
    await standin.start(nc)      # subscribes on the given nats-py client
    ... standin.updates ...      # every update-status request, in arrival order
    await standin.stop()

With `record` set (CLI: `--record FILE`), every get-status and update-status
request is also appended to that file as one JSON line
`{"subject": ..., "request": {...}}`, flushed at once: a test that runs the
stand-in as a subprocess reads what it received from there.

As its own process (the dev stack, process tests, the benchmark), started by
the toolkit's one launcher: `spawn_standin(nats, log_path, configs=..., paused=...)`
returns a `devstack.proc.Child` once the stand-in answers.

CLI (mTLS client)::

    python -m devstack.mgmt_standin --url tls://127.0.0.1:4222 \
        --ca ca.pem --cert client.pem --key client.key \
        [--configs configs.json] [--paused t1/gw1,t2/gw9] [--state t1/gw2=provisioning] \
        [--invalid-status-for t1/gw3,...] [--record requests.jsonl] [--delay-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import ssl
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack.natsd import NatsServer
from devstack.proc import Child, python_module
from notip_trio.log import get_logger, setup_logging
from notip_trio.mgmt import SUBJECT_GET_STATUS, SUBJECT_LIST_CONFIGS, SUBJECT_UPDATE_STATUS

log = get_logger("devstack.mgmt_standin")  # also when run as __main__

Key = tuple[str, str]


@dataclass(eq=False)
class MgmtStandin:
    """The stand-in's state; mutate the fields at any time, replies follow them.

    `delay_s` delays every reply (requests are answered concurrently, so a
    delay does not serialise them). `updates` and `status_requests` record the
    decoded requests in arrival order for tests.
    """

    configs: list[dict[str, Any]] = field(default_factory=list)
    paused: set[Key] = field(default_factory=set)
    states: dict[Key, str] = field(default_factory=dict)
    fail_updates: set[str] = field(default_factory=set)  # gateway ids answered success=false
    delay_s: float = 0.0
    invalid_status: set[Key] = field(default_factory=set)  # get-status answered invalidly
    record: Path | None = None  # JSON-lines file of get-status/update-status requests
    updates: list[dict[str, Any]] = field(default_factory=list)
    status_requests: list[dict[str, Any]] = field(default_factory=list)
    _reported: dict[str, str] = field(default_factory=dict)  # gateway_id -> last status
    _subs: list[Any] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, nc: Any) -> None:
        """Subscribe to the three subjects on a connected nats-py client."""
        for subject in (SUBJECT_LIST_CONFIGS, SUBJECT_GET_STATUS, SUBJECT_UPDATE_STATUS):
            self._subs.append(await nc.subscribe(subject, cb=self._on_request))
        await nc.flush()
        log.info("mgmt_standin_ready", configs=len(self.configs), paused=len(self.paused))

    async def stop(self) -> None:
        """Unsubscribe and wait for replies in progress to finish."""
        for sub in self._subs:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await sub.unsubscribe()
        self._subs.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def reported_status(self, gateway_id: str) -> str | None:
        """The last status reported for a gateway through update-status."""
        return self._reported.get(gateway_id)

    async def _on_request(self, msg: Any) -> None:
        # nats-py runs one subscription's callbacks one after another: answer
        # in a task of its own so a delay does not hold up the next request.
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Any) -> None:
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        try:
            reply = self.reply_for(msg.subject, bytes(msg.data))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("mgmt_standin_bad_request", subject=msg.subject, error=str(exc))
            return  # no reply: the caller times out, as with a broken service
        if msg.reply:
            await msg.respond(json.dumps(reply).encode())

    def reply_for(self, subject: str, data: bytes) -> Any:
        """The reply object for one request (pure; raises for malformed requests)."""
        if subject == SUBJECT_LIST_CONFIGS:
            return self.configs
        request = json.loads(data)
        if subject == SUBJECT_GET_STATUS:
            self.status_requests.append(request)
            self._record(subject, request)
            key = (str(request["tenant_id"]), str(request["gateway_id"]))
            if key in self.invalid_status:
                return {"gateway_id": key[1], "state": "no-such-state"}
            state = self.states.get(key)
            if state is None:
                state = "paused" if key in self.paused else self._reported.get(key[1], "online")
            return {"gateway_id": key[1], "state": state}
        if subject == SUBJECT_UPDATE_STATUS:
            gateway_id = str(request["gateway_id"])
            status = str(request["status"])
            if status not in ("online", "offline"):
                raise ValueError(f"bad status {status!r}")
            self.updates.append(request)
            self._record(subject, request)
            log.info(
                "mgmt_standin_update_status",
                gateway_id=gateway_id,
                status=status,
                last_seen_at=request.get("last_seen_at"),
            )
            if gateway_id in self.fail_updates:
                return {"success": False, "error": "refused by stand-in"}
            self._reported[gateway_id] = status
            return {"success": True}
        raise ValueError(f"unexpected subject {subject!r}")

    def _record(self, subject: str, request: Any) -> None:
        if self.record is not None:
            line = json.dumps({"subject": subject, "request": request}) + "\n"
            with self.record.open("a", encoding="utf-8") as f:
                f.write(line)


def _parse_keys(text: str) -> set[Key]:
    keys: set[Key] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        tenant, sep, gateway = item.partition("/")
        if not sep or not tenant or not gateway:
            raise argparse.ArgumentTypeError(f"expected tenant/gateway, got {item!r}")
        keys.add((tenant, gateway))
    return keys


def _parse_states(items: Iterable[str]) -> dict[Key, str]:
    states: dict[Key, str] = {}
    for item in items:
        target, sep, state = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected tenant/gateway=state, got {item!r}")
        (key,) = _parse_keys(target)
        states[key] = state
    return states


def _arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m devstack.mgmt_standin",
        description="Management-API stand-in answering notip-trio's request-reply subjects.",
    )
    p.add_argument("--url", required=True, help="NATS URL, e.g. tls://127.0.0.1:4222")
    p.add_argument("--ca", required=True, type=Path, help="CA certificate file")
    p.add_argument("--cert", required=True, type=Path, help="client certificate file")
    p.add_argument("--key", required=True, type=Path, help="client key file")
    p.add_argument("--tls-hostname", help="server name to verify, if not the URL's host")
    p.add_argument("--configs", type=Path, help="JSON file: array of alert configs")
    p.add_argument("--paused", type=_parse_keys, default=set(), help="tenant/gw,... paused")
    p.add_argument(
        "--state", action="append", default=[], help="tenant/gw=state override (repeatable)"
    )
    p.add_argument(
        "--invalid-status-for",
        type=_parse_keys,
        default=set(),
        help="tenant/gw,... whose get-status gets an invalid reply (unknown state)",
    )
    p.add_argument(
        "--record", type=Path, help="append get-status/update-status requests to FILE (JSON lines)"
    )
    p.add_argument("--delay-ms", type=int, default=0, help="artificial delay of every reply")
    return p


async def _serve(args: argparse.Namespace) -> None:
    import nats  # imported here: the library API above needs no NATS at import

    tls = ssl.create_default_context(cafile=str(args.ca))
    tls.load_cert_chain(str(args.cert), str(args.key))
    configs: list[dict[str, Any]] = []
    if args.configs is not None:
        configs = json.loads(args.configs.read_text(encoding="utf-8"))
        if not isinstance(configs, list):
            raise SystemExit(f"--configs: {args.configs} must hold a JSON array")
    standin = MgmtStandin(
        configs=configs,
        paused=args.paused,
        states=_parse_states(args.state),
        delay_s=args.delay_ms / 1000,
        invalid_status=args.invalid_status_for,
        record=args.record,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(
        args.url,
        tls=tls,
        tls_hostname=args.tls_hostname,
        name="mgmt-standin",
        max_reconnect_attempts=-1,
    )
    try:
        await standin.start(nc)
        await stop.wait()
        await standin.stop()
    finally:
        await nc.close()
    log.info("mgmt_standin_stopped", updates=len(standin.updates))


def _keys_arg(keys: Iterable[Key]) -> str:
    return ",".join(f"{t}/{g}" for t, g in keys)


def spawn_standin(
    nats: NatsServer,
    log_path: Path,
    *,
    configs: Sequence[Mapping[str, Any]] | None = None,
    paused: Iterable[Key] = (),
    invalid_status: Iterable[Key] = (),
    record: Path | None = None,
    delay_ms: int = 0,
    identity: str = "mgmt-api",
    timeout_s: float = 30.0,
) -> Child:
    """Run the stand-in as its own process (client `identity`); return once it answers.

    `configs` go to a JSON file beside `log_path`. The caller stops the child
    (`Child.stop`). Blocking: from Trio, call it through `trio.to_thread.run_sync`.
    """
    client = nats.client(identity)
    argv = python_module(
        "devstack.mgmt_standin",
        "--url", nats.url, "--ca", str(client.ca), "--cert", str(client.cert),
        "--key", str(client.key),
    )  # fmt: skip
    if configs is not None:
        configs_file = log_path.with_suffix(".configs.json")
        configs_file.write_text(json.dumps(list(configs), indent=2), encoding="utf-8")
        argv += ["--configs", str(configs_file)]
    if paused_arg := _keys_arg(paused):
        argv += ["--paused", paused_arg]
    if invalid_arg := _keys_arg(invalid_status):
        argv += ["--invalid-status-for", invalid_arg]
    if record is not None:
        argv += ["--record", str(record)]
    if delay_ms:
        argv += ["--delay-ms", str(delay_ms)]
    child = Child.spawn("mgmt-standin", argv, log_path)
    try:
        child.wait_for_line("mgmt_standin_ready", timeout_s=timeout_s)
    except BaseException:
        child.stop(grace_s=5)
        raise
    return child


def main(argv: Sequence[str] | None = None) -> int:
    args = _arg_parser().parse_args(argv)
    setup_logging("INFO")
    try:
        asyncio.run(_serve(args))
    except Exception as exc:  # a CLI tool: one line, whatever went wrong
        log.error("mgmt_standin_failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
