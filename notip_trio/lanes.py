"""The liveness index: which online gateway is due, without looking at the others.

Pure bookkeeping (no Trio, no I/O), as trio keeps `Deadlines` apart from
`CancelScope`. Online gateways sit in insertion-ordered "lanes", one per
distinct timeout, each ordered by last-seen: refreshing a gateway moves it to
the end of its lane, so `due(horizon)` only looks at the front of each lane
until it meets a gateway that is not due. Cost: O(due + lanes), whatever the
number of gateways.

Last-seen is the time each message reached the stream, and batches from
several replicas may apply slightly out of order; a lane stays ordered because
its order key is clamped to the lane's newest key (`max`). The true last-seen
is kept beside it for the wire. A clamped gateway is found due at most as late
as the disorder, never early. Rows read together (a takeover's whole state, one
tick's changes) go in through `set_many`, oldest first, so the order they were
read in delays nobody: only disorder across reads is clamped.

When the timeout table changes, `retime` moves only the gateways whose timeout
changed, sorted, into lanes of their own (a lane cannot take entries in the
middle, and merging into the existing lanes would cost O(n)); lanes that empty
are dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from operator import itemgetter

Key = tuple[str, str]  # (tenant_id, gateway_id)


@dataclass(frozen=True, slots=True)
class Due:
    key: Key
    seen: float  # true last-seen, seconds since the epoch
    timeout_ms: int


class _Lane:
    __slots__ = ("order", "tail", "timeout_ms", "timeout_s")

    def __init__(self, timeout_ms: int) -> None:
        self.timeout_ms = timeout_ms
        self.timeout_s = timeout_ms / 1000
        self.order: OrderedDict[Key, _Entry] = OrderedDict()
        self.tail = -float("inf")  # the newest order key in this lane


class _Entry:
    __slots__ = ("lane", "order_key", "seen")

    def __init__(self, seen: float, order_key: float, lane: _Lane) -> None:
        self.seen = seen
        self.order_key = order_key
        self.lane = lane


class LaneIndex:
    """Online gateways by timeout, oldest last-seen first."""

    def __init__(self) -> None:
        self._entries: dict[Key, _Entry] = {}
        self._lanes: dict[int, _Lane] = {}  # newcomers join these, by timeout
        self._moved: list[_Lane] = []  # built by `retime`

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def seen(self, key: Key) -> float | None:
        entry = self._entries.get(key)
        return entry.seen if entry is not None else None

    def timeout_ms(self, key: Key) -> int | None:
        entry = self._entries.get(key)
        return entry.lane.timeout_ms if entry is not None else None

    def set(self, key: Key, seen: float, timeout_ms: int) -> None:
        """Add `key`, or refresh it; a refresh never moves last-seen backwards."""
        entry = self._entries.get(key)
        if entry is not None:
            if seen <= entry.seen:
                return
            lane = entry.lane
            del lane.order[key]
        else:
            lane = self._lanes.get(timeout_ms) or self._new_lane(timeout_ms)
        order_key = max(seen, lane.tail)
        lane.tail = order_key
        if entry is None:
            self._entries[key] = entry = _Entry(seen, order_key, lane)
        else:
            entry.seen, entry.order_key = seen, order_key
        lane.order[key] = entry

    def set_many(self, items: Iterable[tuple[Key, float, int]]) -> None:
        """`set` each (key, seen, timeout_ms), oldest last-seen first: the order of
        `items` clamps nobody."""
        self.set_sorted(sorted(items, key=itemgetter(1)))

    def set_sorted(self, items: Iterable[tuple[Key, float, int]]) -> None:
        """`set_many` for items already sorted by last-seen (a takeover sorts a
        million once, then adds them in slices between checkpoints)."""
        entries, lanes = self._entries, self._lanes
        for key, seen, timeout_ms in items:
            if key in entries:
                self.set(key, seen, timeout_ms)
                continue
            # `set` inlined for a new key: a takeover adds every gateway here.
            lane = lanes.get(timeout_ms) or self._new_lane(timeout_ms)
            tail = lane.tail
            order_key = seen if seen > tail else tail
            lane.tail = order_key
            entries[key] = lane.order[key] = _Entry(seen, order_key, lane)

    def discard(self, key: Key) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        del entry.lane.order[key]
        return True

    def due(self, horizon: float) -> list[Due]:
        """Every gateway with last-seen + timeout < `horizon` (its order key's)."""
        out: list[Due] = []
        for lane in self._all_lanes():
            limit = horizon - lane.timeout_s
            for key, entry in lane.order.items():
                if entry.order_key >= limit:
                    break  # the rest of this lane was seen later still
                out.append(Due(key, entry.seen, lane.timeout_ms))
        return out

    def next_due_after(self, horizon: float) -> float | None:
        """When the first gateway not yet due at `horizon` becomes due (stream
        time: its order key + timeout), or None if every one is due already or
        none is tracked. Steps over the gateways already due (left online by a
        failed publish, paused, or due this very tick): O(due + lanes)."""
        first: float | None = None
        for lane in self._all_lanes():
            limit = horizon - lane.timeout_s
            for entry in lane.order.values():
                if entry.order_key >= limit:
                    at = entry.order_key + lane.timeout_s
                    if first is None or at < first:
                        first = at
                    break
        return first

    def retime(self, changed: Iterable[tuple[Key, int]]) -> int:
        """Give the listed gateways their new timeout; returns how many moved."""
        moved = [
            (key, entry, timeout_ms)
            for key, timeout_ms in changed
            if (entry := self._entries.get(key)) is not None and entry.lane.timeout_ms != timeout_ms
        ]
        moved.sort(key=lambda item: item[1].order_key)
        lanes: dict[int, _Lane] = {}
        for key, entry, timeout_ms in moved:
            del entry.lane.order[key]
            lane = lanes.get(timeout_ms)
            if lane is None:
                lanes[timeout_ms] = lane = _Lane(timeout_ms)
            entry.lane = lane
            lane.order[key] = entry
            lane.tail = entry.order_key
        self._moved = [lane for lane in self._moved if lane.order] + list(lanes.values())
        self._lanes = {t: lane for t, lane in self._lanes.items() if lane.order}
        return len(moved)

    def __iter__(self) -> Iterator[Key]:
        return iter(self._entries)

    def lane_count(self) -> int:
        return len(self._lanes) + len(self._moved)

    def _new_lane(self, timeout_ms: int) -> _Lane:
        self._lanes[timeout_ms] = lane = _Lane(timeout_ms)
        return lane

    def _all_lanes(self) -> list[_Lane]:
        self._moved = [lane for lane in self._moved if lane.order]
        return [*self._lanes.values(), *self._moved]
