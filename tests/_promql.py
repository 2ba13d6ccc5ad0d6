"""PromQL helpers for the operator-kit tests: which metrics an expression names,
which the daemon exports, and the expressions of the rules file and the dashboard.

Parsing proper is promtool's job (the tests run it); `metric_names` only has
to find the metric names in expressions promtool accepts.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from notip_trio.metrics import Metrics
from tests.fix_servers import require

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "inf", "nan", "atan2"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")


def exported_metric_names() -> set[str]:
    """Every series name the daemon's registry exposes (from a live `Metrics()`)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type not in _SUFFIXES:
            raise AssertionError(f"{family.name}: unexpected metric type {family.type}")
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects (labels, ranges, strings and functions removed)."""
    text = _STRING.sub(" ", expr)
    text = _BRACKETS.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    while _BRACES.search(text):
        text = _BRACES.sub(" ", text)
    return {m for m in _IDENT.findall(text) if m.lower() not in _KEYWORDS}


def rule_exprs(path: Path) -> dict[str, str]:
    """alert name -> expression of a Prometheus rules file (our own layout:
    `expr:` inline or as a `|` block under `- alert:`)."""
    out: dict[str, str] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    alert = ""
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("- alert:"):
            alert = line.split(":", 1)[1].strip()
        elif line.startswith("expr:"):
            value = line.split(":", 1)[1].strip()
            if value == "|":
                indent = len(lines[i + 1]) - len(lines[i + 1].lstrip())
                block = []
                while i + 1 < len(lines) and (
                    not lines[i + 1].strip()
                    or len(lines[i + 1]) - len(lines[i + 1].lstrip()) >= indent
                ):
                    i += 1
                    block.append(lines[i].strip())
                value = " ".join(part for part in block if part)
            out[alert] = value
        i += 1
    return out


def dashboard_exprs(path: Path) -> list[str]:
    """Every `expr` of every panel target, nested rows included."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(path.read_text(encoding="utf-8"))["panels"])
    return found


def with_grafana_variables_filled(expr: str) -> str:
    """Grafana's variables replaced by what they stand for, so promtool can parse it."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def require_tool(name: str, *candidates: str) -> str:
    """Path of a binary; skip with the reason when it is missing, except in CI
    (CI=true), whose `.ci/run` installs it: there a missing binary fails."""
    for candidate in (name, *candidates):
        found = shutil.which(candidate)
        if found:
            return found
    require(f"{name} not found (Debian: apt-get install prometheus)")
