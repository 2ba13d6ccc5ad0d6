"""The installed daemon is the daemon only, and it imports with its runtime
dependencies alone.

Builds the wheel from this checkout into a fresh venv without the test extras
(as the Containerfile does), then, from outside the checkout, imports every
module of `notip_trio` and lists the files the distribution installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Builds the wheel into a fresh venv and imports it from there.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
import importlib, importlib.metadata, json, pkgutil, sys
import notip_trio
names = sorted(m.name for m in pkgutil.walk_packages(notip_trio.__path__, "notip_trio."))
failed = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
files = [str(f) for f in importlib.metadata.files("notip-trio") or []]
tops = sorted({f.split("/")[0] for f in files if not f.startswith(("notip_trio-", "../"))})
installed = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
out = {"modules": names, "failed": failed, "tops": tops, "installed": sorted(installed)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("runtime-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run(
        [*pip, "-c", str(ROOT / "constraints.txt"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def test_every_daemon_module_imports_with_runtime_dependencies_alone(
    runtime_venv: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        [str(runtime_venv / "bin" / "python"), "-c", _PROBE],
        cwd=tmp_path,  # not the checkout: only what was installed can import
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["failed"] == {}
    assert {"notip_trio.app", "notip_trio.ingest", "notip_trio.liveness"} <= set(
        found["modules"]
    )
    assert not any(".devstack" in m or "bench" in m for m in found["modules"])
    # The wheel holds the daemon only, and no test extra came with it.
    assert found["tops"] == ["notip_trio"]
    assert not {"pytest", "trustme", "orjson", "testcontainers"} & set(found["installed"])
