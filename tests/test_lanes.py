"""The liveness index alone: pure bookkeeping, no Trio, no I/O."""

from __future__ import annotations

import itertools

from notip_trio.lanes import Due, LaneIndex

A, B, C = ("t1", "a"), ("t1", "b"), ("t2", "c")


def test_due_is_strictly_after_the_timeout_and_oldest_first() -> None:
    index = LaneIndex()
    index.set(A, 100.0, 30_000)
    index.set(B, 105.0, 30_000)
    index.set(C, 121.0, 10_000)
    assert index.due(130.0) == []  # A: 100 + 30 is not *more* than 130
    assert index.due(130.5) == [Due(A, 100.0, 30_000)]
    assert index.due(131.5) == [Due(A, 100.0, 30_000), Due(C, 121.0, 10_000)]
    assert [d.key for d in index.due(200.0)] == [A, B, C]


def test_refresh_moves_to_the_end_and_never_backwards() -> None:
    index = LaneIndex()
    index.set(A, 100.0, 30_000)
    index.set(B, 101.0, 30_000)
    index.set(A, 110.0, 30_000)
    index.set(A, 90.0, 30_000)  # an older message, redelivered: ignored
    assert index.seen(A) == 110.0
    assert [d.key for d in index.due(135.0)] == [B]


def test_an_out_of_order_arrival_is_clamped_in_the_order_but_keeps_its_time() -> None:
    index = LaneIndex()
    index.set(A, 120.0, 30_000)
    index.set(B, 110.0, 30_000)  # applied after A though older (another replica's batch)
    # Behind A in the lane, so judged as if seen at 120; its true last-seen is kept.
    assert index.due(145.0) == []
    assert index.due(150.5) == [Due(A, 120.0, 30_000), Due(B, 110.0, 30_000)]


def test_discard_and_membership() -> None:
    index = LaneIndex()
    index.set(A, 100.0, 30_000)
    assert A in index
    assert len(index) == 1
    assert index.discard(A)
    assert not index.discard(A)
    assert index.due(1000.0) == []
    assert len(index) == 0


def test_retime_moves_only_changed_gateways_into_sorted_lanes() -> None:
    index = LaneIndex()
    for key, seen in ((A, 100.0), (B, 101.0), (C, 102.0)):
        index.set(key, seen, 30_000)
    assert index.retime([(A, 10_000), (B, 30_000), (C, 10_000)]) == 2
    assert (index.timeout_ms(A), index.timeout_ms(B)) == (10_000, 30_000)
    assert [d.key for d in index.due(112.5)] == [A, C]
    index.set(A, 120.0, 10_000)  # a later heartbeat keeps it in its moved lane
    assert [d.key for d in index.due(125.0)] == [C]
    assert index.lane_count() == 2


def test_set_many_judges_every_gateway_on_its_own_last_seen_whatever_the_order() -> None:
    """A takeover loads gateways in no particular order. One by one, a gateway
    loaded after a newer one is clamped behind it (found due late, by up to the
    spread of the load); together, each is due at its own last-seen + timeout."""
    rows = [
        (A, 120.0, 30_000),
        (B, 100.0, 30_000),
        (C, 100.0, 30_000),
        (("t1", "d"), 110.0, 30_000),
    ]
    one_by_one = LaneIndex()
    for key, seen, timeout_ms in rows:
        one_by_one.set(key, seen, timeout_ms)
    assert one_by_one.due(130.5) == []  # B and C wait behind A (seen at 120)
    for order in itertools.permutations(rows):
        index = LaneIndex()
        index.set_many(order)
        assert [d.key for d in index.due(130.5)] in ([B, C], [C, B])
        assert [d.key for d in index.due(140.5)][2:] == [("t1", "d")]
        assert index.due(150.5)[-1] == Due(A, 120.0, 30_000)
