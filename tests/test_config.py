"""Configuration: every rule of docs/contract.md's table, one line naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from notip_trio.config import DEFAULTS, ENV_VARS, load_settings
from notip_trio.config import (
    REQUIRED_VARIABLES as DECLARED_REQUIRED,
)
from notip_trio.errors import ConfigError

from ._spec import REQUIRED_VARIABLES


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in ("ca.pem", "cert.pem", "key.pem", "root.pem"):
        (tmp_path / name).write_text("x")
    (tmp_path / "pw").write_text("  s3cret \n")
    values = {
        "NATS_URL": "tls://nats:4222",
        "NATS_TLS_CA": str(tmp_path / "ca.pem"),
        "NATS_TLS_CERT": str(tmp_path / "cert.pem"),
        "NATS_TLS_KEY": str(tmp_path / "key.pem"),
        "DB_HOST": "db",
        "DB_NAME": "notip",
        "DB_USER": "notip",
        "DB_PASSWORD_FILE": str(tmp_path / "pw"),
    }
    for key in ENV_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def test_defaults_match_the_spec(env: dict[str, str]) -> None:
    s = load_settings()
    assert s.db_password == "s3cret"  # trimmed
    assert (s.db_port, s.db_max_conns, s.db_min_conns, s.db_ssl_mode) == (5432, 10, 2, "require")
    assert s.nats_consumer_durable_name == "data-consumer-telemetry"
    assert s.nats_connect_timeout_s == 10
    assert s.gateway_buffer_size == 1000
    assert (s.heartbeat_tick_ms, s.heartbeat_grace_period_ms) == (10000, 120000)
    assert s.alert_config_refresh_ms == 120000
    assert s.alert_config_default_timeout_ms == 60000
    assert (s.alert_config_max_retries, s.alert_config_initial_backoff_ms) == (10, 1000)
    assert s.alert_config_max_backoff_ms == 30000
    assert (s.metrics_host, s.metrics_port) == ("0.0.0.0", 9090)
    assert "s3cret" not in repr(s)
    assert "password=s3cret" in s.db_conninfo()
    # Deadlines on network waits (README: Failure handling).
    assert (s.db_write_timeout_ms, s.db_migrate_timeout_ms) == (15000, 600000)
    assert (s.nats_ping_interval_s, s.nats_max_outstanding_pings) == (5, 2)
    assert s.livez_stall_ms == 120000
    assert (s.liveness_retention_s, s.rejected_retention_s) == (30 * 86400, 30 * 86400)


@pytest.mark.parametrize(
    ("value", "seconds"), [("30d", 2592000), ("12h", 43200), ("90m", 5400), ("3600s", 3600),
                           ("0", 0), ("off", 0), (" 7D ", 604800), ("1w", 604800)]
)  # fmt: skip
def test_retention_durations(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, value: str, seconds: int
) -> None:
    monkeypatch.setenv("LIVENESS_RETENTION", value)
    monkeypatch.setenv("REJECTED_RETENTION", value)
    s = load_settings()
    assert (s.liveness_retention_s, s.rejected_retention_s) == (seconds, seconds)


def test_conninfo_sets_keepalives_and_tcp_user_timeout(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from psycopg.conninfo import conninfo_to_dict

    monkeypatch.setenv("DB_TCP_USER_TIMEOUT_MS", "7000")
    params = conninfo_to_dict(load_settings().db_conninfo())
    assert params["tcp_user_timeout"] == "7000"
    assert params["keepalives"] == "1"
    assert int(str(params["keepalives_idle"])) > 0
    assert int(str(params["connect_timeout"])) > 0


def test_declared_variables_are_the_spec_ones_and_defaults_are_the_ones_used(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert DECLARED_REQUIRED == REQUIRED_VARIABLES
    assert len(set(ENV_VARS)) == len(ENV_VARS)
    implicit = load_settings()
    for name, value in DEFAULTS.items():
        monkeypatch.setenv(name, value)
    assert load_settings() == implicit


@pytest.mark.parametrize("name", REQUIRED_VARIABLES)
def test_each_missing_required_variable_is_named(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.delenv(name)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(f"{name}:")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("DB_SSL_MODE", "bogus", "must be one of"),
        ("DB_PORT", "abc", "not an integer"),
        ("DB_PORT", "70000", "<= 65535"),
        ("HEARTBEAT_TICK_MS", "0", ">= 1"),
        ("HEARTBEAT_TICK_MS", "-5", ">= 1"),
        ("GATEWAY_BUFFER_SIZE", "1.5", "not an integer"),
        ("METRICS_ADDR", "nonsense", "host]:port"),
        ("NATS_URL", "nats-without-scheme", "URL"),
        ("NATS_TLS_CA", "/does/not/exist", "file not found"),
        ("DB_MIN_CONNS", "20", "exceeds DB_MAX_CONNS"),
        ("TELEMETRY_BATCH_SIZE", "x", "not an integer"),
        ("DB_WRITE_TIMEOUT_MS", "50", ">= 100"),
        ("DB_MIGRATE_TIMEOUT_MS", "soon", "not an integer"),
        ("DB_TCP_USER_TIMEOUT_MS", "0", ">= 1000"),
        ("NATS_PING_INTERVAL_SECONDS", "0", ">= 1"),
        ("NATS_MAX_OUTSTANDING_PINGS", "0", ">= 1"),
        ("LIVEZ_STALL_MS", "999", ">= 1000"),
        ("LIVENESS_RETENTION", "30", "expected a duration such as 90m, 12h, 7d or 4w, or off"),
        ("LIVENESS_RETENTION", "-1d", "expected a duration"),
        ("LIVENESS_RETENTION", "1.5d", "expected a duration"),
        ("LIVENESS_RETENTION", "59m", "at least 1h or off"),
        ("REJECTED_RETENTION", "30x", "expected a duration"),
        ("REJECTED_RETENTION", "", "must not be empty"),
        ("TELEMETRY_BATCH_MIN", "0", ">= 1"),
        ("TELEMETRY_BATCH_MIN", "20000", "exceeds TELEMETRY_BATCH_SIZE 10000"),
        ("TELEMETRY_COMPRESS_AFTER", "7", "expected a duration such as 90m, 12h, 7d or 4w, or off"),
        ("TELEMETRY_COMPRESS_AFTER", "7 days", "expected a duration"),
        ("TELEMETRY_COMPRESS_AFTER", "604800000", "expected a duration"),
        ("TELEMETRY_COMPRESS_AFTER", "-1d", "expected a duration"),
        ("TELEMETRY_COMPRESS_AFTER", "1.5d", "expected a duration"),
        ("TELEMETRY_COMPRESS_AFTER", "0h", "at least 1h or off"),
        ("TELEMETRY_COMPRESS_AFTER", "never", "expected a duration"),
        ("TELEMETRY_RETENTION", "12h", "at least 1d or off"),
        ("TELEMETRY_RETENTION", "3m", "at least 1d or off"),
        ("TELEMETRY_RETENTION", "36h30m", "expected a duration"),
        ("TELEMETRY_COMPRESS_AFTER", "90m", "whole hours"),
    ],
)
def test_invalid_values_are_named(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith(f"{name}:")
    assert fragment in str(info.value)


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_verify_modes_need_a_root_cert(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str
) -> None:
    monkeypatch.setenv("DB_SSL_MODE", mode)
    with pytest.raises(ConfigError, match=r"^DB_SSL_ROOT_CERT: required when DB_SSL_MODE="):
        load_settings()
    monkeypatch.setenv("DB_SSL_ROOT_CERT", str(tmp_path / "root.pem"))
    s = load_settings()
    assert s.db_ssl_root_cert == tmp_path / "root.pem"
    assert "sslrootcert=" in s.db_conninfo()


def test_batch_bounds(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert (s.telemetry_batch_min, s.telemetry_batch_size) == (100, 10000)
    monkeypatch.setenv("TELEMETRY_BATCH_SIZE", "1000")
    monkeypatch.setenv("TELEMETRY_BATCH_MIN", "1000")  # equal bounds: a fixed size
    s = load_settings()
    assert (s.telemetry_batch_min, s.telemetry_batch_size) == (1000, 1000)
    # A TELEMETRY_BATCH_SIZE from before the bounds, below the default minimum,
    # keeps working: it caps the minimum too.
    monkeypatch.delenv("TELEMETRY_BATCH_MIN")
    monkeypatch.setenv("TELEMETRY_BATCH_SIZE", "50")
    s = load_settings()
    assert (s.telemetry_batch_min, s.telemetry_batch_size) == (50, 50)


def test_metrics_addr_forms(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICS_ADDR", "127.0.0.1:0")
    assert (load_settings().metrics_host, load_settings().metrics_port) == ("127.0.0.1", 0)
    monkeypatch.setenv("METRICS_ADDR", "[::1]:9100")
    assert load_settings().metrics_host == "::1"


@pytest.mark.parametrize(
    ("compress", "retention", "expected"),
    [
        (None, None, (7 * 24, None)),  # the defaults: compress after 7 days, keep for ever
        ("12h", "90d", (12, 90 * 24)),
        ("1h", "24h", (1, 24)),
        ("2w", "52w", (14 * 24, 52 * 7 * 24)),
        (" 3D ", "1W", (3 * 24, 7 * 24)),  # trimmed, any case
        ("off", "off", (None, None)),
        ("OFF", "", (None, None)),  # empty is off too
    ],
)
def test_lifecycle_durations(
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    compress: str | None,
    retention: str | None,
    expected: tuple[int | None, int | None],
) -> None:
    if compress is not None:
        monkeypatch.setenv("TELEMETRY_COMPRESS_AFTER", compress)
    if retention is not None:
        monkeypatch.setenv("TELEMETRY_RETENTION", retention)
    s = load_settings()
    assert (s.telemetry_compress_after_h, s.telemetry_retention_h) == expected
