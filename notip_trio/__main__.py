"""Command line entry point: `notip-trio` / `python -m notip_trio`.

    notip-trio              run the daemon
    notip-trio check        check the configuration and every dependency; change nothing
    notip-trio --version    print the version
    notip-trio --help       print the usage

Exit codes. The daemon: 0 after a clean shutdown (SIGTERM/SIGINT), 1 for any
failure (one JSON log line saying what failed). `check`: 0 when everything
the daemon needs is there, 1 when something is not. Both: 2 for a bad setting
(one line on stderr naming the variable). A command line it does not know:
2 with the usage on stderr, before the configuration is read.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

from .config import load_settings
from .errors import ConfigError


def version() -> str:
    """The installed distribution's version."""
    try:
        return importlib.metadata.version("notip-trio")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="notip-trio",
        description="Telemetry ingest and gateway liveness daemon for the NoTIP IoT platform. "
        "Without a command it runs the daemon.",
        epilog="All settings come from environment variables; see README.md (Configuration).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    commands.add_parser(
        "check",
        help="check the configuration and every dependency, change nothing",
        description="Load the configuration as the daemon does, check NATS (mTLS identity, "
        "streams, durables), PostgreSQL (connection, table, rights) and the management API, "
        "print one line per check. Exit 0 when everything needed is there, 1 otherwise, "
        "2 for a configuration error. Changes nothing.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        command = _parser().parse_args(args).command
    except SystemExit as exc:  # --help and --version (0), or a usage error (2): printed
        return exc.code if isinstance(exc.code, int) else 0
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"notip-trio: configuration error: {exc}", file=sys.stderr)
        return 2

    if command == "check":
        from .check import run_check

        return run_check(settings)

    # trio_asyncio must be imported before psycopg (docs/pitfalls.md); app does that.
    from .app import run_app

    return run_app(settings)


def run() -> None:  # console-script entry point
    sys.exit(main())


if __name__ == "__main__":
    run()
