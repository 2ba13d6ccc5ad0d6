"""Configuration: every setting from the environment, read once, validated at start.

`load_settings()` either returns a frozen `Settings` or raises `ConfigError`
whose message is one line naming the offending variable. `__main__` prints that
line and exits 2; nothing else in the daemon reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import environs
import marshmallow

from .errors import ConfigError

SSL_MODES = ("disable", "require", "verify-ca", "verify-full")

# Every variable the daemon reads, declared once: tests, the dev stack and the
# packaging checks take the names from here.
REQUIRED_VARIABLES: Final = (
    "NATS_URL",
    "NATS_TLS_CA",
    "NATS_TLS_CERT",
    "NATS_TLS_KEY",
    "DB_HOST",
    "DB_NAME",
    "DB_USER",
    "DB_PASSWORD_FILE",
)
DEFAULTS: Final[Mapping[str, str]] = {
    # docs/contract.md, Configuration
    "DB_PORT": "5432",
    "DB_MAX_CONNS": "10",
    "DB_MIN_CONNS": "2",
    "DB_SSL_MODE": "require",
    "NATS_CONSUMER_DURABLE_NAME": "data-consumer-telemetry",
    "NATS_CONNECT_TIMEOUT_SECONDS": "10",
    "GATEWAY_BUFFER_SIZE": "1000",
    "HEARTBEAT_TICK_MS": "10000",
    "HEARTBEAT_GRACE_PERIOD_MS": "120000",
    "ALERT_CONFIG_REFRESH_MS": "120000",
    "ALERT_CONFIG_DEFAULT_TIMEOUT_MS": "60000",
    "ALERT_CONFIG_MAX_RETRIES": "10",
    "ALERT_CONFIG_INITIAL_BACKOFF_MS": "1000",
    "ALERT_CONFIG_MAX_BACKOFF_MS": "30000",
    "METRICS_ADDR": ":9090",
    # our own (README: Configuration)
    "TELEMETRY_BATCH_SIZE": "10000",
    "TELEMETRY_BATCH_MIN": "100",
    "TELEMETRY_FLUSH_MS": "200",
    "TELEMETRY_MAX_BODY_BYTES": "16384",
    "TELEMETRY_PIPELINE_DEPTH": "2",
    "REJECTED_BODY_MAX_BYTES": "16384",
    "LIVENESS_QUERY_CONCURRENCY": "256",
    "LIVENESS_CATCHUP_MAX_MS": "300000",
    "SHUTDOWN_DRAIN_MS": "8000",
    "LOG_LEVEL": "INFO",
    # deadlines on network waits (README: Failure handling)
    "DB_WRITE_TIMEOUT_MS": "15000",
    "DB_MIGRATE_TIMEOUT_MS": "600000",
    "DB_TCP_USER_TIMEOUT_MS": "30000",
    "NATS_PING_INTERVAL_SECONDS": "5",
    "NATS_MAX_OUTSTANDING_PINGS": "2",
    "LIVEZ_STALL_MS": "120000",
    # the data lifecycle (README: Configuration): durations `<n>` + s, m, h, d or w,
    # or `off` / `0` (TimescaleDB policies: none; purges: keep for ever)
    "TELEMETRY_COMPRESS_AFTER": "7d",
    "TELEMETRY_RETENTION": "off",
    "LIVENESS_RETENTION": "30d",
    "REJECTED_RETENTION": "30d",
}
# Optional without a default: needed only for DB_SSL_MODE verify-ca / verify-full.
OPTIONAL_VARIABLES: Final = ("DB_SSL_ROOT_CERT",)
ENV_VARS: Final = (*REQUIRED_VARIABLES, *DEFAULTS, *OPTIONAL_VARIABLES)


@dataclass(frozen=True, slots=True)
class Settings:
    nats_url: str
    nats_tls_ca: Path
    nats_tls_cert: Path
    nats_tls_key: Path
    nats_consumer_durable_name: str
    nats_connect_timeout_s: float

    db_host: str
    db_port: int
    db_name: str
    db_user: str
    db_password: str
    db_max_conns: int
    db_min_conns: int
    db_ssl_mode: str
    db_ssl_root_cert: Path | None

    gateway_buffer_size: int
    heartbeat_tick_ms: int
    heartbeat_grace_period_ms: int
    alert_config_refresh_ms: int
    alert_config_default_timeout_ms: int
    alert_config_max_retries: int
    alert_config_initial_backoff_ms: int
    alert_config_max_backoff_ms: int

    metrics_host: str
    metrics_port: int

    # Our own additions (README: Configuration).
    telemetry_batch_size: int = 10000  # the largest batch (adaptive between min and this)
    telemetry_batch_min: int = 100
    telemetry_flush_ms: int = 200
    telemetry_max_body_bytes: int = 16384
    telemetry_pipeline_depth: int = 2
    rejected_body_max_bytes: int = 16384
    liveness_query_concurrency: int = 256
    liveness_catchup_max_ms: int = 300000
    shutdown_drain_ms: int = 8000
    log_level: str = "INFO"
    db_write_timeout_ms: int = 15000
    db_migrate_timeout_ms: int = 600000
    db_tcp_user_timeout_ms: int = 30000
    nats_ping_interval_s: int = 5
    nats_max_outstanding_pings: int = 2
    livez_stall_ms: int = 120000
    # Hours (whole); None: off (no policy).
    telemetry_compress_after_h: int | None = 7 * 24
    telemetry_retention_h: int | None = None
    liveness_retention_s: int = 30 * 86400  # 0: keep offline rows and tombstones for ever
    rejected_retention_s: int = 30 * 86400  # 0: keep rejected messages for ever

    # ---- the *_MS settings in seconds (what Trio's clock and the timeouts take) ----

    @property
    def heartbeat_tick_s(self) -> float:
        return self.heartbeat_tick_ms / 1000

    @property
    def heartbeat_grace_period_s(self) -> float:
        return self.heartbeat_grace_period_ms / 1000

    @property
    def alert_config_refresh_s(self) -> float:
        return self.alert_config_refresh_ms / 1000

    @property
    def alert_config_initial_backoff_s(self) -> float:
        return self.alert_config_initial_backoff_ms / 1000

    @property
    def alert_config_max_backoff_s(self) -> float:
        return self.alert_config_max_backoff_ms / 1000

    @property
    def telemetry_flush_s(self) -> float:
        return self.telemetry_flush_ms / 1000

    @property
    def liveness_catchup_max_s(self) -> float:
        return self.liveness_catchup_max_ms / 1000

    @property
    def shutdown_drain_s(self) -> float:
        return self.shutdown_drain_ms / 1000

    @property
    def db_write_timeout_s(self) -> float:
        return self.db_write_timeout_ms / 1000

    @property
    def db_migrate_timeout_s(self) -> float:
        return self.db_migrate_timeout_ms / 1000

    @property
    def livez_stall_s(self) -> float:
        return self.livez_stall_ms / 1000

    def __repr__(self) -> str:  # never print the password
        return f"Settings(nats_url={self.nats_url!r}, db_host={self.db_host!r}, ...)"

    def db_conninfo(self, *, keepalives: bool = False) -> str:
        """libpq keyword/value string for psycopg (password included).

        With `keepalives`, the kernel also gives up on a silent peer within
        about 15 s (TCP keepalive and tcp_user_timeout): for the liveness lock's
        connection, whose loss must end leadership.
        """
        from psycopg.conninfo import make_conninfo

        params: dict[str, Any] = {
            "host": self.db_host,
            "port": self.db_port,
            "dbname": self.db_name,
            "user": self.db_user,
            "password": self.db_password,
            "sslmode": self.db_ssl_mode,
            "application_name": "notip-trio",
            # A dead path is found by the kernel too (README: Failure handling):
            # unacknowledged data for longer than tcp_user_timeout, or an idle
            # connection that misses its keepalives, fails the socket.
            "connect_timeout": 10,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": self.db_tcp_user_timeout_ms,
        }
        if self.db_ssl_root_cert is not None:
            params["sslrootcert"] = str(self.db_ssl_root_cert)
        if keepalives:
            params.update(
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
                tcp_user_timeout=15000,
            )
        return make_conninfo(**params)


def _parse_addr(name: str, value: str) -> tuple[str, int]:
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError(f"{name}: expected [host]:port, got {value!r}")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port_s)


def _readable_file(name: str, value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{name}: file not found or not a file: {value}")
    return path


DURATION_UNITS_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: The lifecycle durations' lower bounds: an hour to compress (chunks are a day
#: long; the newest one is still being written), a day to drop (one chunk); an
#: hour for a purge (a tombstone must outlive every redelivery of the messages
#: before it: ack_wait, a nak's delay after an outage).
COMPRESS_AFTER_MIN_S: Final = 3600
RETENTION_MIN_S: Final = 86400
PURGE_MIN_S: Final = 3600


def parse_duration_s(name: str, value: str, *, minimum_s: int) -> int | None:
    """A duration in seconds: a whole number with a unit, `s`, `m`, `h`, `d` or `w`
    (`30d`, `12h`); `off`, `0` or empty: None (off, or keep for ever)."""
    text = value.strip().lower()
    if text in ("", "off", "0"):
        return None
    number, unit = text[:-1], text[-1:]
    if unit not in DURATION_UNITS_S or not number.isdigit():
        raise ConfigError(
            f"{name}: expected a duration such as 90m, 12h, 7d or 4w, or off, got {value!r}"
        )
    seconds = int(number) * DURATION_UNITS_S[unit]
    if seconds < minimum_s:
        raise ConfigError(
            f"{name}: must be at least {_describe_s(minimum_s)} or off, got {value!r}"
        )
    return seconds


def parse_duration_h(name: str, value: str, *, minimum_h: int) -> int | None:
    """`parse_duration_s` in whole hours (the TimescaleDB policies' unit)."""
    seconds = parse_duration_s(name, value, minimum_s=minimum_h * 3600)
    if seconds is None:
        return None
    if seconds % 3600:
        raise ConfigError(f"{name}: must be whole hours (e.g. 36h, 7d), got {value!r}")
    return seconds // 3600


def _describe_s(seconds: int) -> str:
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def load_settings() -> Settings:
    """Read and validate every setting; raise ConfigError naming the first bad one."""
    return _load(environs.Env(eager=True, expand_vars=False))


def _load(env: environs.Env) -> Settings:
    def req_str(name: str) -> str:
        try:
            value: str = env.str(name)
        except environs.EnvError:
            raise ConfigError(f"{name}: required but not set") from None
        if not value.strip():
            raise ConfigError(f"{name}: required but empty")
        return value.strip()

    def opt_str(name: str) -> str:
        value: str = env.str(name, DEFAULTS[name]).strip()
        if not value:
            raise ConfigError(f"{name}: must not be empty")
        return value

    def pos_int(name: str, *, minimum: int = 1) -> int:
        try:
            value: int = env.int(name, int(DEFAULTS[name]))
        except (environs.EnvError, marshmallow.ValidationError):
            raise ConfigError(f"{name}: not an integer: {os.environ.get(name)!r}") from None
        if value < minimum:
            raise ConfigError(f"{name}: must be >= {minimum}, got {value}")
        return value

    nats_url = req_str("NATS_URL")
    if "://" not in nats_url:
        raise ConfigError(f"NATS_URL: expected a URL such as tls://nats:4222, got {nats_url!r}")
    nats_tls_ca = _readable_file("NATS_TLS_CA", req_str("NATS_TLS_CA"))
    nats_tls_cert = _readable_file("NATS_TLS_CERT", req_str("NATS_TLS_CERT"))
    nats_tls_key = _readable_file("NATS_TLS_KEY", req_str("NATS_TLS_KEY"))

    db_host = req_str("DB_HOST")
    db_name = req_str("DB_NAME")
    db_user = req_str("DB_USER")
    password_file = _readable_file("DB_PASSWORD_FILE", req_str("DB_PASSWORD_FILE"))
    try:
        db_password = password_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"DB_PASSWORD_FILE: cannot read {password_file}: {exc}") from None

    db_port = pos_int("DB_PORT")
    if db_port > 65535:
        raise ConfigError(f"DB_PORT: must be <= 65535, got {db_port}")
    db_max_conns = pos_int("DB_MAX_CONNS")
    db_min_conns = pos_int("DB_MIN_CONNS", minimum=0)
    if db_min_conns > db_max_conns:
        raise ConfigError(f"DB_MIN_CONNS: {db_min_conns} exceeds DB_MAX_CONNS {db_max_conns}")
    db_ssl_mode = opt_str("DB_SSL_MODE")
    if db_ssl_mode not in SSL_MODES:
        raise ConfigError(
            f"DB_SSL_MODE: must be one of {', '.join(SSL_MODES)}, got {db_ssl_mode!r}"
        )
    root_cert_s = env.str("DB_SSL_ROOT_CERT", "").strip()
    db_ssl_root_cert: Path | None = None
    if root_cert_s:
        db_ssl_root_cert = _readable_file("DB_SSL_ROOT_CERT", root_cert_s)
    elif db_ssl_mode in ("verify-ca", "verify-full"):
        raise ConfigError(f"DB_SSL_ROOT_CERT: required when DB_SSL_MODE={db_ssl_mode}")

    metrics_host, metrics_port = _parse_addr("METRICS_ADDR", opt_str("METRICS_ADDR"))

    # TELEMETRY_BATCH_SIZE is the upper bound of the adaptive batch. A value below
    # the default minimum (a setting from before the bounds) caps the minimum too;
    # an explicit TELEMETRY_BATCH_MIN above it is an error.
    batch_max = pos_int("TELEMETRY_BATCH_SIZE")
    batch_min = pos_int("TELEMETRY_BATCH_MIN")
    if batch_min > batch_max:
        if env.str("TELEMETRY_BATCH_MIN", "").strip():
            raise ConfigError(
                f"TELEMETRY_BATCH_MIN: {batch_min} exceeds TELEMETRY_BATCH_SIZE {batch_max}"
            )
        batch_min = batch_max

    def duration_h(name: str, *, minimum_h: int) -> int | None:
        return parse_duration_h(name, env.str(name, DEFAULTS[name]), minimum_h=minimum_h)

    def purge(name: str) -> int:
        return parse_duration_s(name, opt_str(name), minimum_s=PURGE_MIN_S) or 0

    log_level = opt_str("LOG_LEVEL").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")

    return Settings(
        nats_url=nats_url,
        nats_tls_ca=nats_tls_ca,
        nats_tls_cert=nats_tls_cert,
        nats_tls_key=nats_tls_key,
        nats_consumer_durable_name=opt_str("NATS_CONSUMER_DURABLE_NAME"),
        nats_connect_timeout_s=float(pos_int("NATS_CONNECT_TIMEOUT_SECONDS")),
        db_host=db_host,
        db_port=db_port,
        db_name=db_name,
        db_user=db_user,
        db_password=db_password,
        db_max_conns=db_max_conns,
        db_min_conns=db_min_conns,
        db_ssl_mode=db_ssl_mode,
        db_ssl_root_cert=db_ssl_root_cert,
        gateway_buffer_size=pos_int("GATEWAY_BUFFER_SIZE"),
        heartbeat_tick_ms=pos_int("HEARTBEAT_TICK_MS"),
        heartbeat_grace_period_ms=pos_int("HEARTBEAT_GRACE_PERIOD_MS", minimum=0),
        alert_config_refresh_ms=pos_int("ALERT_CONFIG_REFRESH_MS"),
        alert_config_default_timeout_ms=pos_int("ALERT_CONFIG_DEFAULT_TIMEOUT_MS"),
        alert_config_max_retries=pos_int("ALERT_CONFIG_MAX_RETRIES"),
        alert_config_initial_backoff_ms=pos_int("ALERT_CONFIG_INITIAL_BACKOFF_MS"),
        alert_config_max_backoff_ms=pos_int("ALERT_CONFIG_MAX_BACKOFF_MS"),
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        telemetry_batch_size=batch_max,
        telemetry_batch_min=batch_min,
        telemetry_flush_ms=pos_int("TELEMETRY_FLUSH_MS"),
        telemetry_max_body_bytes=pos_int("TELEMETRY_MAX_BODY_BYTES"),
        telemetry_pipeline_depth=pos_int("TELEMETRY_PIPELINE_DEPTH"),
        rejected_body_max_bytes=pos_int("REJECTED_BODY_MAX_BYTES", minimum=0),
        liveness_query_concurrency=pos_int("LIVENESS_QUERY_CONCURRENCY"),
        liveness_catchup_max_ms=pos_int("LIVENESS_CATCHUP_MAX_MS"),
        shutdown_drain_ms=pos_int("SHUTDOWN_DRAIN_MS"),
        log_level=log_level,
        db_write_timeout_ms=pos_int("DB_WRITE_TIMEOUT_MS", minimum=100),
        db_migrate_timeout_ms=pos_int("DB_MIGRATE_TIMEOUT_MS", minimum=1000),
        db_tcp_user_timeout_ms=pos_int("DB_TCP_USER_TIMEOUT_MS", minimum=1000),
        nats_ping_interval_s=pos_int("NATS_PING_INTERVAL_SECONDS"),
        nats_max_outstanding_pings=pos_int("NATS_MAX_OUTSTANDING_PINGS"),
        livez_stall_ms=pos_int("LIVEZ_STALL_MS", minimum=1000),
        telemetry_compress_after_h=duration_h(
            "TELEMETRY_COMPRESS_AFTER", minimum_h=COMPRESS_AFTER_MIN_S // 3600
        ),
        telemetry_retention_h=duration_h("TELEMETRY_RETENTION", minimum_h=RETENTION_MIN_S // 3600),
        liveness_retention_s=purge("LIVENESS_RETENTION"),
        rejected_retention_s=purge("REJECTED_RETENTION"),
    )
