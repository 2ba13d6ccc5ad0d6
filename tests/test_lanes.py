"""The liveness index alone: pure bookkeeping, no Trio, no I/O."""

from __future__ import annotations

import gc
import itertools
import random

from notip_trio.lanes import Due, Key, LaneIndex

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


def test_next_due_after_skips_the_due_and_the_stale() -> None:
    index = LaneIndex()
    assert index.next_due_after(100.0) is None  # nobody tracked
    index.set(A, 100.0, 30_000)
    index.set(B, 105.0, 30_000)
    index.set(C, 121.0, 10_000)
    assert index.next_due_after(120.0) == 130.0  # A: due once the horizon passes 130
    assert index.next_due_after(130.5) == 131.0  # A is due already: C next
    index.set(C, 125.0, 10_000)  # refreshed: its old slot is stale
    assert index.next_due_after(130.5) == 135.0  # B (105 + 30) and C (125 + 10)
    index.discard(B)
    assert index.next_due_after(130.5) == 135.0
    assert index.next_due_after(136.0) is None  # every one due: nothing to wait for
    assert [d.key for d in index.due(136.0)] == [A, C]  # untouched by the look


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


def _stage(index: LaneIndex, timeout_ms: int, *chunks: list[tuple[Key, float]]) -> int:
    """Stages each chunk, then settles; returns how many times `settle` yielded."""
    for items in chunks:
        index.stage(timeout_ms, [k for k, _ in items], [s for _, s in items])
    return sum(1 for _ in index.settle())


def test_staged_chunks_go_in_last_seen_order_whatever_the_order_given() -> None:
    index = LaneIndex()
    index.stage(30_000, [A, B], [105.0, 100.0])
    index.stage(30_000, [C], [101.0])
    assert len(index) == 3
    assert A in index
    assert index.seen(B) == 100.0
    assert index.due(200.0) == []  # staged: not in a lane's order yet
    assert sum(1 for _ in index.settle()) == 2  # the sort + one slice
    assert [d.key for d in index.due(200.0)] == [B, C, A]
    assert index.slot_count() == 3
    index.set(B, 110.0, 30_000)  # a refresh after the load: to the end
    assert [d.key for d in index.due(200.0)] == [C, A, B]


def test_a_key_staged_again_goes_through_set_and_the_newest_time_wins() -> None:
    index = LaneIndex()
    _stage(index, 30_000, [(A, 100.0), (B, 101.0)], [(A, 104.0)])
    assert len(index) == 2
    assert index.seen(A) == 104.0
    # A was `set` (to 104) before the settle: B settles clamped behind it.
    assert index.due(200.0) == [Due(A, 104.0, 30_000), Due(B, 101.0, 30_000)]
    assert index.slot_count() == 2  # A's staged slot was never put in the lane


def test_staging_keys_already_there_or_behind_the_lane_goes_through_set() -> None:
    index = LaneIndex()
    index.set(A, 120.0, 30_000)
    _stage(index, 30_000, [(A, 110.0), (B, 100.0), (C, 130.0)])
    # A keeps its newer time; B, older than the lane's newest, is clamped behind A.
    assert (index.seen(A), index.seen(B), index.seen(C)) == (120.0, 100.0, 130.0)
    assert index.due(150.5) == [Due(A, 120.0, 30_000), Due(B, 100.0, 30_000)]
    assert len(index) == 3
    fresh = LaneIndex()
    fresh.stage(30_000, [B], [100.0])
    fresh.set(C, 130.0, 30_000)  # set while B is staged: B settles clamped behind C
    assert sum(1 for _ in fresh.settle()) == 1
    assert fresh.due(150.5) == []
    assert fresh.due(160.5) == [Due(C, 130.0, 30_000), Due(B, 100.0, 30_000)]


def test_clear_forgets_staged_and_settled_gateways() -> None:
    index = LaneIndex()
    index.set(A, 100.0, 30_000)
    index.stage(30_000, [B], [100.0])
    index.clear()
    assert len(index) == 0
    assert list(index.settle()) == []
    assert index.due(1000.0) == []
    assert index.lane_count() == 0


def test_stale_slots_are_dropped_by_due_and_compacted_past_the_slack() -> None:
    index = LaneIndex(slack=2)
    for i, key in enumerate((A, B, C)):
        index.set(key, 100.0 + i, 30_000)
    index.set(A, 110.0, 30_000)  # A's first slot is stale now
    index.set(B, 111.0, 30_000)
    assert index.slot_count() == 5
    index.set(C, 112.0, 30_000)
    index.set(A, 113.0, 30_000)
    assert index.slot_count() == 7  # 4 stale, 3 live: not beyond 3 + 2
    index.set(B, 114.0, 30_000)
    assert index.slot_count() == 8  # 5 stale: not beyond 3 + 2 either
    index.set(C, 115.0, 30_000)  # 6 stale > 3 + 2: compacted
    assert index.slot_count() == 3
    assert [d.key for d in index.due(200.0)] == [A, B, C]
    index.discard(A)
    index.set(B, 120.0, 30_000)
    # The stale in front (A's, B's) are dropped; the due one stays for the next call.
    assert [d.key for d in index.due(145.5)] == [C]
    assert index.slot_count() == 2
    assert [d.key for d in index.due(145.5)] == [C]


def test_stale_slots_between_due_ones_are_dropped_once() -> None:
    index = LaneIndex()
    index.set(A, 100.0, 30_000)
    index.set(B, 101.0, 30_000)
    index.set(C, 102.0, 30_000)
    index.discard(B)  # between two due gateways
    assert [d.key for d in index.due(140.0)] == [A, C]
    assert index.slot_count() == 2
    assert [d.key for d in index.due(140.0)] == [A, C]


def test_retime_leaves_stale_slots_behind_and_drops_empty_lanes() -> None:
    index = LaneIndex()
    index.set(A, 100.0, 30_000)
    index.set(B, 101.0, 30_000)
    assert index.retime([(A, 10_000), (B, 10_000), (A, 10_000)]) == 2
    assert index.lane_count() == 1
    assert index.slot_count() == 2
    assert [d.key for d in index.due(111.5)] == [A, B]
    assert index.timeout_ms(A) == 10_000


class _Model:
    """What the index must answer, the simple way: a dict and a sort."""

    def __init__(self) -> None:
        self.seen: dict[Key, float] = {}
        self.order: dict[Key, float] = {}
        self.timeout: dict[Key, int] = {}
        self.tails: dict[int, float] = {}

    def set(self, key: Key, seen: float, timeout_ms: int) -> None:
        if key in self.seen:
            if seen <= self.seen[key]:
                return
            timeout_ms = self.timeout[key]
        tail = max(self.tails.get(timeout_ms, -1e18), seen)
        self.tails[timeout_ms] = tail
        self.seen[key], self.order[key], self.timeout[key] = seen, tail, timeout_ms

    def discard(self, key: Key) -> None:
        for table in (self.seen, self.order, self.timeout):
            table.pop(key, None)

    def due(self, horizon: float) -> set[Due]:
        return {
            Due(k, self.seen[k], self.timeout[k])
            for k in self.seen
            if self.order[k] < horizon - self.timeout[k] / 1000
        }

    def next_due_after(self, horizon: float) -> float | None:
        ats = [
            self.order[k] + self.timeout[k] / 1000
            for k in self.seen
            if self.order[k] >= horizon - self.timeout[k] / 1000
        ]
        return min(ats, default=None)


def test_random_operations_match_a_simple_model() -> None:
    rng = random.Random(20)
    keys = [(f"t{i % 3}", f"g{i}") for i in range(40)]
    for _ in range(30):
        index, model = LaneIndex(slack=rng.choice([0, 1, 5])), _Model()
        now = 1000.0
        for _ in range(300):
            op = rng.random()
            key = rng.choice(keys)
            if op < 0.6:
                seen = now - rng.uniform(0, 20)
                timeout_ms = rng.choice([10_000, 20_000])
                index.set(key, seen, timeout_ms)
                model.set(key, seen, timeout_ms)
            elif op < 0.8:
                index.discard(key)
                model.discard(key)
            else:
                now += rng.uniform(0, 10)
            assert index.next_due_after(now) == model.next_due_after(now)
            due = index.due(now)
            assert set(due) == model.due(now)
            assert len(due) == len(set(due))
            assert len(index) == len(model.seen)
            assert all(index.seen(k) == model.seen.get(k) for k in keys)
            assert index.slot_count() <= 2 * len(index) + index._slack


def test_slots_hold_only_atomic_values_so_the_collector_untracks_them() -> None:
    """A million slots must cost the cyclic collector nothing: a slot refers to
    its lane by number, so a collection untracks it (a reference to the lane
    kept each one tracked, and every full collection traversed them all)."""
    index = LaneIndex()
    index.set(A, 100.0, 30_000)
    _stage(index, 10_000, [(B, 101.0), (C, 102.0)])
    gc.collect()
    slots = [index._entries[key] for key in (A, B, C)]
    assert [gc.is_tracked(slot) for slot in slots] == [False, False, False]
    assert [index.timeout_ms(key) for key in (A, B, C)] == [30_000, 10_000, 10_000]
