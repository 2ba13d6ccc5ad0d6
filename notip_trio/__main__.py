"""Command line entry point: `notip-trio` / `python -m notip_trio`.

    notip-trio              run the daemon
    notip-trio check        check the configuration and every dependency; change nothing
    notip-trio replay       store a window of the TELEMETRY stream again (after a restore)
    notip-trio rejects      count the kept rejected messages; `rejects redrive` stores
                            those this release accepts
    notip-trio --version    print the version
    notip-trio --help       print the usage

Exit codes. The daemon: 0 after a clean shutdown (SIGTERM/SIGINT), 1 for any
failure (one JSON log line saying what failed). `check`: 0 when everything
the daemon needs is there, 1 when something is not. Both: 2 for a bad setting
(one line on stderr naming the variable). `replay` and `rejects`: 0 when done,
1 when a dependency failed (one line on stderr naming it), 2 for a bad
setting. A command line it does not know (or a window that makes no sense):
2 with the usage on stderr, before the configuration is read.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import load_settings
from .errors import ConfigError
from .offline import parse_subject_filter, parse_when

if TYPE_CHECKING:
    from .replay import Window


def version() -> str:
    """The installed distribution's version."""
    try:
        return importlib.metadata.version("notip-trio")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parser, and its `replay` subparser (which reports a window that makes no sense)."""
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
    replay = _add_replay(commands)
    _add_rejects(commands)
    return parser, replay


def _arg_type(fn: Callable[[str], object], name: str) -> Callable[[str], object]:
    def convert(text: str) -> object:
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the type in its message
    return convert


_WHEN = _arg_type(parse_when, "time")
_FILTER = _arg_type(parse_subject_filter, "subject filter")


def _add_replay(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    replay = commands.add_parser(
        "replay",
        help="store a window of the TELEMETRY stream again (after a database restore)",
        description="Read a window of the TELEMETRY stream again through an ephemeral consumer "
        "(the durable is not touched) and store it through the daemon's decode and writer: "
        "rows already stored are skipped, bad messages kept once in telemetry_rejected. Safe "
        "beside running replicas; never changes liveness state. Progress on a terminal, a JSON "
        "summary on stdout. Exit 0 when the window is done, 1 when a dependency failed, 2 for "
        "bad arguments or a configuration error. TIME: ISO 8601 with a zone "
        "(2026-05-01T12:00:00Z) or a span before now (90m, 2h, 1d).",
    )
    start = replay.add_mutually_exclusive_group(required=True)
    start.add_argument("--from-seq", type=int, metavar="N", help="first stream sequence")
    start.add_argument("--since", type=_WHEN, metavar="TIME", help="first message stored at TIME")
    end = replay.add_mutually_exclusive_group()
    end.add_argument(
        "--to-seq", type=int, metavar="M", help="last stream sequence (default: the last now)"
    )
    end.add_argument("--until", type=_WHEN, metavar="TIME", help="stop before messages of TIME")
    replay.add_argument(
        "--subject-filter",
        type=_FILTER,
        metavar="SUBJECT",
        help="only these subjects, e.g. telemetry.data.<tenant>.>",
    )
    return replay


def _add_rejects(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rejects = commands.add_parser(
        "rejects",
        help="count the kept rejected messages; `rejects redrive` stores those valid now",
        description="Print how many messages telemetry_rejected keeps, by day and reason.",
    )
    actions = rejects.add_subparsers(dest="action", metavar="ACTION")
    redrive = actions.add_parser(
        "redrive",
        help="decode the kept messages again; store and remove those valid now",
        description="Decode the kept rejected messages again with this release (a body that "
        "was cut is read again from the stream while it holds it), store those valid now "
        "through the daemon's writer and remove them from telemetry_rejected; the others stay "
        "with their (possibly new) reason. JSON summary on stdout. Exit 0, 1 when a dependency "
        "failed, 2 for bad arguments or a configuration error.",
    )
    redrive.add_argument("--reason", metavar="R", help="only those kept for reason R")
    redrive.add_argument(
        "--since", type=_WHEN, metavar="TIME", help="only those received at TIME or later"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    parser, replay_parser = _parsers()
    try:
        ns = parser.parse_args(args)
        if ns.command == "replay" and (problem := _replay_window(ns).problem()):
            replay_parser.error(problem)
    except SystemExit as exc:  # --help and --version (0), or a usage error (2): printed
        return exc.code if isinstance(exc.code, int) else 0
    command = ns.command
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"notip-trio: configuration error: {exc}", file=sys.stderr)
        return 2

    if command == "check":
        from .check import run_check

        return run_check(settings)
    if command == "replay":
        from .replay import run_replay

        return run_replay(settings, _replay_window(ns))
    if command == "rejects":
        from .rejects import run_counts, run_redrive

        if ns.action == "redrive":
            return run_redrive(settings, reason=ns.reason, since=ns.since)
        return run_counts(settings)

    # trio_asyncio must be imported before psycopg (docs/pitfalls.md); app does that.
    from .app import run_app

    return run_app(settings)


def _replay_window(ns: argparse.Namespace) -> Window:
    from .replay import Window

    since: dt.datetime | None = ns.since
    until: dt.datetime | None = ns.until
    return Window(
        from_seq=ns.from_seq,
        since=since,
        to_seq=ns.to_seq,
        until=until,
        subject_filter=ns.subject_filter,
    )


def run() -> None:  # console-script entry point
    sys.exit(main())


if __name__ == "__main__":
    run()
