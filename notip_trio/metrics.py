"""Prometheus metrics: the fixed names of docs/contract.md plus our own, on one registry.

One `Metrics` object is made in `app` and handed to every part; no module-level
collectors, so tests get a fresh registry each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_P = "notip_consumer_"

WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
TICK_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


@dataclass(eq=False)
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        # --- fixed names (docs/contract.md) ---
        self.messages_received = Counter(
            _P + "messages_received", "Telemetry messages fetched from JetStream", registry=r
        )
        self.message_parsing_errors = Counter(
            _P + "message_parsing_errors",
            "Telemetry messages rejected as bad input, by reason",
            ["reason"],
            registry=r,
        )
        self.messages_written = Counter(
            _P + "messages_written",
            "Telemetry messages committed (acked once their last-seen is stored too)",
            registry=r,
        )
        self.write_errors = Counter(_P + "write_errors", "Failed batch writes", registry=r)
        self.alerts_published = Counter(
            _P + "alerts_published", "Offline alerts acknowledged by JetStream", registry=r
        )
        self.alert_publish_errors = Counter(
            _P + "alert_publish_errors", "Offline alerts that could not be published", registry=r
        )
        self.status_update_errors = Counter(
            _P + "status_update_errors", "Gateway status updates that failed", registry=r
        )
        self.status_update_dropped = Counter(
            _P + "status_update_dropped",
            "Gateway status updates given up for good (superseded or refused; reason in the log)",
            registry=r,
        )
        self.alert_cache_refresh_errors = Counter(
            _P + "alert_cache_refresh_errors", "Failed alert-config fetches", registry=r
        )
        self.nats_reconnects = Counter(_P + "nats_reconnects", "NATS reconnections", registry=r)
        self.lifecycle_query_errors = Counter(
            _P + "lifecycle_query_errors", "Failed or invalid get-status queries", registry=r
        )
        self.heartbeat_map_size = Gauge(
            _P + "heartbeat_map_size", "Gateways tracked for liveness", registry=r
        )
        self.dispatch_queue_length = Gauge(
            _P + "dispatch_queue_length",
            "Status updates waiting to be sent (on the leader: pending in the outbox table)",
            registry=r,
        )
        self.alert_cache_last_success = Gauge(
            _P + "alert_cache_last_success_timestamp",
            "Unix time of the last successful alert-config fetch",
            registry=r,
        )
        self.write_duration = Histogram(
            _P + "write_duration_seconds",
            "Time to write one batch",
            buckets=WRITE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            _P + "batch_size", "Messages per written batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.heartbeat_tick_duration = Histogram(
            _P + "heartbeat_tick_duration_seconds",
            "Time spent in one heartbeat tick",
            buckets=TICK_BUCKETS,
            registry=r,
        )
        # --- our own ---
        self.duplicates_skipped = Counter(
            _P + "duplicate_messages_skipped",
            "Redelivered telemetry messages whose row already existed",
            registry=r,
        )
        self.rejected_stored = Counter(
            _P + "rejected_messages_stored", "Bad messages kept in telemetry_rejected", registry=r
        )
        self.consumer_pending = Gauge(
            _P + "consumer_pending_messages",
            "Messages in the stream not yet delivered to the durable consumer (lag)",
            registry=r,
        )
        self.consumer_ack_pending = Gauge(
            _P + "consumer_ack_pending_messages",
            "Telemetry messages delivered to this daemon and not yet acked, naked or terminated",
            registry=r,
        )
        self.dispatch_queue_capacity = Gauge(
            _P + "dispatch_queue_capacity",
            "Status updates the dispatcher reads from the outbox at once (GATEWAY_BUFFER_SIZE)",
            registry=r,
        )
        self.gateways_online = Gauge(
            _P + "gateways_online", "Tracked gateways currently online", registry=r
        )
        self.gateways_offline = Gauge(
            _P + "gateways_offline", "Tracked gateways currently offline", registry=r
        )
        self.lifecycle_breaker_trips = Counter(
            _P + "lifecycle_breaker_trips",
            "Times get-status failed often enough in a row to fail open without asking",
            registry=r,
        )
        self.lifecycle_breaker_open = Gauge(
            _P + "lifecycle_breaker_open",
            "1 while get-status is not asked (the management API is failing)",
            registry=r,
        )
        self.lifecycle_queries_skipped = Counter(
            _P + "lifecycle_queries_skipped",
            "Offline candidates alerted without asking get-status (breaker open)",
            registry=r,
        )
        self.alerts_suppressed_paused = Counter(
            _P + "alerts_suppressed_paused", "Offline candidates skipped as paused", registry=r
        )
        self.decommission_rejected = Counter(
            _P + "decommission_rejected",
            "Decommission messages terminated because their subject was malformed",
            registry=r,
        )
        # Two settings as gauges, so alert rules can compare with them
        # (deploy/prometheus/notip-trio.rules.yaml) whatever the configuration.
        self.heartbeat_tick_interval = Gauge(
            _P + "heartbeat_tick_interval_seconds",
            "HEARTBEAT_TICK_MS in seconds: the liveness tick period",
            registry=r,
        )
        self.alert_cache_refresh_interval = Gauge(
            _P + "alert_cache_refresh_interval_seconds",
            "ALERT_CONFIG_REFRESH_MS in seconds: the alert-config refresh period",
            registry=r,
        )
        self.gateways_decommissioned = Counter(
            _P + "gateways_decommissioned",
            "Decommission messages handled (gateway removed from liveness tracking)",
            registry=r,
        )
        self.liveness_leader = Gauge(
            _P + "liveness_leader",
            "1 while this replica holds the liveness lock and ticks, else 0",
            registry=r,
        )
        self.liveness_takeovers = Counter(
            _P + "liveness_takeovers",
            "Times this replica became the liveness leader",
            registry=r,
        )
        self.last_seen_flush_errors = Counter(
            _P + "last_seen_flush_errors",
            "Failed writes of gateways' last-seen to the liveness state (retried)",
            registry=r,
        )
        self.stream_clock_skew = Gauge(
            _P + "stream_clock_skew_seconds",
            "This host's clock minus the stream's (NATS server's), estimated from deliveries"
            " (an upper bound; silences are judged in stream time)",
            registry=r,
        )
        self.alert_horizon_lag = Gauge(
            _P + "alert_horizon_lag_seconds",
            "On the leader: how far the alert horizon (stream time of the first message not"
            " yet acknowledged) trails stream-now",
            registry=r,
        )
        self.purged_rows = Counter(
            _P + "purged_rows",
            "Rows the leader's janitor deleted after their retention, by table"
            " (gateway_liveness: offline rows and tombstones; telemetry_rejected)",
            ["table"],
            registry=r,
        )
        self.janitor_errors = Counter(
            _P + "janitor_errors",
            "Janitor runs ended by a database error (the next run starts over)",
            registry=r,
        )
        self.status_updates_sent = Counter(
            _P + "status_updates_sent",
            "Status updates delivered to the management API (update-status succeeded)",
            registry=r,
        )
