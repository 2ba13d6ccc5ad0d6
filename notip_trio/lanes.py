"""The liveness index: which online gateway is due, without looking at the others.

Pure bookkeeping (no Trio, no I/O), as trio keeps `Deadlines` apart from
`CancelScope`. Online gateways sit in "lanes", one per distinct timeout, each
a queue ordered by last-seen: refreshing a gateway appends it to the end of its
lane, so `due(horizon)` only looks at the front of each lane until it meets a
gateway that is not due. Cost: O(due + lanes), whatever the number of gateways.

A lane holds slots, (order key, key, lane number) tuples, and a dict maps each key to
its current slot: a refresh or a removal leaves the old slot behind, stale,
instead of taking it out of the middle of the queue (no per-gateway linked
list: a takeover of a million gateways builds the dict and the queues in bulk,
measured ~3x faster than an `OrderedDict` per lane, with ~100 B less per
gateway). `due` drops the stale slots it meets, and a lane whose stale slots
outnumber its live ones (by more than `slack`) is compacted in one pass, so
they never cost more than the live ones: memory O(gateways), and each refresh
O(1) amortized.

Last-seen is the time each message reached the stream, and batches from
several replicas may apply slightly out of order; a lane stays ordered because
its order key is clamped to the lane's newest key (`max`). The true last-seen
of a clamped gateway is kept beside it for the wire. A clamped gateway is found
due at most as late as the disorder, never early. Rows read together (a
takeover's whole state, one tick's changes) go in through `set_many` or `stage`,
oldest first, so the order they were read in delays nobody: only disorder
across reads is clamped.

When the timeout table changes, `retime` moves only the gateways whose timeout
changed, sorted, into lanes of their own (a lane cannot take entries in the
middle, and merging into the existing lanes would cost O(n)); lanes that empty
are dropped.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from typing import Final

Key = tuple[str, str]  # (tenant_id, gateway_id)

# Stale slots a lane may hold beyond its live ones before it is compacted.
COMPACT_SLACK: Final = 4096
# Gateways `settle` adds between two of its yields (~20 ms on a busy 2-core host).
FILL_SLICE: Final = 50_000


@dataclass(frozen=True, slots=True)
class Due:
    key: Key
    seen: float  # true last-seen, seconds since the epoch
    timeout_ms: int


class _Lane:
    __slots__ = ("live", "number", "slots", "tail", "timeout_ms", "timeout_s")

    def __init__(self, timeout_ms: int, number: int) -> None:
        self.number = number
        self.timeout_ms = timeout_ms
        self.timeout_s = timeout_ms / 1000
        self.slots: deque[_Slot] = deque()  # oldest order key first; some stale
        self.live = 0  # slots that are their key's current one
        self.tail = -float("inf")  # the newest order key in this lane


# (order key, key, its lane's number). Only atomic values, not the lane itself:
# the cyclic garbage collector untracks such a tuple the first time it looks at
# it, so a million slots cost full collections nothing (a reference to the lane
# kept every slot tracked: ~0.9 s per full collection at 1,000,000 gateways,
# six of them during one mass-outage tick).
_Slot = tuple[float, Key, int]
_order_key = itemgetter(0)
_slot_key = itemgetter(1)


class LaneIndex:
    """Online gateways by timeout, oldest last-seen first."""

    def __init__(self, *, slack: int = COMPACT_SLACK) -> None:
        self._slack = slack
        self._entries: dict[Key, _Slot] = {}  # each key's current slot
        self._late: dict[Key, float] = {}  # true last-seen where clamped (< order key)
        self._lanes: dict[int, _Lane] = {}  # newcomers join these, by timeout
        self._moved: list[_Lane] = []  # built by `retime`
        self._numbered: dict[int, _Lane] = {}  # every lane, by its number
        self._numbers = itertools.count()
        self._staged: dict[int, list[_Slot]] = {}  # by lane number, until `settle`

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Key]:
        return iter(self._entries)

    def seen(self, key: Key) -> float | None:
        slot = self._entries.get(key)
        if slot is None:
            return None
        return self._late.get(key, slot[0]) if self._late else slot[0]

    def timeout_ms(self, key: Key) -> int | None:
        slot = self._entries.get(key)
        return self._numbered[slot[2]].timeout_ms if slot is not None else None

    def set(self, key: Key, seen: float, timeout_ms: int) -> None:
        """Add `key`, or refresh it; a refresh never moves last-seen backwards."""
        slot = self._entries.get(key)
        if slot is None:
            lane = self._lanes.get(timeout_ms) or self._new_lane(timeout_ms)
            lane.live += 1
            self._append(lane, key, seen)
            return
        if seen <= (self._late.get(key, slot[0]) if self._late else slot[0]):
            return
        lane = self._numbered[slot[2]]
        self._append(lane, key, seen)
        self._maybe_compact(lane)

    def set_many(self, items: Iterable[tuple[Key, float, int]]) -> None:
        """`set` each (key, seen, timeout_ms), oldest last-seen first: the order of
        `items` clamps nobody."""
        for key, seen, timeout_ms in sorted(items, key=itemgetter(1)):
            self.set(key, seen, timeout_ms)

    def stage(self, timeout_ms: int, keys: list[Key], seen: list[float]) -> None:
        """A takeover's gateways of one timeout, a chunk at a time while the
        next one is read: into the key dict at once (the costly part, ~0.65 s
        for 1,000,000 keys, done while the main thread would wait for the
        database), into their lane's order only by `settle`. Until then they
        are in the index (`in`, `seen`, `len`) but never due. A batch with a
        key already indexed (a row the load read twice) goes through `set`."""
        lane = self._lanes.get(timeout_ms) or self._new_lane(timeout_ms)
        entries = self._entries
        if entries and not entries.keys().isdisjoint(keys):
            for key, at in zip(keys, seen, strict=True):
                self.set(key, at, timeout_ms)
            return
        slots = list(zip(seen, keys, repeat(lane.number)))
        before = len(entries)
        entries.update(zip(keys, slots, strict=True))  # a repeated key: the last
        lane.live += len(entries) - before
        self._staged.setdefault(lane.number, []).extend(slots)

    def settle(self) -> Iterator[None]:
        """The staged gateways into their lanes, oldest first. A generator: it
        yields after each lane's sort and between slices of `FILL_SLICE`, so the
        caller can let others run."""
        staged, self._staged = self._staged, {}
        entries = self._entries
        for number, slots in staged.items():
            lane = self._numbered[number]
            slots.sort(key=_order_key)
            yield
            if slots[0][0] < lane.tail:  # behind gateways `set` meanwhile: clamp
                for slot in slots:
                    if entries.get(slot[1]) is slot:
                        del entries[slot[1]]
                        lane.live -= 1
                        self.set(slot[1], slot[0], lane.timeout_ms)
                continue
            for start in range(0, len(slots), FILL_SLICE):
                lane.slots.extend(slots[start : start + FILL_SLICE])
                yield
            lane.tail = slots[-1][0]
            self._maybe_compact(lane)

    def clear(self) -> None:
        """Forget every gateway (a takeover that failed half-way)."""
        self._entries.clear()
        self._late.clear()
        self._lanes.clear()
        self._moved.clear()
        self._numbered.clear()
        self._staged.clear()

    def discard(self, key: Key) -> bool:
        slot = self._entries.pop(key, None)
        if slot is None:
            return False
        if self._late:
            self._late.pop(key, None)
        lane = self._numbered[slot[2]]
        lane.live -= 1
        self._maybe_compact(lane)
        return True

    def due(self, horizon: float) -> list[Due]:
        """Every gateway with last-seen + timeout < `horizon` (its order key's).

        Stale slots met on the way are dropped: those in front at once, those
        between due gateways by putting the due ones back without them (so the
        next call does not meet them again)."""
        out: list[Due] = []
        entries, late = self._entries, self._late
        for lane in self._all_lanes():
            limit = horizon - lane.timeout_s
            slots = lane.slots
            while slots and entries.get((front := slots[0])[1]) is not front:
                slots.popleft()
            found = len(out)
            stale = 0
            for slot in slots:
                if slot[0] >= limit:
                    break  # the rest of this lane was seen later still
                key = slot[1]
                if entries.get(key) is slot:
                    seen = late.get(key, slot[0]) if late else slot[0]
                    out.append(Due(key, seen, lane.timeout_ms))
                else:
                    stale += 1
            if stale:
                due = len(out) - found
                for _ in range(due + stale):
                    slots.popleft()
                slots.extendleft(reversed([entries[d.key] for d in out[found:]]))
        return out

    def next_due_after(self, horizon: float) -> float | None:
        """When the first gateway not yet due at `horizon` becomes due (stream
        time: its order key + timeout), or None if every one is due already or
        none is tracked.

        Steps over the gateways already due (left online by a failed publish,
        paused) and drops the stale slots it meets, as `due` does: O(due +
        lanes), plus the stale slots dropped, each once."""
        first: float | None = None
        entries = self._entries
        for lane in self._all_lanes():
            limit = horizon - lane.timeout_s
            slots = lane.slots
            kept: list[_Slot] = []
            while slots:
                slot = slots[0]
                if entries.get(slot[1]) is not slot:
                    slots.popleft()  # stale: gone for good
                elif slot[0] < limit:
                    kept.append(slots.popleft())  # due already: put back below
                else:
                    at = slot[0] + lane.timeout_s
                    first = at if first is None else min(first, at)
                    break
            slots.extendleft(reversed(kept))
        return first

    def retime(self, changed: Iterable[tuple[Key, int]]) -> int:
        """Give the listed gateways their new timeout; returns how many moved."""
        entries = self._entries
        moved = [
            (slot, timeout_ms)
            for key, timeout_ms in dict(changed).items()
            if (slot := entries.get(key)) is not None
            and self._numbered[slot[2]].timeout_ms != timeout_ms
        ]
        moved.sort(key=lambda item: item[0][0])
        lanes: dict[int, _Lane] = {}
        left: set[_Lane] = set()
        for (order_key, key, number), timeout_ms in moved:
            old = self._numbered[number]
            old.live -= 1
            left.add(old)
            lane = lanes.get(timeout_ms)
            if lane is None:
                lanes[timeout_ms] = lane = self._lane(timeout_ms)
            entries[key] = slot = (order_key, key, lane.number)
            lane.slots.append(slot)
            lane.live += 1
            lane.tail = order_key
        for lane in left:
            self._maybe_compact(lane)
        self._moved = [lane for lane in self._moved if lane.live] + list(lanes.values())
        self._lanes = {t: lane for t, lane in self._lanes.items() if lane.live}
        # Dropped lanes hold stale slots only, which never look their lane up.
        self._numbered = {lane.number: lane for lane in self._all_lanes()}
        return len(moved)

    def lane_count(self) -> int:
        return len(self._lanes) + len(self._moved)

    def slot_count(self) -> int:
        """Slots held, stale ones included (what compaction bounds)."""
        return sum(len(lane.slots) for lane in self._all_lanes())

    def _append(self, lane: _Lane, key: Key, seen: float) -> None:
        if seen >= lane.tail:
            order_key = lane.tail = seen
            if self._late:
                self._late.pop(key, None)
        else:
            order_key = lane.tail
            self._late[key] = seen
        self._entries[key] = slot = (order_key, key, lane.number)
        lane.slots.append(slot)

    def _maybe_compact(self, lane: _Lane) -> None:
        """One pass over a lane whose stale slots outnumber the live ones by more
        than `slack`: each stale slot was left by a refresh, a removal or a move,
        so the pass is O(1) amortized over them."""
        if len(lane.slots) - lane.live > lane.live + self._slack:
            entries = self._entries
            lane.slots = deque(s for s in lane.slots if entries.get(s[1]) is s)

    def _new_lane(self, timeout_ms: int) -> _Lane:
        self._lanes[timeout_ms] = lane = self._lane(timeout_ms)
        return lane

    def _lane(self, timeout_ms: int) -> _Lane:
        lane = _Lane(timeout_ms, next(self._numbers))
        self._numbered[lane.number] = lane
        return lane

    def _all_lanes(self) -> list[_Lane]:
        self._moved = [lane for lane in self._moved if lane.live]
        return [*self._lanes.values(), *self._moved]
