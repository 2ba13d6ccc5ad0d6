"""The test support itself: what would let a broken check pass silently."""

from __future__ import annotations

import pytest

from devstack import natsd, postgres
from notip_trio.metrics import Metrics

from . import fix_servers
from .liveness_fakes import sample


def test_sample_reads_a_metric_and_an_unused_label_set_as_zero() -> None:
    metrics = Metrics()
    metrics.write_errors.inc(3)
    assert sample(metrics, "write_errors_total") == 3
    assert sample(metrics, "message_parsing_errors_total", reason="oversized") == 0


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("no_such_metric_total", {}),  # a renamed or misspelt metric
        ("write_errors", {}),  # the family name, not a sample
        ("message_parsing_errors_total", {}),  # labelled: needs its labels
        ("message_parsing_errors_total", {"kind": "oversized"}),  # not its label
    ],
)
def test_sample_raises_on_a_name_or_labels_the_registry_does_not_have(
    name: str, labels: dict[str, str]
) -> None:
    with pytest.raises(LookupError):
        sample(Metrics(), name, **labels)


def test_a_missing_server_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="gone"):
        fix_servers.require("gone")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="gone"):
        fix_servers.require("gone")


@pytest.mark.parametrize("ci", ["", "true"])
def test_the_server_fixtures_go_through_the_ci_rule(
    monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    monkeypatch.setenv("CI", ci)
    monkeypatch.delenv(postgres.DSN_ENV, raising=False)
    monkeypatch.setattr(natsd, "find_nats_server", lambda: None)
    monkeypatch.setattr(postgres, "find_pg_bindir", lambda: None)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match="nats-server"):
        fix_servers._start_nats(None)  # type: ignore[arg-type]
    with pytest.raises(expected, match="PostgreSQL"):
        fix_servers._require_local_pg()
