"""The developer stack's status line: a /metrics scrape, /readyz and two row counts.

`Summary.line()` never raises: whatever cannot be read right now (the daemon
still starting, the table not yet migrated) shows as "-".
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

_P = "notip_consumer_"
_TIMEOUT_S = 2.0


def scrape(url: str) -> dict[str, float] | None:
    """Every sample of a Prometheus endpoint, summed over labels; None if unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError, ValueError):
        return None
    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return totals


def readiness(url: str) -> str:
    """ "ready", "not ready: <first reason>", or "down" if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
            resp.read()
            return "ready"
    except urllib.error.HTTPError as exc:
        reasons = exc.read().decode("utf-8", "replace").strip().splitlines()
        return f"NOT READY ({reasons[0] if reasons else exc.code})"
    except (OSError, ValueError):
        return "down"


def db_counts(conninfo: str) -> tuple[int | None, int | None]:
    """Rows in telemetry and telemetry_rejected (None where unavailable)."""
    import psycopg

    counts: list[int | None] = []
    try:
        with psycopg.connect(conninfo, connect_timeout=2, autocommit=True) as conn:
            for table in ("telemetry", "telemetry_rejected"):
                try:
                    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                    counts.append(int(row[0]) if row else None)
                except psycopg.errors.UndefinedTable:
                    counts.append(None)
    except psycopg.Error:
        return None, None
    return counts[0], counts[1]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{int(value):,}"


@dataclass
class Summary:
    """Builds one status line per call; remembers the last row count for the rate.

    With several replicas (`replica_urls`: each one's /metrics), counters are
    summed over them, the gateway counts are the leader's, and the line says
    which replica leads.
    """

    metrics_url: str
    readyz_url: str
    conninfo: str
    interval_s: float
    replica_urls: tuple[str, ...] = ()
    _last_rows: int | None = field(default=None, repr=False)

    def _scrape(self) -> tuple[dict[str, float] | None, str]:
        if len(self.replica_urls) < 2:
            return scrape(self.metrics_url), ""
        each = [scrape(url) for url in self.replica_urls]
        up = [s for s in each if s is not None]
        if not up:
            return None, "leader -"
        leaders = [i + 1 for i, s in enumerate(each) if s and s.get(_P + "liveness_leader")]
        total: dict[str, float] = defaultdict(float)
        for s in up:
            for name, value in s.items():
                total[name] += value
        leader = next((s for s in each if s and s.get(_P + "liveness_leader")), up[0])
        for gauge in ("gateways_online", "gateways_offline"):
            total[_P + gauge] = leader.get(_P + gauge, 0.0)
        total[_P + "consumer_pending_messages"] = max(
            s.get(_P + "consumer_pending_messages", 0.0) for s in up
        )
        who = ",".join(f"r{i}" for i in leaders) or "none"
        return total, f"leader {who} of {len(self.replica_urls)} ({len(up)} up)"

    def line(self, elapsed_s: float, notes: str = "") -> str:
        scraped, replicas = self._scrape()
        notes = " | ".join(n for n in (replicas, notes) if n)
        rows, rejected_rows = db_counts(self.conninfo)
        delta = ""
        if rows is not None and self._last_rows is not None:
            delta = f" (+{rows - self._last_rows:,}/{self.interval_s:g}s)"
        self._last_rows = rows

        def metric(name: str) -> str:
            # a labelled counter has no sample before its first increment: that is 0
            return "-" if scraped is None else _fmt(scraped.get(_P + name, 0.0))

        parts = [
            f"[{elapsed_s:6.0f}s] {readiness(self.readyz_url)}",
            f"rows {_fmt(rows)}{delta}",
            f"written {metric('messages_written_total')}",
            f"rejected {metric('message_parsing_errors_total')} (kept {_fmt(rejected_rows)})",
            f"alerts {metric('alerts_published_total')}",
            f"online {metric('gateways_online')}",
            f"offline {metric('gateways_offline')}",
            f"lag {metric('consumer_pending_messages')}",
        ]
        if notes:
            parts.append(notes)
        return " | ".join(parts)
