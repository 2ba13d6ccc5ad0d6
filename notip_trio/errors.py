"""The daemon's exceptions, in one place, under one base class.

`run_app` sorts them (app.py): `StartupError` and `DatabaseError` escaping the
task tree are a failed start or a lost database (exit 1, one line), anything
else is a crash. `NatsRequestError` and `MgmtError` are handled where they
happen (retried, counted, logged) and never reach it. `ConfigError` is caught
by `__main__` before the daemon starts (exit 2).
"""

from __future__ import annotations


class NotipError(Exception):
    """Base of every exception the daemon raises on purpose."""


class ConfigError(NotipError):
    """A missing or invalid setting; `str()` is one line naming the variable."""


class StartupError(NotipError):
    """A fatal problem found at start (missing stream, unusable durable, no connection)."""


class DatabaseError(NotipError):
    """The database could not be reached or refused a write; the batch was not committed."""


class DeadlineExceeded(DatabaseError):
    """No answer within the round trip's deadline; its connections were abandoned."""

    def __init__(self, message: str, *, connections_cut: int = 0) -> None:
        super().__init__(message)
        self.connections_cut = connections_cut


class NatsRequestError(NotipError):
    """A request or publish that failed for a reason other than cancellation."""


class MgmtError(NotipError):
    """A management-API call that failed after all its attempts.

    `refused`: the last attempt was answered, but with a refusal or a reply
    that breaks the contract (the API is up and said no), not a timeout or
    no responders. `skipped`: not asked, or given up early, because a circuit
    breaker is open (`breaker.py`).
    """

    def __init__(self, message: str, *, refused: bool = False, skipped: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        self.skipped = skipped
