"""Scheduling decisions, pure: which backend gets which images, batch sizes, copies, ETA.

No I/O and no clocks of its own: the controller passes in the state and the time, so every rule
here is tested directly with made-up backends.

The rules (DESIGN.md, "Scheduling rules"):
- Backends are tried in their order; the first with a free slot that can serve the job gets it.
- Queued images with identical parameters go to a backend as one batch, sized so that each
  backend's share of the queue matches its measured speed (capped by its batch limit).
- A backend does not take a batch it would finish later than the other backends would finish
  all the remaining work without it (a slow peer never becomes the tail).
- With nothing left to queue, an idle backend may run a copy of the running batch that would
  finish last, when it can finish it sooner; the first result wins.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..protocol import JobRequest
from .backends import Backend

__all__ = [
    "Flight",
    "Item",
    "backlog_seconds",
    "estimate_eta",
    "job_units",
    "pick_copies",
    "plan_dispatch",
    "rates",
]

DEFAULT_UNIT_SECONDS = 1.0


def job_units(req: JobRequest, images: int = 1) -> float:
    """Work in denoising steps x megapixels x images: what a backend's speed is measured in."""
    if req.kind == "upscale":
        return 0.05 * images
    steps = req.steps if req.kind == "txt2img" else max(int(req.steps * req.strength), 0)
    return max(steps, 1) * req.width * req.height / 1e6 * images


@dataclass(eq=False)
class Item:
    """One image to make (or one tile to refine). It is delivered exactly once."""

    run_id: int
    index: int
    seed: int
    template: JobRequest
    init_png: bytes | None = None
    attempts: int = 0
    done: bool = False
    failed_on: set[str] = field(default_factory=set)
    flights: int = 0
    key: tuple = ()
    units: float = 0.0

    def __post_init__(self) -> None:
        self.key = self.template.param_key()
        self.units = job_units(self.template)


@dataclass(eq=False)
class Flight:
    """A batch of items in flight on one backend."""

    backend: Backend
    items: list[Item]
    started: float
    estimate: float
    copy_of: Flight | None = None
    has_copy: bool = False
    step: int = 0
    total_steps: int = 0
    task: Any = None

    @property
    def units(self) -> float:
        return sum(i.units for i in self.items)

    def remaining(self, now: float) -> float:
        return max(self.started + self.estimate - now, 0.0)


def rates(backends: Iterable[Backend]) -> dict[str, float]:
    """Units per second per backend; one not measured yet is assumed as fast as the median."""
    known = sorted(1.0 / b.unit_seconds for b in backends if b.unit_seconds)
    default = known[len(known) // 2] if known else 1.0 / DEFAULT_UNIT_SECONDS
    return {b.name: (1.0 / b.unit_seconds if b.unit_seconds else default) for b in backends}


def backlog_seconds(flights: Iterable[Flight], now: float) -> dict[str, float]:
    """Seconds of work each backend still has in flight (a worker runs its jobs one by one)."""
    out: dict[str, float] = {}
    for f in flights:
        out[f.backend.name] = out.get(f.backend.name, 0.0) + f.remaining(now)
    return out


def _can_take(b: Backend, item: Item, fallback: bool) -> str | None:
    why = b.why_not(item.template)
    if why is None and b.name in item.failed_on and not fallback:
        return "already failed this image"
    return why


def _others_finish(batches: list[float], others: Sequence[Backend], rate: dict[str, float],
                   backlog: dict[str, float]) -> float:
    """When the other backends would be done if they ran all these batches without b.

    Greedy list scheduling (each batch to whichever finishes it first) respects that a batch is
    indivisible; a long queue is close to the fluid bound, which is used there to stay cheap.
    """
    names = [s.name for s in others]
    if len(batches) > 64:
        total = sum(rate[n] for n in names)
        return (sum(backlog.get(n, 0.0) * rate[n] for n in names) + sum(batches)) / total
    finish = {n: backlog.get(n, 0.0) for n in names}
    for units in batches:
        best = min(names, key=lambda n: finish[n] + units / rate[n])
        finish[best] += units / rate[best]
    return max(finish.values())


def plan_dispatch(
    queue: Sequence[Item],
    backends: Sequence[Backend],
    flights: Sequence[Flight],
    now: float,
    *,
    max_batch: int = 4,
    batching: bool = True,
    straggler_guard: bool = True,
) -> tuple[list[tuple[Backend, list[Item]]], list[tuple[Backend, Item, str]]]:
    """Assign queued items to free slots. Returns (assignments, skips with their reasons)."""
    assignments: list[tuple[Backend, list[Item]]] = []
    skips: list[tuple[Backend, Item, str]] = []
    taken: set[int] = set()
    usable = [b for b in backends if b.usable]
    rate = rates(usable)
    backlog = backlog_seconds(flights, now)
    free = {b.name: b.free_slots for b in usable}
    pending = [it for it in queue if not it.done]

    def servers_for(item: Item) -> list[Backend]:
        fallback = all(_can_take(b, item, False) for b in usable)
        return [b for b in usable if _can_take(b, item, fallback) is None]

    for b in backends:
        if not b.usable:
            continue
        refused_keys: set[tuple] = set()
        while free[b.name] > 0:
            head = None
            for it in pending:
                if id(it) in taken or it.key in refused_keys:
                    continue
                servers = servers_for(it)
                if b not in servers:
                    fallback = not servers
                    skips.append((b, it, _can_take(b, it, fallback) or "busy"))
                    refused_keys.add(it.key)
                    continue
                head = it
                break
            if head is None:
                break
            servers = servers_for(head)
            same = [it for it in pending
                    if id(it) not in taken and it.key == head.key and b in servers_for(it)]
            total_rate = sum(rate[s.name] for s in servers)
            share = rate[b.name] / total_rate
            limit = max(1, min(max_batch, b.max_batch()))
            n = min(limit, max(1, math.ceil(len(same) * share / max(b.slots, 1)))) \
                if batching else 1
            batch = same[:n]
            units = sum(it.units for it in batch)
            finish_b = backlog.get(b.name, 0.0) + units / rate[b.name]
            others = [s for s in servers if s is not b]
            if straggler_guard and others:
                batches = [sum(it.units for it in same[i:i + n]) for i in range(0, len(same), n)]
                if finish_b > _others_finish(batches, others, rate, backlog):
                    skips.append((b, head, "others would finish sooner (straggler guard)"))
                    refused_keys.add(head.key)
                    continue
            taken.update(id(it) for it in batch)
            backlog[b.name] = finish_b
            free[b.name] -= 1
            assignments.append((b, batch))
    return assignments, skips


def pick_copies(
    queue: Sequence[Item],
    backends: Sequence[Backend],
    flights: Sequence[Flight],
    now: float,
    *,
    margin: float = 0.85,
) -> list[tuple[Backend, Flight]]:
    """With the queue drained, let idle backends race the flights that would finish last."""
    if any(not it.done for it in queue):
        return []
    rate = rates([b for b in backends if b.usable] + [f.backend for f in flights])
    candidates = sorted(
        (f for f in flights if f.copy_of is None and not f.has_copy
         and any(not it.done for it in f.items)),
        key=lambda f: f.started + f.estimate,
        reverse=True,
    )
    picks: list[tuple[Backend, Flight]] = []
    busy = {f.backend.name for f in flights}
    for b in backends:
        if not b.usable or b.name in busy or b.free_slots == 0:
            continue
        for f in candidates:
            if f.backend is b or f.has_copy or any(p[1] is f for p in picks):
                continue
            if b.why_not(f.items[0].template) is not None:
                continue
            mine = f.units / rate[b.name]
            # past its estimate, a flight's end is unknown: assume a quarter of it is left
            theirs = max(f.started + f.estimate - now, 0.25 * f.estimate)
            overdue = now - f.started > 2.0 * f.estimate + 5.0
            if overdue or mine < margin * theirs:
                picks.append((b, f))
                busy.add(b.name)
                break
    return picks


def estimate_eta(queue: Sequence[Item], backends: Sequence[Backend],
                 flights: Sequence[Flight], now: float) -> float | None:
    """Seconds until everything queued and running is done, from measured speeds."""
    usable = [b for b in backends if b.usable]
    pending = sum(it.units for it in queue if not it.done)
    if not usable:
        return None if pending or flights else 0.0
    rate = rates(usable + [f.backend for f in flights])
    backlog = backlog_seconds(flights, now)
    total_rate = sum(rate[b.name] for b in usable)
    spread = (sum(backlog.get(b.name, 0.0) * rate[b.name] for b in usable) + pending) / total_rate
    longest = max(backlog.values(), default=0.0)
    return max(spread, longest if not pending else 0.0)
