"""One line of the preflight: its verdict, the check, the detail and a hint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

Verdict = Literal["ok", "FAILED", "info", "skip"]

STEP_TIMEOUT_S: Final = 5.0  # one JetStream info call, one management-API request


@dataclass(frozen=True, slots=True)
class Result:
    status: Verdict
    check: str
    detail: str
    hint: str = ""

    def line(self) -> str:
        text = f"{self.status:<6} {self.check}: {self.detail}"
        return f"{text} (hint: {self.hint})" if self.hint else text


Emit = Callable[[Result], None]


def _one_line(text: str) -> str:
    return " ".join(text.split())
