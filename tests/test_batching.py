"""The adaptive batch size (notip_trio.batching): pure, no clock, no I/O."""

from __future__ import annotations

import pytest

from notip_trio.batching import BatchPolicy
from notip_trio.js.specs import PullSpec


def _backlog(policy: BatchPolicy) -> int:
    """One pull that came back full at once with more than a request still pending."""
    size = policy.size
    return policy.observe(requested=size, got=size, elapsed_s=0.005, pending=100_000)


def test_starts_at_the_minimum() -> None:
    assert BatchPolicy(100, 5000, 0.1).size == 100


def test_a_backlog_grows_it_to_the_maximum_in_a_few_pulls_and_keeps_it_there() -> None:
    policy = BatchPolicy(100, 5000, 0.1)
    sizes = [_backlog(policy) for _ in range(5)]
    assert sizes == [400, 1600, 5000, 5000, 5000]


def test_growth_is_at_most_fourfold_per_pull() -> None:
    policy = BatchPolicy(100, 100_000, 0.1)
    assert _backlog(policy) == 400


def test_a_trickle_shrinks_it_by_at_most_half_per_pull_down_to_the_minimum() -> None:
    policy = BatchPolicy(100, 5000, 0.1)
    for _ in range(3):
        _backlog(policy)
    sizes = []
    for _ in range(8):
        # 500 msgs/s over two slots: ~50 per expired 200 ms request, nothing pending.
        sizes.append(policy.observe(requested=policy.size, got=50, elapsed_s=0.23, pending=0))
    assert sizes == [2500, 1250, 625, 312, 156, 100, 100, 100]


def test_an_empty_pull_goes_towards_the_minimum() -> None:
    policy = BatchPolicy(100, 5000, 0.1)
    policy.size = 400
    assert policy.observe(requested=400, got=0, elapsed_s=0.23, pending=0) == 200
    assert policy.observe(requested=200, got=0, elapsed_s=0.23, pending=0) == 100


def test_a_steady_stream_settles_where_a_request_fills_in_the_target_time() -> None:
    # 10,000 msgs/s per slot, no backlog: the size that fills in 100 ms is 1,000.
    policy = BatchPolicy(100, 5000, 0.1)
    policy.size = 5000
    for _ in range(10):
        size = policy.size
        got = size
        policy.observe(requested=size, got=got, elapsed_s=got / 10_000, pending=0)
    assert policy.size == 1000


def test_full_pulls_without_backlog_do_not_grow_beyond_the_fill_target() -> None:
    # Pulls fill (a live stream) but nothing waits behind them: bigger requests
    # would only make the first message of each batch wait longer.
    policy = BatchPolicy(100, 5000, 0.1)
    policy.size = 1000
    for _ in range(5):
        policy.observe(requested=1000, got=1000, elapsed_s=0.1, pending=10)
    assert policy.size == 1000


def test_a_full_pull_with_a_backlog_behind_it_grows_even_if_it_filled_slowly() -> None:
    policy = BatchPolicy(100, 5000, 0.1)
    policy.size = 1000
    assert policy.observe(requested=1000, got=1000, elapsed_s=0.2, pending=5000) == 2000


def test_a_short_pull_never_counts_as_backlog() -> None:
    policy = BatchPolicy(100, 5000, 0.1)
    policy.size = 1000
    # Pending is large but the request came back short (e.g. a 409 or a reconnect).
    assert policy.observe(requested=1000, got=10, elapsed_s=0.2, pending=50_000) == 500


def test_equal_bounds_keep_the_size_fixed() -> None:
    policy = BatchPolicy(1000, 1000, 0.1)
    assert policy.fixed
    assert _backlog(policy) == 1000
    assert policy.observe(requested=1000, got=0, elapsed_s=0.2, pending=0) == 1000


@pytest.mark.parametrize(("low", "high", "fill"), [(0, 10, 0.1), (11, 10, 0.1), (1, 10, 0.0)])
def test_bad_bounds_are_refused(low: int, high: int, fill: float) -> None:
    with pytest.raises(ValueError, match=r"must be|need"):
        BatchPolicy(low, high, fill)


def test_pull_spec_policy_bounds_and_target() -> None:
    spec = PullSpec("S", "d", "s.>", 5000, 0.2, 2, 35000, batch_min=100)
    policy = spec.policy()
    assert (policy.minimum, policy.maximum, policy.target_fill_s) == (100, 5000, 0.1)
    fixed = PullSpec("S", "d", "s.>", 100, 1.0, 1, 1000).policy()
    assert (fixed.minimum, fixed.maximum, fixed.size) == (100, 100, 100)
    # A minimum above the maximum never makes a request larger than `batch`.
    assert PullSpec("S", "d", "s.>", 50, 0.2, 2, 1000, batch_min=100).policy().size == 50
