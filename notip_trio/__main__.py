"""Command line entry point: `notip-trio` / `python -m notip_trio`.

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT), 2 for a bad setting
(one line on stderr naming the variable), 1 for any other failure (one JSON log
line saying what failed).
"""

from __future__ import annotations

import sys

from .config import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip() if __doc__ else "notip-trio")
        print("All settings come from environment variables; see README.md.")
        return 0
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"notip-trio: configuration error: {exc}", file=sys.stderr)
        return 2

    # trio_asyncio must be imported before psycopg (NOTES.md); app does that.
    from .app import run_app

    return run_app(settings)


def run() -> None:  # console-script entry point
    sys.exit(main())


if __name__ == "__main__":
    run()
