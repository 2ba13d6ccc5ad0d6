"""The command line: `notip-trio`, `notip-trio check`, `--version`, `--help`, and
everything else refused with the usage (exit 2) before the configuration is read.

In-process `main([...])` calls with an environment that holds no setting at
all: a command line that reached the configuration would say "configuration
error" instead; one real subprocess per kind of answer.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

from devstack.proc import PROJECT_ROOT
from devstack.proc import child_env as process_env
from notip_trio.__main__ import main

VERSION = importlib.metadata.version("notip-trio")


@pytest.fixture
def no_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No daemon variable in the environment: reading the configuration fails."""
    kept = process_env({})  # os.environ without the daemon's variables
    for key in [k for k in os.environ if k not in kept]:
        monkeypatch.delenv(key)


@pytest.mark.usefixtures("no_settings")
def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out, err = capsys.readouterr()
    assert out == f"notip-trio {VERSION}\n"
    assert err == ""


@pytest.mark.usefixtures("no_settings")
@pytest.mark.parametrize("argv", [["-h"], ["--help"]])
def test_help_prints_usage_and_the_check_command(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: notip-trio")
    assert "check" in out
    assert "environment variables" in out
    assert err == ""


@pytest.mark.usefixtures("no_settings")
def test_check_has_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--help"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("usage: notip-trio check")
    assert "Changes nothing" in out


@pytest.mark.usefixtures("no_settings")
@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["anything"], "invalid choice: 'anything'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["check", "--bogus"], "unrecognized arguments: --bogus"),
        (["check", "extra"], "unrecognized arguments: extra"),
        (["extra", "--version"], "invalid choice: 'extra'"),
    ],
)
def test_an_unknown_command_line_exits_2_with_usage_before_reading_settings(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: notip-trio")
    assert complaint in err
    assert "configuration error" not in err


@pytest.mark.usefixtures("no_settings")
@pytest.mark.parametrize("argv", [[], ["check"]], ids=["daemon", "check"])
def test_daemon_and_check_read_the_configuration_the_same_way(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "notip-trio: configuration error: NATS_URL: required but not set\n"


@pytest.mark.parametrize(
    ("argv", "code", "stdout", "stderr_start"),
    [
        (["anything"], 2, "", "usage: notip-trio"),
        (["--version"], 0, f"notip-trio {VERSION}\n", ""),
        (["check"], 2, "", "notip-trio: configuration error: NATS_URL"),
    ],
    ids=["unknown", "version", "check-config"],
)
def test_the_real_process(argv: list[str], code: int, stdout: str, stderr_start: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "notip_trio", *argv],
        env=process_env({}),
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,  # hang guard: a command line taken for the daemon would try to connect
        check=False,
    )
    assert done.returncode == code, done.stderr
    assert done.stdout == stdout
    assert done.stderr.startswith(stderr_start)
    assert "Traceback" not in done.stderr
