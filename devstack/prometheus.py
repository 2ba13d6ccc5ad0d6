"""A throwaway Prometheus (Debian's `/usr/bin/prometheus`) scraping given targets.

`start_prometheus(targets, rule_files=...)` writes a config (job "notip-trio",
scrape and rule evaluation every second), starts Prometheus on a free
127.0.0.1 port with its TSDB in a temporary directory, and returns once
`/-/ready` answers. `query()` and `rules()` read its HTTP API; `close()` stops
the process (SIGTERM, then SIGKILL) and removes the directory.

Methods block (subprocess and HTTP waits with deadlines); from Trio call them
through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack._common import DevstackError, free_port, log_tail, wait_until
from devstack.proc import Child

JOB = "notip-trio"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def find_prometheus() -> str | None:
    """Path of the prometheus binary on PATH, None if absent."""
    return shutil.which("prometheus")


@dataclass(eq=False)
class PrometheusServer:
    workdir: Path
    port: int
    _child: Child | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.workdir / "prometheus.log"

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.running

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer, else DevstackError."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise DevstackError(f"prometheus /api/v1/{path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: the result vector (each with `metric` and `value`)."""
        data = self.api("query", query=expr)
        if data.get("resultType") != "vector":
            raise DevstackError(f"{expr}: expected a vector, got {data.get('resultType')}")
        result: list[dict[str, Any]] = data["result"]
        return result

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule with its `health` and `lastError`."""
        groups = self.api("rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def tail(self) -> str:
        return f"--- {self.log_file} ---\n{log_tail(self.log_file)}"

    def close(self) -> None:
        """Stop Prometheus (idempotent) and remove its directory."""
        child, self._child = self._child, None
        if child is not None:
            child.stop(STOP_TIMEOUT_S)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _ready(self) -> bool:
        if not self.running:
            raise DevstackError(f"prometheus exited\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return int(resp.status) == 200
        except (OSError, urllib.error.URLError):
            return False


def start_prometheus(
    targets: Sequence[str],
    *,
    rule_files: Sequence[Path] = (),
    binary: str | None = None,
) -> PrometheusServer:
    """Start Prometheus scraping `targets` (host:port) every second as job "notip-trio".

    Raises DevstackError if there is no binary or it is not ready in
    START_TIMEOUT_S (with its log tail).
    """
    binary = binary or find_prometheus()
    if binary is None:
        raise DevstackError("prometheus binary not found (apt-get install prometheus)")
    workdir = Path(tempfile.mkdtemp(prefix="notip-prometheus-"))
    server = PrometheusServer(workdir=workdir, port=free_port())
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": JOB,
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    server._child = Child.spawn(
        "prometheus",
        [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{server.port}",
            "--log.level=warn",
        ],
        server.log_file,
        cwd=workdir,
    )
    atexit.register(server.close)
    try:
        wait_until(server._ready, timeout=START_TIMEOUT_S, what=f"prometheus on {server.url}")
    except DevstackError as exc:
        tail = server.tail()
        server.close()
        raise DevstackError(f"{exc}\n{tail}") from None
    return server
