"""The operator kit in deploy/: Prometheus alert rules and the Grafana dashboard.

promtool (Debian's `prometheus` package) checks and unit-tests the rules, and
parses every dashboard expression (written out as recording rules). Every
metric either names must be one the daemon exports, taken from a live
`Metrics()` registry. Without promtool these tests skip, except in CI, where
`.ci/run` installs it and a missing promtool fails.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from devstack.proc import PROJECT_ROOT

from ._promql import (
    dashboard_exprs,
    exported_metric_names,
    metric_names,
    require_tool,
    rule_exprs,
    with_grafana_variables_filled,
)

RULES = PROJECT_ROOT / "deploy" / "prometheus" / "notip-trio.rules.yaml"
RULE_TESTS = PROJECT_ROOT / "deploy" / "prometheus" / "notip-trio.rules.test.yaml"
DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "notip-trio.json"
PROMETHEUS_OWN = frozenset({"up"})  # made by Prometheus for every target, not by the daemon

# The failure modes the rules must cover (the issue's list), by alert name.
REQUIRED_ALERTS = {
    "NotipConsumerLagGrowing": "consumer lag growing for 5 minutes",
    "NotipWriteErrors": "write errors",
    "NotipRejectsSpiking": "rejects spiking",
    "NotipStatusUpdatesDropped": "status updates dropped",
    "NotipAlertConfigStale": "alert-config cache not refreshed for 3 refresh periods",
    "NotipOfflineAlertsFailing": "offline alerts failing to publish",
    "NotipTickTooSlow": "tick duration above the tick interval",
    "NotipTrioAbsent": "no scrape (absent)",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool")


def _promtool(promtool: str, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


# --- rules ---------------------------------------------------------------------------


def test_rules_pass_promtool_check(promtool: str) -> None:
    out = _promtool(promtool, "check", "rules", str(RULES), cwd=RULES.parent)
    assert f"SUCCESS: {len(rule_exprs(RULES))} rules found" in out


def test_rule_unit_tests_pass(promtool: str) -> None:
    out = _promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert "SUCCESS" in out


def test_promtool_test_fails_a_rule_that_does_not_fire(promtool: str, tmp_path: Path) -> None:
    """The unit tests can fail: with one threshold raised, promtool reports it."""
    broken = RULES.read_text(encoding="utf-8").replace("> 0.05", "> 0.5")
    assert broken != RULES.read_text(encoding="utf-8")
    (tmp_path / RULES.name).write_text(broken, encoding="utf-8")
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text(encoding="utf-8"))
    done = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "alertname: NotipRejectsSpiking" in done.stdout + done.stderr


def test_the_issue_list_is_covered() -> None:
    assert set(REQUIRED_ALERTS) <= set(rule_exprs(RULES))


def test_every_rule_is_tested_firing_and_not_firing() -> None:
    text = RULE_TESTS.read_text(encoding="utf-8")
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", text))
    silent = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts: \[\]", text))
    alerts = set(rule_exprs(RULES))
    assert alerts - firing == set(), "rules never tested firing"
    assert alerts - silent == set(), "rules never tested silent"


def test_rules_name_only_exported_metrics() -> None:
    exported = exported_metric_names() | PROMETHEUS_OWN
    for alert, expr in rule_exprs(RULES).items():
        names = metric_names(expr)
        assert names, f"{alert}: no metric found in {expr!r}"
        assert names <= exported, f"{alert}: unknown {sorted(names - exported)}"


# --- dashboard ---------------------------------------------------------------------


def test_dashboard_covers_the_issue_list() -> None:
    used: set[str] = set()
    for expr in dashboard_exprs(DASHBOARD):
        used |= metric_names(with_grafana_variables_filled(expr))
    wanted = {
        "notip_consumer_messages_received_total",  # ingest rate
        "notip_consumer_messages_written_total",  # write rate
        "notip_consumer_consumer_pending_messages",  # consumer lag
        "notip_consumer_write_duration_seconds_bucket",  # write-duration quantiles
        "notip_consumer_message_parsing_errors_total",  # rejects by reason
        "notip_consumer_alerts_published_total",
        "notip_consumer_alert_publish_errors_total",
        "notip_consumer_gateways_online",
        "notip_consumer_gateways_offline",
        "notip_consumer_dispatch_queue_length",  # status queue fill
        "notip_consumer_dispatch_queue_capacity",
        "notip_consumer_heartbeat_tick_duration_seconds_bucket",  # tick duration
    }
    assert wanted - used == set()


def test_dashboard_names_only_exported_metrics() -> None:
    exported = exported_metric_names()
    exprs = dashboard_exprs(DASHBOARD)
    assert len(exprs) >= 12
    for expr in exprs:
        names = metric_names(with_grafana_variables_filled(expr))
        assert names, f"no metric found in {expr!r}"
        assert names <= exported, f"unknown {sorted(names - exported)} in {expr!r}"
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["definition"])
            assert metric, variable["definition"]
            assert metric[1] in exported


def test_dashboard_expressions_parse(promtool: str, tmp_path: Path) -> None:
    exprs = dashboard_exprs(DASHBOARD)
    # A rules file in JSON is valid YAML: one recording rule per expression.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": with_grafana_variables_filled(e)}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.json"
    path.write_text(json.dumps(rules, indent=2), encoding="utf-8")
    out = _promtool(promtool, "check", "rules", str(path), cwd=tmp_path)
    assert f"SUCCESS: {len(exprs)} rules found" in out


def test_promtool_refuses_a_broken_expression(promtool: str, tmp_path: Path) -> None:
    """The parse check can fail."""
    path = tmp_path / "broken.rules.json"
    broken = {"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "rate(x[5m]"}]}]}
    path.write_text(json.dumps(broken), encoding="utf-8")
    done = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0


def test_dashboard_panels_have_unique_ids_and_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= names
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


# --- the PromQL helper itself ---------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (reason) (rate(a_total{instance=~"$i"}[5m]))', {"a_total"}),
        ("histogram_quantile(0.99, sum by (le) (rate(b_bucket[5m])))", {"b_bucket"}),
        ("rate(s[5m]) / rate(c[5m]) > g", {"s", "c", "g"}),
        ('absent(up{job="notip-trio"} == 1)', {"up"}),
        ("time() - t > 3 * r offset 1m", {"t", "r"}),
        ("x and on (instance) y unless ignoring (a) z", {"x", "y", "z"}),
        ("1e3 * sum(m) without (le)", {"m"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_exported_names_come_from_the_registry() -> None:
    exported = exported_metric_names()
    assert "notip_consumer_messages_written_total" in exported
    assert "notip_consumer_write_duration_seconds_bucket" in exported
    assert "notip_consumer_consumer_pending_messages" in exported
    assert "notip_consumer_messages_written" not in exported
