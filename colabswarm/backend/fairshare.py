"""Fair shares of one GPU between tokens: the worker's queue, served round-robin by images.

Each token (the owner's, each guest's) that has work queued gets the GPU in turn, in
proportion to its weight, counted in images: a friend's 4 images wait behind at most one job
of another friend's 500, not behind all of them. Within one token, jobs run in the order they
came (two controllers sharing one token share its turn, first come first served).

The rule is start-time fair queueing on image counts (a stride scheduler): every token has a
virtual time; the next job is the head of the token whose virtual time is lowest (earlier
arrival breaks a tie), and serving a job of n images moves its token's virtual time on by
n / weight. A token that had nothing queued starts from the lowest virtual time among those
waiting, so a token cannot save up turns while it is idle.

Pure: no clock, no threads, no I/O; the job manager holds the lock. ``order()`` is what
``pop()`` would return if nothing else arrived, so the queue position a job's status reports
is the one it will really have.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["FairQueue"]

T = TypeVar("T")


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    owner: str
    images: int
    seq: int


@dataclass
class _Lane(Generic[T]):
    entries: deque[_Entry[T]] = field(default_factory=deque)


class FairQueue(Generic[T]):
    """Items of several owners; `pop()` serves owners round-robin by images, by weight."""

    def __init__(self, fair: bool = True) -> None:
        self.fair = fair  # False: one FIFO (first come, first served), for comparisons
        self._lanes: dict[str, _Lane[T]] = {}
        self._vtime: dict[str, float] = {}
        self._weights: dict[str, float] = {}
        self._last = 0.0  # virtual time of the last job started
        self._seq = itertools.count()
        self._where: dict[int, _Entry[T]] = {}
        self._order: list[T] | None = None
        self._index: dict[int, int] = {}

    # ----- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._where)

    def __bool__(self) -> bool:
        return bool(self._where)

    def __contains__(self, item: object) -> bool:
        return id(item) in self._where

    def owners(self) -> dict[str, int]:
        """Items queued per owner."""
        return {o: len(lane.entries) for o, lane in self._lanes.items() if lane.entries}

    def weight(self, owner: str) -> float:
        return self._weights.get(owner, 1.0)

    def order(self) -> list[T]:
        """Every queued item in the order `pop()` will serve them if nothing else arrives."""
        if self._order is None:
            lanes = {o: list(lane.entries) for o, lane in self._lanes.items() if lane.entries}
            vtime = dict(self._vtime)
            heads = dict.fromkeys(lanes, 0)
            out: list[T] = []
            for _ in range(len(self._where)):
                owner = self._pick(lanes, heads, vtime)
                entry = lanes[owner][heads[owner]]
                heads[owner] += 1
                vtime[owner] += entry.images / self.weight(owner)
                out.append(entry.item)
            self._order = out
            self._index = {id(item): i for i, item in enumerate(out)}
        return self._order

    def position(self, item: T) -> int:
        """1 for the next item to run, 2 for the one after it, ...; 0 if not queued."""
        if id(item) not in self._where:
            return 0
        self.order()
        return self._index[id(item)] + 1

    # ----- changing --------------------------------------------------------------------------
    def set_weight(self, owner: str, weight: float) -> None:
        if not 0 < weight <= 100:
            raise ValueError("a weight is a number above 0 and at most 100")
        self._weights[owner] = float(weight)
        self._order = None

    def push(self, item: T, owner: str, images: int) -> None:
        lane = self._lanes.setdefault(owner, _Lane())
        if not lane.entries:  # (re)joins: no turns saved up while it had nothing queued
            waiting = [self._vtime[o] for o, ln in self._lanes.items() if ln.entries]
            floor = min(waiting) if waiting else self._last
            self._vtime[owner] = max(self._vtime.get(owner, 0.0), floor)
        entry = _Entry(item, owner, max(1, images), next(self._seq))
        lane.entries.append(entry)
        self._where[id(item)] = entry
        self._order = None

    def pop(self) -> T:
        """The next item to run (IndexError when empty)."""
        if not self._where:
            raise IndexError("pop from an empty FairQueue")
        lanes = {o: list(lane.entries) for o, lane in self._lanes.items() if lane.entries}
        owner = self._pick(lanes, dict.fromkeys(lanes, 0), self._vtime)
        entry = self._lanes[owner].entries.popleft()
        del self._where[id(entry.item)]
        self._last = self._vtime[owner]
        self._vtime[owner] += entry.images / self.weight(owner)
        self._order = None
        return entry.item

    def remove(self, item: T) -> bool:
        """Take an item out (cancelled, interrupted); False if it was not queued."""
        entry = self._where.pop(id(item), None)
        if entry is None:
            return False
        self._lanes[entry.owner].entries.remove(entry)
        self._order = None
        return True

    def items(self, owner: str | None = None) -> list[T]:
        """Queued items (of one owner), in arrival order."""
        entries = sorted(self._where.values(), key=lambda e: e.seq)
        return [e.item for e in entries if owner is None or e.owner == owner]

    # ----- the rule --------------------------------------------------------------------------
    def _pick(self, lanes: dict[str, list[_Entry[T]]], heads: dict[str, int],
              vtime: dict[str, float]) -> str:
        """The owner whose head item runs next: lowest virtual time, then earliest arrival
        (FIFO mode: earliest arrival only)."""
        best: str | None = None
        best_key: tuple[float, int] | None = None
        for owner, entries in lanes.items():
            i = heads[owner]
            if i >= len(entries):
                continue
            key = (vtime[owner] if self.fair else 0.0, entries[i].seq)
            if best_key is None or key < best_key:
                best, best_key = owner, key
        assert best is not None
        return best
