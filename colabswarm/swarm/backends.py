"""One registry entry per worker: address, order, AllowIdle, slots, its status and what it can
serve. No I/O: the connection to the worker belongs to the controller, the decisions to
state.py.

Statuses follow StableSwarmUI's: disabled (bad config or switched off), loading, running
(ready for work), errored (with the reason), idle (an AllowIdle peer that is away). Which status
may follow which is one table (TRANSITIONS), and change_status() is the one function that
changes a backend's status.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..errors import ErrorKind
from ..protocol import Info, JobRequest
from ..samplers import DEFAULT_SAMPLER
from .speed import SpeedModel

DEFAULT_LOAD_SECONDS = 15.0  # switching models, until a worker has measured it

__all__ = [
    "DEFAULT_LOAD_SECONDS",
    "Backend",
    "BackendStatus",
    "STATUS_COLOURS",
    "TRANSITIONS",
    "Why",
    "change_status",
    "info_fingerprint",
    "next_check_delay",
]


class BackendStatus(StrEnum):
    DISABLED = "disabled"
    LOADING = "loading"
    RUNNING = "running"
    ERRORED = "errored"
    IDLE = "idle"


_S = BackendStatus
# which status may follow which: a disabled backend comes back only through the user's word
# (to loading, until its next health check says more); every other status may follow any
TRANSITIONS: dict[BackendStatus, frozenset[BackendStatus]] = {
    _S.DISABLED: frozenset({_S.DISABLED, _S.LOADING}),
    _S.LOADING: frozenset(_S),
    _S.RUNNING: frozenset(_S),
    _S.ERRORED: frozenset(_S),
    _S.IDLE: frozenset(_S),
}


def change_status(b: Backend, new: BackendStatus, reason: str | None) -> bool:
    """The one place a backend's status changes; returns whether it changed (status or
    reason). A move the table does not allow is a bug in the caller, not a worker's doing."""
    if new not in TRANSITIONS[b.status]:
        raise AssertionError(f"{b.name}: status {b.status.value} cannot become {new.value}")
    changed = (b.status, b.reason) != (new, reason)
    b.status, b.reason = new, reason
    return changed


@dataclass(frozen=True)
class Why:
    """Why a backend does not take a job: `hard` reasons are about what it can do (no such
    model, too big) and last until its /v1/info changes; soft ones pass (busy, away)."""

    text: str
    hard: bool = True
    kind: ErrorKind = ErrorKind.INVALID
    at: float = field(default=0.0, compare=False)  # when a worker said it (a refusal)

    def __str__(self) -> str:
        return self.text


def info_fingerprint(info: Info | None) -> tuple:
    """What a backend can serve, as far as refusals go: when this changes, what it refused
    before may now work."""
    if info is None:
        return ()
    return (info.state, tuple(info.models), tuple(info.upscalers), tuple(info.capabilities),
            info.limits.model_dump_json(), info.version)


STATUS_COLOURS = {
    BackendStatus.DISABLED: "orange",
    BackendStatus.LOADING: "gold",
    BackendStatus.RUNNING: "green",
    BackendStatus.ERRORED: "red",
    BackendStatus.IDLE: "grey",
}


def next_check_delay(status: BackendStatus, failures: int, healthy_every: float) -> float:
    """How long to wait before the next health check: quick while healthy, backing off while
    away. AllowIdle peers are retried sooner than errored ones, since they are expected back."""
    if status in (BackendStatus.RUNNING, BackendStatus.LOADING):
        return healthy_every
    if status == BackendStatus.IDLE:
        return min(0.5 * 2 ** min(failures, 10), 8.0)
    return min(2.0 * 2 ** min(failures, 10), 60.0)


@dataclass(eq=False)  # one object per worker: compared by identity, never field by field
class Backend:
    """What the controller knows of one worker. Thin: state.py and the scheduler decide."""

    name: str
    url: str
    allow_idle: bool = False
    slots: int = 2
    enabled: bool = True
    status: BackendStatus = BackendStatus.LOADING
    reason: str | None = None
    info: Info | None = None
    running: int = 0
    failures: int = 0
    next_check: float = 0.0
    checking: bool = False  # a health check is under way
    unit_seconds_hint: float | None = field(default=None, repr=False)
    speed: SpeedModel = field(default_factory=SpeedModel, repr=False)
    batch_hint: int = 4  # the batch size the scheduler aims for (for throughput figures)
    overhead_s: float = 0.1  # per-job cost beyond the GPU's: round trips, tunnel, transfers
    batch_cap: int = 64  # lowered when the worker runs out of GPU memory on a batch
    quarantine_until: float = 0.0  # a worker caught lying stays errored until then
    offences: int = 0
    paused_until: float = 0.0  # a worker that said "busy, retry later" gets no job till then
    busy_answers: int = 0  # "busy" answers in a row (backs the pause off)
    images_done: int = 0
    last_seen: float | None = None
    refused: dict[tuple, Why] = field(default_factory=dict)  # param key -> why it said no

    def __post_init__(self) -> None:
        if self.unit_seconds_hint:
            self.speed.seed(self.unit_seconds_hint)

    @property
    def unit_seconds(self) -> float | None:
        """Seconds per unit of work (step x megapixel x image) at the usual batch size."""
        return self.speed.unit_seconds(min(self.batch_hint, self.max_batch()))

    def job_seconds(self, n: int, units_per_image: float) -> float | None:
        t = self.speed.job_seconds(n, units_per_image)
        return None if t is None else t + self.overhead_s

    def note_job(self, n: int, run_s: float, elapsed: float, units_per_image: float) -> None:
        """Learn from a finished job: GPU time from the worker, the rest is overhead."""
        self.speed.observe(n, run_s, units_per_image)
        extra = max(elapsed - run_s, 0.0)
        if 0 < run_s < elapsed:  # queueing behind our other slot is not overhead: cap it
            extra = min(extra, 5.0)
            self.overhead_s = 0.8 * self.overhead_s + 0.2 * extra

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, {self.url!r}, status={self.status.value})"

    @property
    def usable(self) -> bool:
        return self.enabled and self.status == BackendStatus.RUNNING

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - self.running) if self.usable else 0

    def why_not(self, req: JobRequest, key: tuple | None = None) -> Why | None:
        """None if this backend can serve the job, else the reason (shown in the logs)."""
        if not self.enabled:
            return Why("disabled", hard=False)
        if self.status != BackendStatus.RUNNING:
            return Why(f"status {self.status.value}", hard=False)
        if self.refused:
            reason = self.refused.get(key if key is not None else req.param_key())
            if reason:
                return reason
        info = self.info
        if info is None:
            return Why("no info yet", hard=False)
        missing = ErrorKind.MODEL_NOT_AVAILABLE
        if req.model is not None and req.model not in info.models:
            return Why(f"does not have model {req.model!r}", kind=missing)
        if req.kind not in info.capabilities:
            return Why(f"cannot do {req.kind}")
        lim = info.limits
        if req.kind != "upscale":
            if req.width * req.height > lim.max_pixels:
                return Why(f"{req.width}x{req.height} is over its {lim.max_pixels} pixels")
            if req.steps > lim.max_steps:
                return Why(f"{req.steps} steps is over its {lim.max_steps}")
        if req.upscaler and req.upscaler not in info.upscalers:
            return Why(f"does not have upscaler {req.upscaler!r}", kind=missing)
        if req.sampler not in (None, DEFAULT_SAMPLER) and req.sampler not in info.samplers:
            return Why(f"does not run sampler {req.sampler!r}"
                       + ("" if info.samplers else " (update colabswarm on that worker)"),
                       kind=missing)
        for lo in req.loras:
            if not any(have.name == lo.name and have.hash.startswith(lo.hash.lower())
                       for have in info.loras):
                return Why(f"does not have LoRA {lo.name!r} with hash {lo.hash[:12]}",
                           kind=missing)
        if req.clip_skip > 1 and "clip_skip" not in info.capabilities:
            return Why("cannot do clip skip (update colabswarm on that worker)")
        if req.kind == "img2img" and req.upscaler and "tiles" not in info.capabilities:
            return Why("cannot cut tiles itself (update colabswarm on that worker)")
        return None

    def max_batch(self) -> int:
        return min(self.info.limits.max_images, self.batch_cap) if self.info else 1

    def load_seconds(self, model: str) -> float:
        """How long switching to `model` takes on this worker: measured for that model, else
        its other loads' mean, else a prior (a Stable Diffusion pipeline from local disk)."""
        times = self.info.load_seconds if self.info is not None else {}
        if model in times:
            return times[model]
        return sum(times.values()) / len(times) if times else DEFAULT_LOAD_SECONDS

    def batch_sizes(self, req: JobRequest) -> list[int] | None:
        """The batch sizes a compiled worker runs for this job's image size (its buckets), or
        None where any size goes."""
        comp = self.info.compile if self.info is not None else None
        if comp is None or comp.state not in ("compiling", "ready") or req.kind == "upscale":
            return None
        for shape in comp.shapes:
            if (shape.width, shape.height) == (req.width, req.height) and shape.batches:
                return sorted(set(shape.batches))
        return None

    def snapshot(self) -> dict[str, Any]:
        """A plain dict for views (widgets, logs): no token."""
        return {
            "name": self.name,
            "url": self.url,
            "status": self.status.value,
            "colour": STATUS_COLOURS[self.status],
            "reason": self.reason,
            "allow_idle": self.allow_idle,
            "slots": self.slots,
            "enabled": self.enabled,
            "running": self.running,
            "images_done": self.images_done,
            "models": list(self.info.models) if self.info else [],
            "upscalers": list(self.info.upscalers) if self.info else [],
            "device": (self.info.gpu_name or self.info.device) if self.info else None,
            "role": self.info.role if self.info else None,  # "owner" | "guest" | None (older)
            "unit_seconds": self.unit_seconds,
            "last_seen": self.last_seen,
            "age": None if self.last_seen is None else time.monotonic() - self.last_seen,
            # away: seconds until the next try to reach it (the panel's countdown)
            "retry_in": (None if self.status in (BackendStatus.RUNNING, BackendStatus.DISABLED)
                         else max(self.next_check - time.monotonic(), 0.0)),
            "quarantined": self.quarantine_until > time.monotonic(),
            "compile": (self.info.compile.model_dump() if self.info is not None
                        and self.info.compile is not None else None),
            "samplers": list(self.info.samplers) if self.info else [],
            "loras": [lo.name for lo in self.info.loras] if self.info else [],
            "model_loaded": self.info.model_loaded if self.info else None,
        }
