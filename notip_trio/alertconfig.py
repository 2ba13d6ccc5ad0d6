"""Alert-config cache and its refresh task (docs/contract.md Behaviour 5).

`AlertConfigCache.timeout_ms(tenant, gateway)` answers with the gateway's own
entry, else the tenant's entry without `gateway_id`, else the default
(`ALERT_CONFIG_DEFAULT_TIMEOUT_MS`). It answers from the start: until the first
fetch succeeds every gateway gets the default.

`run_alert_configs` keeps the cache filled: a first fetch with backoff, then a
refresh every `ALERT_CONFIG_REFRESH_MS`. A failed fetch never empties the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .config import Settings
from .errors import MgmtError
from .log import get_logger
from .metrics import Metrics
from .mgmt import AlertConfig

log = get_logger(__name__)


class AlertConfigSource(Protocol):
    async def list_alert_configs(self) -> list[AlertConfig]:
        """All entries; raises MgmtError when the management API cannot answer."""
        ...


@dataclass(frozen=True, slots=True)
class ConfigTable:
    """One immutable alert-config table; the cache swaps whole tables."""

    by_gateway: Mapping[tuple[str, str], int] = field(default_factory=dict)
    by_tenant: Mapping[str, int] = field(default_factory=dict)

    def changed_since(self, old: ConfigTable) -> tuple[set[str], set[tuple[str, str]]]:
        """Tenants whose tenant-wide entry differs, and gateway entries that differ."""
        tenants = {
            t
            for t in self.by_tenant.keys() | old.by_tenant.keys()
            if self.by_tenant.get(t) != old.by_tenant.get(t)
        }
        gateways = {
            k
            for k in self.by_gateway.keys() | old.by_gateway.keys()
            if self.by_gateway.get(k) != old.by_gateway.get(k)
        }
        return tenants, gateways


class AlertConfigCache:
    """Timeout lookup by precedence: gateway entry, tenant entry, default.

    `table` is replaced as a whole (never mutated) and `version` grows by one
    each time `replace` changes it, so users that derive state from timeouts
    (the liveness tracker) can keep the table they last saw and diff against
    it. Duplicate entries for the same key: the last one wins.
    """

    __slots__ = ("default_timeout_ms", "loaded", "table", "version")

    def __init__(self, default_timeout_ms: int) -> None:
        self.default_timeout_ms = default_timeout_ms
        self.table = ConfigTable()
        self.loaded = False  # True once a fetch has succeeded
        self.version = 0

    def timeout_ms(self, tenant_id: str, gateway_id: str) -> int:
        table = self.table
        found = table.by_gateway.get((tenant_id, gateway_id))
        if found is not None:
            return found
        return table.by_tenant.get(tenant_id, self.default_timeout_ms)

    def tenant_timeouts(self) -> Callable[[str], int | None]:
        """The bulk form (a takeover): a lookup giving a tenant's timeout for all
        its gateways, or None when some of them have an entry of their own (ask
        `timeout_ms` for each then). For the current table."""
        table = self.table
        mixed = {tenant for tenant, _ in table.by_gateway}
        get, default = table.by_tenant.get, self.default_timeout_ms
        return lambda tenant: None if tenant in mixed else get(tenant, default)

    def replace(self, configs: Iterable[AlertConfig]) -> bool:
        """Install a freshly fetched list; return True if any timeout changed."""
        by_gateway: dict[tuple[str, str], int] = {}
        by_tenant: dict[str, int] = {}
        for c in configs:
            if c.gateway_id is None:
                by_tenant[c.tenant_id] = c.timeout_ms
            else:
                by_gateway[(c.tenant_id, c.gateway_id)] = c.timeout_ms
        self.loaded = True
        if by_gateway == self.table.by_gateway and by_tenant == self.table.by_tenant:
            return False
        self.table = ConfigTable(by_gateway, by_tenant)
        self.version += 1
        return True

    def __len__(self) -> int:
        return len(self.table.by_gateway) + len(self.table.by_tenant)


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """How configs are fetched: the first fetch's attempts and back-off, then refreshes."""

    attempts: int
    initial_backoff_s: float
    max_backoff_s: float
    refresh_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchPolicy:
        return cls(
            attempts=settings.alert_config_max_retries,
            initial_backoff_s=settings.alert_config_initial_backoff_s,
            max_backoff_s=settings.alert_config_max_backoff_s,
            refresh_s=settings.alert_config_refresh_s,
        )


async def run_alert_configs(
    source: AlertConfigSource,
    cache: AlertConfigCache,
    policy: FetchPolicy,
    metrics: Metrics,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Fill `cache` and keep it fresh. Never returns unless cancelled.

    Calls `task_status.started()` at once, before the first fetch: liveness must
    not wait on the management API, and the cache answers with the default
    timeout meanwhile.

    First fetch: up to `policy.attempts` attempts, waiting
    `initial_backoff_s`, then twice that, ... capped at `max_backoff_s` between
    them; if all fail, log it and run on the default. Then refresh every
    `refresh_s` on a fixed schedule; a failed refresh keeps the
    last good configs. Each failed fetch counts `alert_cache_refresh_errors`;
    each success sets `alert_cache_last_success` to the wall-clock time.
    """
    task_status.started()
    backoff_s = policy.initial_backoff_s
    max_backoff_s = policy.max_backoff_s
    attempts = policy.attempts
    for attempt in range(1, attempts + 1):
        if await _fetch(source, cache, metrics, phase="initial", attempt=attempt):
            break
        if attempt < attempts:
            await trio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, max_backoff_s)
    else:
        log.error(
            "alert_configs_unavailable_using_default",
            attempts=attempts,
            default_timeout_ms=cache.default_timeout_ms,
        )

    refresh_s = policy.refresh_s
    start = trio.current_time()
    n = 0
    while True:
        n += 1
        # Multiplying instead of accumulating keeps the schedule from drifting.
        await trio.sleep_until(start + n * refresh_s)
        await _fetch(source, cache, metrics, phase="refresh", attempt=1)


async def _fetch(
    source: AlertConfigSource,
    cache: AlertConfigCache,
    metrics: Metrics,
    *,
    phase: str,
    attempt: int,
) -> bool:
    try:
        configs = await source.list_alert_configs()
    except MgmtError as exc:
        metrics.alert_cache_refresh_errors.inc()
        log.warning(
            "alert_configs_fetch_failed",
            phase=phase,
            attempt=attempt,
            error=str(exc),
            keeping=len(cache),
        )
        return False
    changed = cache.replace(configs)
    metrics.alert_cache_last_success.set_to_current_time()
    if changed or phase == "initial":
        log.info("alert_configs_loaded", phase=phase, entries=len(configs), changed=changed)
    return True
