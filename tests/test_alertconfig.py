"""Alert-config cache and refresh task: precedence, first-fetch backoff, refresh.

Rules for this file: `autojump_clock` with a fake `AlertConfigSource` (fails
or answers at once, so the times asserted are exactly the task's own waits);
every test has a hang guard.
"""

from __future__ import annotations

import trio
import trio.testing

from notip_trio.alertconfig import AlertConfigCache, FetchPolicy, run_alert_configs
from notip_trio.errors import MgmtError
from notip_trio.metrics import Metrics
from notip_trio.mgmt import AlertConfig
from tests.liveness_fakes import make_settings, sample

GUARD_S = 3600

CONFIGS_A = [
    AlertConfig("t1", 20_000),
    AlertConfig("t1", 50_000, "gw1"),
]
CONFIGS_B = [AlertConfig("t1", 90_000)]


class FakeSource:
    """Answers from `script`, one entry per call: a list of configs or an exception."""

    def __init__(self, *script: list[AlertConfig] | MgmtError, then: object = None) -> None:
        self.script = list(script)
        self.then = then  # what to answer once the script is used up
        self.times: list[float] = []

    async def list_alert_configs(self) -> list[AlertConfig]:
        self.times.append(trio.current_time())
        item = self.script.pop(0) if self.script else self.then
        if isinstance(item, MgmtError):
            raise item
        assert isinstance(item, list)
        return item


def test_precedence_gateway_then_tenant_then_default() -> None:
    cache = AlertConfigCache(60_000)
    assert cache.timeout_ms("t1", "gw1") == 60_000  # nothing loaded: default
    assert cache.replace([*CONFIGS_A, AlertConfig("t2", 5_000, "gw9")])
    assert cache.timeout_ms("t1", "gw1") == 50_000  # gateway entry
    assert cache.timeout_ms("t1", "gw2") == 20_000  # tenant entry
    assert cache.timeout_ms("t2", "gw1") == 60_000  # t2 has only a gateway entry
    assert cache.timeout_ms("t2", "gw9") == 5_000
    assert cache.timeout_ms("t3", "gw1") == 60_000  # default


def test_replace_reports_changes_through_version() -> None:
    cache = AlertConfigCache(60_000)
    assert not cache.loaded
    assert cache.replace(CONFIGS_A)
    assert (cache.loaded, cache.version) == (True, 1)
    assert not cache.replace(list(reversed(CONFIGS_A)))  # same table
    assert cache.version == 1
    assert cache.replace(CONFIGS_B)
    assert cache.version == 2
    assert cache.timeout_ms("t1", "gw1") == 90_000


async def test_started_at_once_with_defaults_meanwhile(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        settings = make_settings(alert_config_default_timeout_ms=60_000)
        cache = AlertConfigCache(settings.alert_config_default_timeout_ms)

        class HangingSource:
            async def list_alert_configs(self) -> list[AlertConfig]:
                await trio.sleep_forever()
                raise AssertionError("unreachable")

        async with trio.open_nursery() as nursery:
            await nursery.start(
                run_alert_configs,
                HangingSource(),
                cache,
                FetchPolicy.from_settings(settings),
                Metrics(),
            )
            assert trio.current_time() == 0
            assert cache.timeout_ms("t1", "gw1") == 60_000
            nursery.cancel_scope.cancel()


async def test_first_fetch_backoff_doubles_up_to_the_cap(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        settings = make_settings(
            alert_config_max_retries=6,
            alert_config_initial_backoff_ms=1000,
            alert_config_max_backoff_ms=4000,
            alert_config_refresh_ms=100_000,
        )
        metrics = Metrics()
        cache = AlertConfigCache(settings.alert_config_default_timeout_ms)
        source = FakeSource(then=MgmtError("down"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                run_alert_configs, source, cache, FetchPolicy.from_settings(settings), metrics
            )
            await trio.sleep(150)
            nursery.cancel_scope.cancel()
        # Waits 1, 2, 4, 4, 4 between six attempts; then on defaults, and the
        # regular refresh starts from the moment the first phase gave up (15).
        assert source.times == [0, 1, 3, 7, 11, 15, 115]
        assert sample(metrics, "alert_cache_refresh_errors_total") == 7
        assert not cache.loaded
        assert cache.timeout_ms("t1", "gw1") == settings.alert_config_default_timeout_ms


async def test_first_fetch_success_after_failures(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        settings = make_settings(alert_config_refresh_ms=30_000)
        metrics = Metrics()
        cache = AlertConfigCache(settings.alert_config_default_timeout_ms)
        source = FakeSource(MgmtError("down"), MgmtError("down"), CONFIGS_A, then=CONFIGS_A)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                run_alert_configs, source, cache, FetchPolicy.from_settings(settings), metrics
            )
            await trio.sleep(4)
            assert source.times == [0, 1, 3]
            assert cache.timeout_ms("t1", "gw1") == 50_000
            assert sample(metrics, "alert_cache_last_success_timestamp") > 1.7e9
            await trio.sleep(60)
            nursery.cancel_scope.cancel()
        assert source.times == [0, 1, 3, 33, 63]  # refresh on a fixed schedule
        assert sample(metrics, "alert_cache_refresh_errors_total") == 2


async def test_failed_refresh_keeps_last_configs(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD_S):
        settings = make_settings(alert_config_refresh_ms=10_000)
        metrics = Metrics()
        cache = AlertConfigCache(settings.alert_config_default_timeout_ms)
        source = FakeSource(CONFIGS_A, MgmtError("down"), MgmtError("down"), CONFIGS_B)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                run_alert_configs, source, cache, FetchPolicy.from_settings(settings), metrics
            )
            await trio.sleep(25)
            assert source.times == [0, 10, 20]
            assert cache.timeout_ms("t1", "gw1") == 50_000  # still CONFIGS_A
            assert cache.timeout_ms("t1", "gw7") == 20_000
            assert sample(metrics, "alert_cache_refresh_errors_total") == 2
            await trio.sleep(10)
            assert cache.timeout_ms("t1", "gw1") == 90_000  # CONFIGS_B at 30
            nursery.cancel_scope.cancel()
