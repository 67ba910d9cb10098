"""Scheduling decisions, pure: which backend gets which images, batch sizes, copies, ETA.

No I/O and no clocks of its own: the controller passes in the state and the time, so every rule
here is tested directly with made-up backends.

The rules (DESIGN.md, "Scheduling rules"):
- Backends are tried in their order; the first with a free slot that can serve the job gets it.
- Queued images with identical parameters go to a backend as one batch, sized so that each
  backend's share of the queue matches its measured speed (capped by its batch limit).
- A backend does not take a batch it would finish clearly later than the other backends would
  finish all the remaining work without it (a slow peer never becomes the tail); "clearly" is
  20% and 0.25 s once the controller has timed them all, 2x and 1 s while some speed is only
  a worker's own warm-up figure. Until timed, a backend also runs one job at a time.
- With nothing left to queue, an idle backend may run a copy of the running batch that would
  finish last, when it can finish it sooner; the first result wins.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..protocol import JobRequest
from .backends import Backend

__all__ = [
    "ITEM_TRANSITIONS",
    "Flight",
    "Item",
    "ItemStatus",
    "backlog_seconds",
    "batch_seconds",
    "estimate_eta",
    "job_units",
    "loaded_model",
    "model_of",
    "pick_copies",
    "plan_dispatch",
    "rates",
]

DEFAULT_UNIT_SECONDS = 1.0


def job_units(req: JobRequest) -> float:
    """Work of one image in denoising steps x megapixels: what a backend's speed is measured
    in."""
    if req.kind == "upscale":
        return 0.05
    steps = req.steps if req.kind == "txt2img" else max(int(req.steps * req.strength), 0)
    return max(steps, 1) * req.width * req.height / 1e6


class ItemStatus(StrEnum):
    """Where one image (or tile) is: waiting, in one or more flights (a copy may race it), or
    finished one way or another (delivered, failed with a reason, dropped with its run)."""

    QUEUED = "queued"
    FLYING = "flying"
    DONE = "done"
    FAILED = "failed"
    DROPPED = "dropped"


_I = ItemStatus
ITEM_TRANSITIONS: dict[ItemStatus, frozenset[ItemStatus]] = {
    _I.QUEUED: frozenset({_I.FLYING, _I.FAILED, _I.DROPPED}),
    _I.FLYING: frozenset({_I.QUEUED, _I.DONE, _I.FAILED, _I.DROPPED}),
    _I.DONE: frozenset(),  # delivered exactly once: nothing follows
    _I.FAILED: frozenset(),
    _I.DROPPED: frozenset(),
}
_TERMINAL = frozenset({_I.DONE, _I.FAILED, _I.DROPPED})


@dataclass(eq=False)
class Item:
    """One image to make (or one tile to refine). It is delivered exactly once."""

    run_id: int
    index: int
    seed: int
    template: JobRequest
    init_png: bytes | None = None
    crop: tuple[int, int, int, int] | None = None  # a tile the worker cuts from init_png
    attempts: int = 0
    status: ItemStatus = ItemStatus.QUEUED
    failed_on: set[str] = field(default_factory=set)
    flights: int = 0
    key: tuple = ()
    batch_key: tuple = ()
    units: float = 0.0

    def __post_init__(self) -> None:
        self.key = self.template.param_key()
        # tiles of different sources never share a job: a job carries one source
        self.batch_key = self.key if self.crop is None else (*self.key, id(self.init_png))
        self.units = job_units(self.template)

    @property
    def done(self) -> bool:
        """Finished one way or another: nothing more is to be done for it."""
        return self.status in _TERMINAL

    def move(self, new: ItemStatus) -> None:
        """The one place an item's status changes, along ITEM_TRANSITIONS."""
        if new is not self.status and new not in ITEM_TRANSITIONS[self.status]:
            raise AssertionError(f"item {self.seed}: {self.status.value} cannot become "
                                 f"{new.value}")
        self.status = new


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
    id: int = 0
    timeout: float = 600.0
    began: float = -1.0  # when the worker started on it, as far as the controller can tell
    loads_model: str | None = None  # a model the worker must load before it starts

    def __post_init__(self) -> None:
        if self.began < 0:
            self.began = self.started

    @property
    def units(self) -> float:
        return sum(i.units for i in self.items)

    def remaining(self, now: float) -> float:
        return max(self.started + self.estimate - now, 0.0)

    def request(self) -> tuple[JobRequest, list[bytes] | None]:
        """The job to send, and its init images (one shared, or one per seed)."""
        items = self.items
        template = items[0].template
        update: dict[str, Any] = {"seeds": [it.seed for it in items]}
        if items[0].crop is not None:
            update["crops"] = [it.crop for it in items]
        prompts = [it.template.prompt for it in items]
        if any(p != prompts[0] for p in prompts):  # one call, a prompt per image
            update["prompts"] = prompts
        pngs: list[bytes] | None = None
        if template.kind != "txt2img":
            first = items[0].init_png
            shared = all(it.init_png is first for it in items)
            pngs = [first] if shared and first is not None else [it.init_png or b""
                                                                  for it in items]
        return template.model_copy(update=update), pngs


def rates(backends: Iterable[Backend]) -> dict[str, float]:
    """Units per second per backend at its usual batch; unmeasured ones are taken as the median."""
    known = sorted(1.0 / us for b in backends if (us := b.unit_seconds))
    default = known[len(known) // 2] if known else 1.0 / DEFAULT_UNIT_SECONDS
    return {b.name: (1.0 / us if (us := b.unit_seconds) else default) for b in backends}


def batch_seconds(b: Backend, n: int, units_per_image: float, rate: dict[str, float]) -> float:
    """Expected seconds for a batch of n on b: its fitted line, else the median rate."""
    t = b.job_seconds(n, units_per_image)
    return t if t is not None else n * units_per_image / rate[b.name]


def backlog_seconds(flights: Iterable[Flight], now: float,
                    rate: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds of work each backend still has in flight.

    A worker runs its jobs one after another, so a second slot's job starts when the first
    ends: the flights of one backend are laid end to end from when the first one began (a
    flight that waited behind another one begins when that one landed, not when it was sent).
    With `rate`, each flight's length comes from what is known of its backend now (its first
    job may have been timed since it was sent), else from its estimate at launch.
    """
    per: dict[str, list[Flight]] = {}
    for f in flights:
        per.setdefault(f.backend.name, []).append(f)
    out: dict[str, float] = {}
    for name, fs in per.items():
        t = 0.0
        for f in sorted(fs, key=lambda f: f.started):
            length = f.estimate
            if rate is not None and f.backend.name in rate:
                length = batch_seconds(f.backend, len(f.items), f.items[0].units, rate)
            t = max(t, f.began) + length
        out[name] = max(t - now, 0.0)
    return out


def _others_finish(count: int, upi: float, others: Sequence[Backend], rate: dict[str, float],
                   backlog: dict[str, float], max_batch: int,
                   switch: dict[str, float] | None = None,
                   sizes: dict[str, list[int]] | None = None,
                   memo: dict[tuple[str, int, float], float] | None = None) -> float:
    """When the other backends would be done if they ran `count` more images without b.

    Greedy list scheduling, each backend taking its own full batches (of a size it allows: a
    compiled worker's buckets) after loading the model if it must (`switch`): this respects
    that a batch is indivisible and that big batches are cheaper per image. A long queue is
    close to the fluid bound, which is used there to stay cheap.
    """
    switch = switch or {}
    if count <= 0:
        return max((backlog.get(s.name, 0.0) for s in others), default=0.0)
    caps = {s.name: max(1, min(max_batch, s.max_batch())) for s in others}
    if count > 64 * max(caps.values()):
        total = sum(rate[s.name] for s in others)
        return (sum((backlog.get(s.name, 0.0) + switch.get(s.name, 0.0)) * rate[s.name]
                    for s in others) + count * upi) / total
    sizes = sizes or {}
    names = [s.name for s in others]
    by_name = {s.name: s for s in others}
    finish = [backlog.get(n, 0.0) for n in names]
    cold = [switch.get(n, 0.0) for n in names]  # paid with a backend's first batch

    def take(name: str, left: int) -> int:
        allowed = sizes.get(name)
        if not allowed:
            return min(caps[name], left)
        fit = [k for k in allowed if k <= left]
        return max(fit) if fit else min(allowed)

    times = memo if memo is not None else {}  # (backend, batch size, units) -> seconds

    def seconds(i: int, k: int) -> float:
        key = (names[i], k, upi)
        t = times.get(key)
        if t is None:
            t = times[key] = batch_seconds(by_name[names[i]], k, upi, rate)
        return t

    left = count
    while left > 0:
        best_i, best_end, best_k = 0, float("inf"), 0
        for i, name in enumerate(names):
            k = take(name, left)
            end = finish[i] + seconds(i, k) + cold[i]
            if end < best_end:
                best_i, best_end, best_k = i, end, k
        finish[best_i] = best_end
        cold[best_i] = 0.0
        left -= min(best_k, left)
    return max(finish)


def _choose_batch(b: Backend, n_max: int, pending: int, upi: float, others: Sequence[Backend],
                  rate: dict[str, float], backlog: dict[str, float], max_batch: int,
                  margin: float = 0.2, min_gain_s: float = 0.25,
                  switch: dict[str, float] | None = None,
                  sizes: dict[str, list[int]] | None = None,
                  memo: dict[tuple[str, int, float], float] | None = None) -> int:
    """How many of `pending` images b should take now (0: leave them to faster backends).

    Picks the size that minimises when everything is done, b's batch (after loading the
    model, if b must) against the others finishing the rest (ties go to the bigger batch). b
    steps aside only when the others would finish clearly sooner (by `margin`, and by
    `min_gain_s` seconds), so among backends of about the same speed, and for jobs too small
    for speed to matter, the order the user gave still decides. A model load counts like any
    other time: b loads the model only when the queue is long enough that it pays.
    """
    mine = backlog.get(b.name, 0.0) + (switch or {}).get(b.name, 0.0)
    allowed = (sizes or {}).get(b.name)
    choices = [n for n in range(1, n_max + 1) if not allowed or n in allowed]
    best_n, best_t = 0, float("inf")
    for n in choices:
        t = max(mine + batch_seconds(b, n, upi, rate),
                _others_finish(pending - n, upi, others, rate, backlog, max_batch, switch,
                               sizes, memo))
        if t <= best_t * (1 + 1e-6):
            best_n, best_t = n, min(t, best_t)
    if best_n == 0:
        return 0
    skip_t = _others_finish(pending, upi, others, rate, backlog, max_batch, switch, sizes,
                            memo)
    clearly = skip_t * (1 + margin) < best_t and best_t - skip_t > min_gain_s
    return 0 if clearly else best_n


def loaded_model(b: Backend, flights: Iterable[Flight]) -> str | None:
    """The model b will have loaded once its jobs in flight are done: the last one's, else the
    one its /v1/info says."""
    mine = [f for f in flights if f.backend is b]
    if mine:
        return model_of(b, max(mine, key=lambda f: f.started).items[0].template)
    return b.info.model_loaded if b.info is not None else None


def _mixes_prompts(b: Backend) -> bool:
    return b.info is not None and "prompt_lists" in b.info.capabilities


def _needs_switch(b: Backend, req: JobRequest, loaded: str | None) -> bool:
    want = model_of(b, req)
    return want is not None and loaded is not None and want != loaded


def model_of(b: Backend, req: JobRequest) -> str | None:
    """The model a job runs on b: the one it names, else b's default (its first)."""
    if req.model is not None:
        return req.model
    return b.info.models[0] if b.info is not None and b.info.models else None


def plan_dispatch(
    queue: Sequence[Item],
    backends: Sequence[Backend],
    flights: Sequence[Flight],
    now: float,
    *,
    max_batch: int = 4,
    batching: bool = True,
    straggler_guard: bool = True,
    switching: str = "cost",
) -> tuple[list[tuple[Backend, list[Item]]], list[tuple[Backend, Item, Any]]]:
    """Assign queued items to free slots. Returns (assignments, skips with their reasons:
    a backends.Why, or a str for the scheduler's own).

    switching: how a model that a backend does not have loaded is weighed. "cost" (default):
    its measured load time counts like any other time, so a backend loads a model only when
    that makes everything finish sooner. "never": only backends that have the model loaded
    take its jobs, while any has. "always": a free backend loads whatever is next in the
    queue (SwarmUI's way). Compiled workers' batch sizes are kept to the sizes they compiled.
    """
    assignments: list[tuple[Backend, list[Item]]] = []
    skips: list[tuple[Backend, Item, Any]] = []
    usable = [b for b in backends if b.usable]
    if not usable:
        return assignments, skips
    rate = rates(usable)
    backlog = backlog_seconds(flights, now, rate)
    # with the guard on, a backend we have not timed yet gets one job at a time until its first
    # one is measured: a warm-up figure is a hint, not enough to fill a second slot on
    free = {b.name: (b.free_slots if b.speed.measured or not straggler_guard
                     else min(b.free_slots, max(0, 1 - b.running))) for b in usable}
    groups: dict[tuple, list[Item]] = {}  # key -> pending items, queue order
    for it in queue:
        if it.status is ItemStatus.QUEUED:
            groups.setdefault(it.batch_key, []).append(it)
    order = list(groups)  # keys in order of their first item
    why_cache: dict[tuple[str, tuple], Any] = {}
    planned: dict[Any, int] = {}  # images given out by this plan: per key, per (backend, key)
    loaded = {b.name: loaded_model(b, flights) for b in usable}  # updated as the plan goes
    memo: dict[tuple[str, int, float], float] = {}  # batch times, while the rates hold

    def switch_costs(key: tuple, srv: Sequence[Backend]) -> dict[str, float]:
        tpl = groups[key][0].template if groups[key] else None
        if tpl is None or switching == "always":
            return {}
        out = {}
        for s in srv:
            want = model_of(s, tpl)
            if want is not None and loaded[s.name] is not None and want != loaded[s.name]:
                out[s.name] = s.load_seconds(want)
        return out

    def rank(b: Backend, key: tuple) -> int:
        """Which of the queued groups b looks at first (queue order within a rank): a model
        no backend has loaded (someone must load it, and the sooner the load overlaps other
        work the better), then the model b has loaded, then models b would have to load."""
        if not groups[key] or switching == "always":
            return 0
        tpl = groups[key][0].template
        if tpl.model is not None and tpl.model not in loaded.values():
            return 0
        return 2 if _needs_switch(b, tpl, loaded[b.name]) else 1

    def sizes_for(key: tuple, srv: Sequence[Backend]) -> dict[str, list[int]]:
        tpl = groups[key][0].template
        return {s.name: allowed for s in srv
                if (allowed := s.batch_sizes(tpl)) is not None}

    def why(b: Backend, key: tuple) -> Any:
        k = (b.name, key)
        if k not in why_cache:
            first = groups[key][0]
            why_cache[k] = b.why_not(first.template, first.key)
        return why_cache[k]

    able_cache: dict[tuple, list[Backend]] = {}

    def servers(key: tuple, it: Item) -> list[Backend]:
        able = able_cache.get(key)
        if able is None:
            able = able_cache[key] = [b for b in usable if why(b, key) is None]
        if not it.failed_on:
            return able
        fresh = [b for b in able if b.name not in it.failed_on]
        return fresh or able  # a backend that failed an image may retry it if none other can

    for b in backends:
        if b.name not in free:
            continue
        blocked: set[tuple] = set()
        while free[b.name] > 0:
            pick = None
            for key in sorted(order, key=lambda k: rank(b, k)):
                items = groups[key]
                if not items or key in blocked:
                    continue
                reason = why(b, key)
                if reason is None and b not in servers(key, items[0]):
                    reason = "already failed this image"
                if reason is not None:
                    skips.append((b, items[0], reason))
                    blocked.add(key)
                    continue
                pick = key
                break
            if pick is None:
                break
            if any(it.failed_on for it in groups[pick]):
                same = [it for it in groups[pick] if b in servers(pick, it)]
            else:
                same = list(groups[pick])
            if not _mixes_prompts(b):  # a worker from before prompt lists: one prompt a job
                same = [it for it in same if it.template.prompt == same[0].template.prompt]
            srv = servers(pick, same[0])
            upi = same[0].units
            limit = max(1, min(max_batch, b.max_batch()))
            switch = switch_costs(pick, srv)
            sizes = sizes_for(pick, srv)
            orphan = same[0].template.model not in loaded.values()
            if switching == "never" and b.name in switch and not orphan:
                skips.append((b, same[0], "has another model loaded (switching: never)"))
                blocked.add(pick)
                continue
            if batching:  # b's share of the queue by speed, counting what this plan gave it
                share = rate[b.name] / sum(rate[s.name] for s in srv)
                whole = len(same) + planned.get(pick, 0)
                target = math.ceil(whole * share) - planned.get((b.name, pick), 0)
                n = min(limit, len(same), max(1, target))
            else:
                n = 1
            others = [s for s in srv if s is not b]
            if straggler_guard and others:
                cap = max_batch if batching else 1
                if batching:  # the makespan search below sizes the batch; share is a floor
                    n = max(n, min(limit, len(same)))
                # speeds known only from workers' warm-up figures must differ by 2x to count;
                # a backend already busy (its second slot) steps aside whenever the others
                # would finish sooner: its order among equals is already honoured
                timed = b.speed.measured and all(s.speed.measured for s in others)
                margin, gain = (0.2, 0.25) if timed else (1.0, 1.0)
                if timed and backlog.get(b.name, 0.0) > 0:
                    margin, gain = 0.02, 0.0
                if b.name in switch:
                    # a model load is a measured cost, not a speed guess: no 2x benefit of
                    # the doubt for it (with it, an untimed idle worker loaded a model that
                    # the others would have finished without; bench_switching --processes)
                    margin, gain = min(margin, 0.2), min(gain, 0.25)
                n = _choose_batch(b, n, len(same), upi, others, rate, backlog, cap, margin, gain,
                                  switch, sizes, memo)
                if n == 0:
                    skips.append((b, same[0], "others would finish sooner (straggler guard)"))
                    blocked.add(pick)
                    continue
            allowed = sizes.get(b.name)
            if allowed and n not in allowed:  # a compiled worker runs only its buckets
                fit = [k for k in allowed if k <= n]
                n = max(fit) if fit else min(allowed)
                if n > len(same):
                    skips.append((b, same[0], f"compiled for batches {allowed} only"))
                    blocked.add(pick)
                    continue
            batch = same[:n]
            finish_b = (backlog.get(b.name, 0.0) + switch.get(b.name, 0.0)
                        + batch_seconds(b, n, upi, rate))
            loaded[b.name] = model_of(b, batch[0].template)
            planned[pick] = planned.get(pick, 0) + len(batch)
            planned[(b.name, pick)] = planned.get((b.name, pick), 0) + len(batch)
            chosen = {id(it) for it in batch}
            groups[pick] = [it for it in groups[pick] if id(it) not in chosen]
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
    if any(it.status is ItemStatus.QUEUED for it in queue):
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
            if b.why_not(f.items[0].template, f.items[0].key) is not None:
                continue
            if not _mixes_prompts(b) and len({it.template.prompt for it in f.items}) > 1:
                continue
            mine = batch_seconds(b, len(f.items), f.items[0].units, rate)
            tpl = f.items[0].template
            if _needs_switch(b, tpl, loaded_model(b, flights)):
                mine += b.load_seconds(model_of(b, tpl) or "")  # it would load the model first
            # past its estimate, a flight's end is unknown: assume a quarter of it is left
            theirs = max(f.started + f.estimate - now, 0.25 * f.estimate)
            overdue = now - f.started > 2.0 * f.estimate + 5.0
            # speeds known only from the workers' own warm-up figures must differ by 2x
            timed = b.speed.measured and f.backend.speed.measured
            if overdue or mine < (margin if timed else 0.5) * theirs:
                picks.append((b, f))
                busy.add(b.name)
                break
    return picks


def estimate_eta(queue: Sequence[Item], backends: Sequence[Backend],
                 flights: Sequence[Flight], now: float) -> float | None:
    """Seconds until everything queued and running is done, from measured speeds."""
    usable = [b for b in backends if b.usable]
    pending = sum(it.units for it in queue if it.status is ItemStatus.QUEUED)
    if not usable:
        return None if pending or flights else 0.0
    rate = rates(usable + [f.backend for f in flights])
    backlog = backlog_seconds(flights, now)
    total_rate = sum(rate[b.name] for b in usable)
    if not total_rate > 0:
        return None
    spread = (sum(backlog.get(b.name, 0.0) * rate[b.name] for b in usable) + pending) / total_rate
    longest = max(backlog.values(), default=0.0)
    return max(spread, longest if not pending else 0.0)
