"""A throwaway nats-server: JetStream, mutual TLS, certificate-mapped users.

`start_nats_server(pki, workdir)` writes a config and starts nats-server on a
free 127.0.0.1 port and returns a running `NatsServer`. The server:

- requires TLS with a client certificate from the PKI's CA (`verify: true`) and
  maps it to a user by its SAN e-mail (`verify_and_map: true`); the users are
  the identities of `pki.clients`, each allowed to publish and subscribe to
  everything. Any other certificate is refused.
- runs JetStream with a file store under the work directory, so streams and
  messages survive `restart()`, which keeps the same port.
- serves monitoring (`/healthz`, `/varz`, `/jsz`) on `monitor_url`.

The platform's three streams are made by `devstack.js.create_streams`
(`notip_trio.wire.STREAMS`); the daemon never creates them itself (docs/contract.md).
"""

from __future__ import annotations

import atexit
import json
import shutil
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from devstack._common import (
    DevstackError,
    die_with_parent,
    free_port,
    log_tail,
    wait_until,
)
from devstack.certs import ClientCert, Pki

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


def find_nats_server() -> str | None:
    """Path of the nats-server binary on PATH (or /usr/sbin), None if absent."""
    return shutil.which("nats-server") or shutil.which(
        "nats-server", path="/usr/sbin:/usr/local/bin"
    )


@dataclass(eq=False)
class NatsServer:
    """A nats-server subprocess. `url` is stable across stop/start/restart.

    Methods block (subprocess and socket waits with deadlines); from Trio call
    them through `trio.to_thread.run_sync`.
    """

    binary: str
    pki: Pki
    workdir: Path
    port: int
    monitor_port: int
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)
    _owns_workdir: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def config_file(self) -> Path:
        return self.workdir / "nats-server.conf"

    @property
    def log_file(self) -> Path:
        return self.workdir / "nats-server.log"

    @property
    def ca(self) -> Path:
        return self.pki.ca

    def client(self, name: str) -> ClientCert:
        """Certificate files of the mapped client identity `name` (e.g. "notip-trio")."""
        return self.pki.client(name)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server (no-op if running); return once /healthz says ok.

        Raises DevstackError with the log tail if it exits or is not ready in
        START_TIMEOUT_S.
        """
        if self.running:
            return
        self._log = self.log_file.open("ab")
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),
        )
        what = f"nats-server on {self.url}"
        try:
            wait_until(self._ready, timeout=START_TIMEOUT_S, what=what)
        except DevstackError as exc:
            self.stop(kill=True)
            if "timed out" in str(exc):
                raise DevstackError(f"{exc}\n{self._log_tail()}") from None
            raise

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM (or SIGKILL with kill=True), wait, then SIGKILL.

        Idempotent. The port and the JetStream store are kept for `start()`.
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            if kill:
                proc.kill()
            else:
                proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, *, kill: bool = False) -> None:
        """`stop()` then `start()`: same port, same streams and stored messages."""
        self.stop(kill=kill)
        self.start()

    def close(self) -> None:
        """Stop the server and remove the work directory if `start_nats_server` made it."""
        self.stop(kill=True)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def ssl_context(self, name: str = "test-client") -> ssl.SSLContext:
        """A client SSLContext trusting our CA and presenting `name`'s certificate."""
        return client_ssl_context(self.pki.client(name))

    async def connect(self, name: str = "test-client", **options: Any) -> NATS:
        """asyncio: a nats-py connection as `name`. `options` go to `nats.connect`."""
        import nats

        options.setdefault("connect_timeout", 5)
        options.setdefault("name", name)
        client: NATS = await nats.connect(self.url, tls=self.ssl_context(name), **options)
        return client

    def _ready(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            code = None if self._proc is None else self._proc.returncode
            raise DevstackError(f"nats-server exited with {code}\n{self._log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=1) as resp:
                body = json.loads(resp.read() or b"{}")
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return isinstance(body, dict) and body.get("status") == "ok"

    def _log_tail(self) -> str:
        return f"--- {self.log_file} ---\n{log_tail(self.log_file)}"


def client_ssl_context(client: ClientCert, ca: Path | None = None) -> ssl.SSLContext:
    """SSLContext that trusts `ca` (default: the client's own CA) and presents `client`."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca or client.ca))
    ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


def write_config(server: NatsServer) -> None:
    """Write `server.config_file` from its ports, PKI and the PKI's client identities."""
    store = server.workdir / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    users = "\n".join(
        f"    {{ user: {json.dumps(c.identity)} }}" for c in server.pki.clients.values()
    )
    pki = server.pki
    server.config_file.write_text(
        f"""# written by devstack.natsd
server_name: notip-devstack-{server.port}
listen: 127.0.0.1:{server.port}
http: 127.0.0.1:{server.monitor_port}
jetstream {{
  store_dir: {json.dumps(str(store))}
  max_memory_store: 256MB
  max_file_store: 4GB
}}
tls {{
  cert_file: {json.dumps(str(pki.server_cert))}
  key_file: {json.dumps(str(pki.server_key))}
  ca_file: {json.dumps(str(pki.ca))}
  verify: true
  verify_and_map: true
  timeout: 5
}}
authorization {{
  users = [
{users}
  ]
}}
""",
        encoding="utf-8",
    )


def start_nats_server(
    pki: Pki, workdir: Path | None = None, *, binary: str | None = None
) -> NatsServer:
    """Start a nats-server for `pki` and return it running (see module docstring).

    `workdir` holds the config, log and JetStream store; by default a temporary
    directory removed by `close()`. `close()` is also registered with atexit.
    Raises DevstackError if no binary is found or the server does not start.
    """
    binary = binary or find_nats_server()
    if binary is None:
        raise DevstackError("nats-server binary not found on PATH")
    owns = workdir is None
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="notip-natsd-"))
    workdir.mkdir(parents=True, exist_ok=True)
    server = NatsServer(
        binary=binary,
        pki=pki,
        workdir=workdir,
        port=free_port(),
        monitor_port=free_port(),
        _owns_workdir=owns,
    )
    write_config(server)
    atexit.register(server.close)
    server.start()
    return server
