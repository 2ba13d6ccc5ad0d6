"""Static checks of the deployment files: Containerfile, deploy/notip-trio.pod.yaml
and the container probe deploy/notip_probe.py.

No container engine and no YAML library are needed: the manifest is ours, so a
few line-oriented helpers read the parts these tests check. The variable names
and defaults are taken from notip_trio.config (REQUIRED_VARIABLES, DEFAULTS,
ENV_VARS: the one declaration of what the daemon reads) and from the
contract (docs/contract.md).
"""

from __future__ import annotations

import http.server
import importlib.util
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from notip_trio import config as daemon_config

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = (ROOT / "Containerfile").read_text(encoding="utf-8")
MANIFEST = (ROOT / "deploy" / "notip-trio.pod.yaml").read_text(encoding="utf-8")
SECRETS_DIR = "/run/secrets/notip/"


# --- helpers -------------------------------------------------------------------


REQUIRED = set(daemon_config.REQUIRED_VARIABLES)
OPTIONAL_DEFAULTS = dict(daemon_config.DEFAULTS)
ALL_NAMES = set(daemon_config.ENV_VARS)


def _document(kind: str) -> str:
    for doc in re.split(r"(?m)^---\s*$", MANIFEST):
        if re.search(rf"(?m)^kind:\s*{kind}\s*$", doc):
            return doc
    raise AssertionError(f"no {kind} in the manifest")


def _block(text: str, key: str) -> list[str]:
    """The non-comment lines nested under the first `key:` line."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"{key}:":
            indent = len(line) - len(line.lstrip())
            out = []
            for nxt in lines[i + 1 :]:
                if not nxt.strip() or nxt.lstrip().startswith("#"):
                    continue
                if len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                out.append(nxt.strip())
            return out
    raise AssertionError(f"no {key}: block")


def _mapping(lines: list[str]) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {k.strip(): v.split(" #")[0].strip().strip('"') for k, v in pairs}


def _container_env() -> dict[str, str]:
    env = _block(_document("Deployment"), "env")
    return {
        name.removeprefix("- name:").strip(): value.removeprefix("value:").strip()
        for name, value in zip(env[::2], env[1::2], strict=True)
    }


def _final_stage() -> str:
    return re.split(r"(?m)^FROM\s", CONTAINERFILE)[-1]


# --- Containerfile -------------------------------------------------------------


def test_containerfile_is_multi_stage_on_slim_python_311():
    froms = re.findall(r"(?m)^FROM\s+(\S+)", CONTAINERFILE)
    assert len(froms) >= 2
    assert "python:3.11-slim-bookworm" in CONTAINERFILE
    assert re.search(r"(?m)^COPY --from=builder /opt/notip-trio /opt/notip-trio$", CONTAINERFILE)
    logical = re.sub(r"\\\n\s*", " ", CONTAINERFILE)  # join continuation lines
    assert re.search(r"pip .*install .*-c constraints\.txt \.(\s|$)", logical), "pinned install"
    assert "[test]" not in CONTAINERFILE
    assert not re.search(r"apt-get install|gcc|build-essential", _final_stage())


def test_containerfile_runs_notip_trio_as_non_root():
    users = re.findall(r"(?m)^USER\s+(\S+)", _final_stage())
    assert users, "no USER in the final stage"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0] == "10001"
    assert re.search(r'(?m)^ENTRYPOINT \["notip-trio"\]$', CONTAINERFILE)
    assert re.search(r"(?m)^EXPOSE 9090$", CONTAINERFILE)
    assert re.search(r"(?m)^STOPSIGNAL SIGTERM$", CONTAINERFILE)
    assert re.search(r"(?m)^ENV .*PYTHONUNBUFFERED=1", CONTAINERFILE, re.S)


def test_containerfile_healthcheck_hits_healthz_without_curl():
    hc = re.search(r"(?ms)^HEALTHCHECK .*?CMD (\[.*?\])$", CONTAINERFILE)
    assert hc, "no HEALTHCHECK ... CMD [...]"
    assert "/healthz" in hc.group(1)
    assert "curl" not in hc.group(1)
    assert "deploy/notip_probe.py /usr/local/bin/notip-probe" in CONTAINERFILE


def test_build_context_keeps_what_the_containerfile_copies():
    ignore = (ROOT / ".containerignore").read_text(encoding="utf-8").splitlines()
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "notip_trio"):
        assert needed not in ignore
    assert "!deploy/notip_probe.py" in ignore


# --- manifest ------------------------------------------------------------------


def test_manifest_runs_two_replicas_with_a_disruption_budget():
    for kind in ("ConfigMap", "Secret", "Deployment", "PodDisruptionBudget"):
        _document(kind)
    deployment = _document("Deployment")
    assert re.search(r"(?m)^  replicas: 2$", deployment)
    assert re.search(r"(?m)^\s+maxUnavailable: 0$", deployment)
    assert re.search(r"(?m)^  minAvailable: 1$", _document("PodDisruptionBudget"))
    selector = "matchLabels:\n      app.kubernetes.io/name: notip-trio"
    assert selector in _document("PodDisruptionBudget")


def test_manifest_rolls_out_an_old_and_a_new_replica_side_by_side():
    """A rollout starts the new replica before it stops an old one: for a while an
    old and a new release run together (docs/operations.md, "Rolling updates and
    mixed versions"), and never fewer than `replicas` are up."""
    strategy = _mapping(_block(_document("Deployment"), "strategy"))
    assert strategy["type"] == "RollingUpdate"
    rolling = _mapping(_block(_document("Deployment"), "rollingUpdate"))
    assert rolling == {"maxUnavailable": "0", "maxSurge": "1"}


def test_manifest_names_every_required_variable():
    config = _mapping(_block(_document("ConfigMap"), "data"))
    env = _container_env()
    missing = REQUIRED - set(config) - set(env)
    assert not missing, f"required variables not set by the manifest: {sorted(missing)}"


def test_manifest_required_variables_match_the_contract():
    contract = ROOT / "docs" / "contract.md"
    rows = re.findall(r"(?m)^\| ([A-Z_]+) \| yes \|", contract.read_text(encoding="utf-8"))
    assert set(rows) == REQUIRED


def test_manifest_settings_are_known_and_defaults_match_config():
    config = _mapping(_block(_document("ConfigMap"), "data"))
    env = _container_env()
    unknown = (set(config) | set(env)) - ALL_NAMES
    assert not unknown, f"variables notip_trio.config does not read: {sorted(unknown)}"
    assert config["METRICS_ADDR"] == ":9090"
    overridden = {name: config[name] for name in OPTIONAL_DEFAULTS.keys() & config.keys()}
    assert "METRICS_ADDR" in overridden, "the ConfigMap sets no optional variable"
    ssl_mode = overridden.pop("DB_SSL_MODE", "require")
    assert ssl_mode in ("require", "verify-ca", "verify-full")
    differing = {n: v for n, v in overridden.items() if v != OPTIONAL_DEFAULTS[n]}
    assert not differing, f"manifest values differ from config.DEFAULTS: {differing}"


def test_secret_files_are_mounted_where_the_env_points():
    env = _container_env()
    keys = set(_mapping(_block(_document("Secret"), "data")))
    assert re.search(rf"mountPath: {SECRETS_DIR.rstrip('/')}\n\s+readOnly: true", MANIFEST)
    for name in ("DB_PASSWORD_FILE", "NATS_TLS_CA", "NATS_TLS_CERT", "NATS_TLS_KEY"):
        assert env[name].startswith(SECRETS_DIR), name
        assert env[name].removeprefix(SECRETS_DIR) in keys, f"{name}: no such Secret key"
    config = _mapping(_block(_document("ConfigMap"), "data"))
    assert not any("PASSWORD" in k and k != "DB_PASSWORD_FILE" for k in config)


def test_probes_use_livez_and_readyz():
    deployment = _document("Deployment")
    assert "/livez" in " ".join(_block(deployment, "livenessProbe"))
    assert "/readyz" in " ".join(_block(deployment, "readinessProbe"))
    assert "/livez" in " ".join(_block(deployment, "startupProbe"))
    # podman kube play runs httpGet probes with curl, which the image lacks
    assert not re.search(r"(?m)^\s+httpGet:", deployment)


def test_pod_is_locked_down_and_drains_before_sigkill():
    deployment = _document("Deployment")
    for line in (
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "runAsUser: 10001",
    ):
        assert line in deployment, line
    assert re.search(r'drop: \["ALL"\]', deployment)
    assert re.search(r"(?m)^\s+limits:\n\s+cpu: .+\n\s+memory: \d+Mi$", deployment)
    grace_m = re.search(r"terminationGracePeriodSeconds: (\d+)", deployment)
    assert grace_m, "no terminationGracePeriodSeconds"
    grace = int(grace_m.group(1))
    drain_s = int(_mapping(_block(_document("ConfigMap"), "data"))["SHUTDOWN_DRAIN_MS"]) / 1000
    # ingest drain + status-queue drain (+1 s) + NATS close (5 s), with room to spare
    assert grace >= 2 * drain_s + 6
    assert "containerPort: 9090" in deployment


# --- deploy/notip_probe.py -----------------------------------------------------


@pytest.fixture(scope="module")
def probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("notip_probe", ROOT / "deploy/notip_probe.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("addr", "url"),
    [
        (":9090", "http://127.0.0.1:9090/livez"),
        ("0.0.0.0:8080", "http://127.0.0.1:8080/livez"),
        ("[::]:9090", "http://[::1]:9090/livez"),
        ("10.1.2.3:9", "http://10.1.2.3:9/livez"),
    ],
)
def test_probe_url_follows_metrics_addr(probe, addr, url):
    assert probe.probe_url("/livez", addr) == url


@pytest.fixture
def stub_server() -> Iterator[tuple[int, dict[str, int]]]:
    codes = {"/livez": 200, "/readyz": 503}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(codes.get(self.path, 404))
            self.end_headers()
            self.wfile.write(b"database: unreachable\n")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], codes
    finally:
        server.shutdown()
        server.server_close()


def test_probe_exit_code_follows_status(probe, stub_server, monkeypatch, capsys):
    port, _ = stub_server
    monkeypatch.setenv("METRICS_ADDR", f":{port}")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # must be ignored
    assert probe.main(["notip-probe", "/livez"]) == 0
    assert probe.main(["notip-probe", "/readyz"]) == 1
    assert "HTTP 503: database: unreachable" in capsys.readouterr().err


def test_probe_fails_when_nothing_listens(probe, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("METRICS_ADDR", f"127.0.0.1:{port}")
    assert probe.main(["notip-probe", "/livez", "1"]) == 1
