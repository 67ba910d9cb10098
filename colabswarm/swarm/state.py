"""The controller's decisions, pure: events in, actions out.

`SwarmState` owns what the swarm knows and decides: the queue of items (one image or tile
each) and their states, the runs they belong to, the flights (a batch of items on one backend),
the backends' statuses, retry limits, copies, quarantine, batch caps after out-of-memory,
refusals and when they expire, pauses after "busy", and when each backend's health is checked.
It does no I/O, reads no clock and knows no asyncio: the controller (controller.py) turns what
happens on the wire into events, hands them to `handle()` with the time, and carries out the
actions that come back (start or cancel a flight, check a backend, deliver an image, finish a
run, tell the views). So every failure rule is tested here with plain event sequences, and no
worker can reach a decision except through an event whose fields were checked at the wire.

Modelled on how dask's worker state machine separates `handle_stimulus(events) -> instructions`
from the I/O that executes them, and on its scheduler's transition tables: item statuses move
along `scheduler.ITEM_TRANSITIONS` (`Item.move`), backend statuses along
`backends.TRANSITIONS` (`change_status`), and what a failed flight means for its backend and
its items is one table, `FAILURE_RULES`.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..errors import (
    ColabSwarmError,
    ErrorKind,
    InvalidRequest,
    JobFailed,
    JobInterrupted,
    ModelNotAvailable,
)
from ..protocol import Info, JobRequest, clean_text
from .backends import (
    Backend,
    BackendStatus,
    Why,
    change_status,
    info_fingerprint,
    next_check_delay,
)
from .scheduler import (
    Flight,
    Item,
    ItemStatus,
    batch_seconds,
    estimate_eta,
    loaded_model,
    model_of,
    pick_copies,
    plan_dispatch,
    rates,
)

__all__ = [
    "FAILURE_RULES",
    "Action",
    "BackendAdded",
    "BackendChanged",
    "BackendMisbehaved",
    "BackendRemoved",
    "BackendSettings",
    "CancelFlight",
    "CancelRun",
    "CheckHealth",
    "Deliver",
    "Event",
    "FinishRun",
    "FlightCancelled",
    "FlightFailed",
    "FlightProgress",
    "FlightSucceeded",
    "HealthChecked",
    "HealthFailed",
    "InterruptAll",
    "Log",
    "NewRun",
    "Progress",
    "StartFlight",
    "SwarmConfig",
    "SwarmState",
    "Tick",
]

_MAX_PAUSE_S = 300.0       # a worker's "retry after" is believed up to this
_QUARANTINE_S = 60.0       # first quarantine; doubles per offence up to an hour
_SKIP_MEMORY = 2048        # distinct "skipped because" lines remembered (logged once each)
_TIMED_DISPATCH_S = 0.25   # how often time alone is reason to look at the queue again
_REFUSAL_S = 300.0         # a refusal is believed this long, or until the worker's info changes


# ----- events: what happened (the controller makes them from the wire, with the time) ------
@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: health checks and pauses may be due."""

    now: float


@dataclass(frozen=True, slots=True)
class NewRun:
    """A request: one image per seed, all of `template`, or each of its own (`templates`, one
    per seed: a prompt list, or an X/Y grid's cells)."""

    run_id: int
    kind: str
    template: JobRequest
    seeds: tuple[int, ...]
    now: float
    init_pngs: tuple[bytes | None, ...] | None = None
    crops: tuple[tuple[int, int, int, int], ...] | None = None
    templates: tuple[JobRequest, ...] | None = None


@dataclass(frozen=True, slots=True)
class CancelRun:
    """The user (or a failed upscale) calls one run off."""

    run_id: int
    error: ColabSwarmError
    now: float


@dataclass(frozen=True, slots=True)
class InterruptAll:
    now: float


@dataclass(frozen=True, slots=True)
class BackendAdded:
    """A backend registered; `info` is its first /v1/info, or None with the reason it could not
    be had (an AllowIdle peer that is away)."""

    backend: Backend
    now: float
    info: Info | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class BackendRemoved:
    name: str
    now: float


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """The user's word on a backend: None leaves a setting as it is."""

    name: str
    now: float
    enabled: bool | None = None
    allow_idle: bool | None = None
    slots: int | None = None
    index: int | None = None


@dataclass(frozen=True, slots=True)
class HealthChecked:
    name: str
    info: Info
    now: float


@dataclass(frozen=True, slots=True)
class HealthFailed:
    name: str
    kind: ErrorKind
    message: str
    now: float


@dataclass(frozen=True, slots=True)
class BackendMisbehaved:
    """A lie found after the fact (an image whose pixels turned out broken when decoded)."""

    name: str
    message: str
    now: float


@dataclass(frozen=True, slots=True)
class FlightProgress:
    flight_id: int
    step: int
    total_steps: int


@dataclass(frozen=True, slots=True)
class FlightSucceeded:
    """Every image of the flight came back checked; `results` are opaque to the state (the
    images), one per item in order; run_s and queued_s are the worker's own figures."""

    flight_id: int
    results: tuple[Any, ...]
    run_s: float
    queued_s: float
    now: float


@dataclass(frozen=True, slots=True)
class FlightFailed:
    flight_id: int
    kind: ErrorKind
    message: str
    now: float
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class FlightCancelled:
    """A flight the state called off (CancelFlight) has stopped."""

    flight_id: int
    now: float


Event = (Tick | NewRun | CancelRun | InterruptAll | BackendAdded | BackendRemoved
         | BackendSettings | HealthChecked | HealthFailed | BackendMisbehaved | FlightProgress
         | FlightSucceeded | FlightFailed | FlightCancelled)


# ----- actions: what the controller must do now --------------------------------------------
@dataclass(frozen=True, slots=True)
class StartFlight:
    flight: Flight


@dataclass(frozen=True, slots=True)
class CancelFlight:
    flight_id: int
    why: str


@dataclass(frozen=True, slots=True)
class CheckHealth:
    name: str


@dataclass(frozen=True, slots=True)
class Deliver:
    run_id: int
    index: int
    seed: int
    backend: str
    seconds: float
    result: Any


@dataclass(frozen=True, slots=True)
class FinishRun:
    run_id: int
    error: ColabSwarmError | None


@dataclass(frozen=True, slots=True)
class BackendChanged:
    name: str | None  # None: removed


@dataclass(frozen=True, slots=True)
class Progress:
    pass


@dataclass(frozen=True, slots=True)
class Log:
    level: str  # debug, info, warning, skip
    message: str


Action = (StartFlight | CancelFlight | CheckHealth | Deliver | FinishRun | BackendChanged
          | Progress | Log)


# ----- what a failed flight means ------------------------------------------------------------
class Verdict(Enum):
    QUARANTINE = "quarantine"   # it lied: errored for a while, its work elsewhere
    DOWN = "down"               # unreachable: idle (AllowIdle) or errored, its work elsewhere
    ERRORED = "errored"         # its token or model is not usable: errored, AllowIdle or not
    PAUSE = "pause"             # busy for now: no job until its retry time, no blame
    REFUSED = "refused"         # will not run these parameters until its /v1/info changes
    SHRINK = "shrink"           # out of memory on a batch: halve its batches, no blame
    RETRY = "retry"             # the job failed there: try again (elsewhere first), with blame


@dataclass(frozen=True)
class Rule:
    verdict: Verdict
    blame: bool  # counts as an attempt of the items, and they avoid that backend


FAILURE_RULES: dict[ErrorKind, Rule] = {
    ErrorKind.MISBEHAVED: Rule(Verdict.QUARANTINE, True),
    ErrorKind.UNREACHABLE: Rule(Verdict.DOWN, True),
    ErrorKind.UNAUTHORIZED: Rule(Verdict.ERRORED, True),
    ErrorKind.FORBIDDEN: Rule(Verdict.ERRORED, True),
    ErrorKind.MODEL_FAILED: Rule(Verdict.ERRORED, True),
    ErrorKind.QUEUE_FULL: Rule(Verdict.PAUSE, False),
    ErrorKind.RATE_LIMITED: Rule(Verdict.PAUSE, False),
    ErrorKind.LOADING: Rule(Verdict.PAUSE, False),
    ErrorKind.INVALID: Rule(Verdict.REFUSED, False),
    ErrorKind.TOO_LARGE: Rule(Verdict.REFUSED, False),
    ErrorKind.MODEL_NOT_AVAILABLE: Rule(Verdict.REFUSED, False),
    ErrorKind.OUT_OF_MEMORY: Rule(Verdict.SHRINK, False),
    ErrorKind.INTERRUPTED: Rule(Verdict.RETRY, True),
    ErrorKind.NOT_FOUND: Rule(Verdict.RETRY, True),   # the job vanished (worker restarted)
    ErrorKind.NOT_READY: Rule(Verdict.RETRY, True),
    ErrorKind.CRASH: Rule(Verdict.RETRY, True),
    ErrorKind.BAD_SHARE: Rule(Verdict.RETRY, True),
    ErrorKind.TUNNEL: Rule(Verdict.DOWN, True),
}


@dataclass(frozen=True)
class SwarmConfig:
    max_batch: int = 8
    batching: bool = True
    copies: bool = True
    straggler_guard: bool = True
    max_attempts: int = 5
    health_every: float = 2.0
    flight_timeout_min: float = 60.0
    switching: str = "cost"  # model switches: "cost" (when it pays), "never", "always"


@dataclass(eq=False)
class RunState:
    id: int
    kind: str
    items: list[Item]
    delivered: int = 0
    finished: bool = False


@dataclass
class _Out:
    """Actions collected while one event is handled."""

    actions: list[Action] = field(default_factory=list)

    def __call__(self, action: Action) -> None:
        self.actions.append(action)


class SwarmState:
    """Everything the swarm decides; `handle(event)` is the only way in that changes it."""

    def __init__(self, config: SwarmConfig | None = None) -> None:
        self.config = config or SwarmConfig()
        self.backends: list[Backend] = []
        self.queue: deque[Item] = deque()
        self.flights: dict[int, Flight] = {}
        self.runs: dict[int, RunState] = {}
        # (backend, images, started, ended, outcome, copy) per finished flight, if traced
        self.trace: list[tuple[str, int, float, float, str, bool]] | None = None
        self._flight_ids = itertools.count(1)
        self._skips_logged: set[tuple[str, tuple, str]] = set()
        self._dirty = False
        self._recheck = False  # whether queued work may have become unservable
        self._last_timed = float("-inf")

    # ----- reads (no change) -----------------------------------------------------------------
    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name or b.url == name:
                return b
        raise KeyError(f"No backend {name!r}; known: {[b.name for b in self.backends]}")

    def unique_name(self, base: str) -> str:
        names = {b.name for b in self.backends}
        if base not in names:
            return base
        for i in itertools.count(2):
            if f"{base}-{i}" not in names:
                return f"{base}-{i}"
        raise AssertionError

    def counts(self) -> tuple[int, int, int, int]:
        """(images sent to workers, images queued here, of those sent: images whose worker
        is loading their model first, images whose denoising has begun)."""
        running: set[int] = set()
        loading: set[int] = set()
        stepping: set[int] = set()
        for f in self.flights.values():
            waiting = f.loads_model is not None and f.step == 0
            for it in f.items:
                if not it.done:
                    running.add(id(it))
                    if waiting:
                        loading.add(id(it))
                    if f.step > 0:
                        stepping.add(id(it))
        queued = sum(1 for it in self.queue if it.status is ItemStatus.QUEUED)
        return len(running), queued, len(loading), len(stepping)

    def activity(self, b: Backend) -> str | None:
        """What a backend is doing beyond its status, for views: 'loading model M'."""
        for f in self.flights.values():
            if f.backend is b and f.loads_model is not None and f.step == 0:
                return f"loading model {f.loads_model}"
        return None

    def eta(self, now: float) -> float | None:
        return estimate_eta(list(self.queue), self.backends, list(self.flights.values()), now)

    # ----- the one way in --------------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        out = _Out()
        now = getattr(event, "now", None)
        match event:
            case Tick():
                self._tick(event.now, out)
            case NewRun():
                self._new_run(event, out)
            case CancelRun():
                run = self.runs.get(event.run_id)
                if run is not None:
                    self._finish_run(run, event.error, out)
            case InterruptAll():
                self._interrupt(out)
            case BackendAdded():
                self._added(event, out)
            case BackendRemoved():
                self._removed(event, out)
            case BackendSettings():
                self._settings(event, out)
            case HealthChecked():
                self._health_ok(event, out)
            case HealthFailed():
                self._health_failed(event, out)
            case BackendMisbehaved():
                b = self._known(event.name)
                if b is not None and b.enabled:
                    self._quarantine(b, clean_text(event.message, 300), event.now, out)
            case FlightProgress():
                f = self.flights.get(event.flight_id)
                if f is not None:
                    f.step = max(0, min(event.step, 1_000_000))
                    f.total_steps = max(0, min(event.total_steps, 1_000_000))
                    out(Progress())
            case FlightSucceeded():
                self._flight_ok(event, out)
            case FlightFailed():
                self._flight_failed(event, out)
            case FlightCancelled():
                self._flight_cancelled(event, out)
            case _:
                raise TypeError(f"not an event: {event!r}")
        if self._dirty and now is not None:
            self._dispatch(now, out)
        return out.actions

    # ----- runs ------------------------------------------------------------------------------
    def _new_run(self, ev: NewRun, out: _Out) -> None:
        items = [Item(ev.run_id, i, s, ev.templates[i] if ev.templates else ev.template,
                      ev.init_pngs[i] if ev.init_pngs else None,
                      ev.crops[i] if ev.crops else None)
                 for i, s in enumerate(ev.seeds)]
        self.runs[ev.run_id] = RunState(ev.run_id, ev.kind, items)
        self.queue.extend(items)
        self._dirty = self._recheck = True
        out(Progress())

    def _finish_run(self, run: RunState, error: ColabSwarmError | None, out: _Out) -> None:
        if run.finished:
            return
        run.finished = True
        self.runs.pop(run.id, None)
        for it in run.items:
            if not it.done:
                it.move(ItemStatus.DROPPED)
        self._drop_finished_from_queue()
        for f in list(self.flights.values()):
            if all(it.done for it in f.items):
                out(CancelFlight(f.id, "its run is over"))
        out(FinishRun(run.id, error))
        self._dirty = True

    def _interrupt(self, out: _Out) -> None:
        runs, flying = list(self.runs.values()), len(self.flights)
        for run in runs:  # every item ends, so every flight is called off
            self._finish_run(run, JobInterrupted(
                f"Interrupted with {run.delivered} of {len(run.items)} images done."), out)
        self.queue.clear()
        out(Log("info", f"interrupted {len(runs)} request(s), {flying} running job(s)"))

    def _deliver(self, it: Item, result: Any, backend: str, seconds: float, out: _Out) -> None:
        if it.done:
            return  # a copy was first: each image is delivered exactly once
        it.move(ItemStatus.DONE)
        run = self.runs.get(it.run_id)
        if run is None:
            return
        run.delivered += 1
        out(Deliver(run.id, it.index, it.seed, backend, seconds, result))
        if run.delivered == len(run.items):
            self._finish_run(run, None, out)

    def _fail_item(self, it: Item, error: ColabSwarmError, out: _Out) -> None:
        if it.done:
            return
        it.move(ItemStatus.FAILED)
        run = self.runs.get(it.run_id)
        if run is not None:
            self._finish_run(run, error, out)
        self._drop_finished_from_queue()

    def _drop_finished_from_queue(self) -> None:
        if any(it.status is not ItemStatus.QUEUED for it in self.queue):
            self.queue = deque(it for it in self.queue if it.status is ItemStatus.QUEUED)

    def _requeue(self, items: Iterable[Item], b: Backend, why: str, blame: bool,
                 out: _Out) -> None:
        """Items whose flight ended without them: to the front of the queue, unless a copy
        still flies them or they are finished; with blame, it counts as an attempt and they
        avoid that backend while another can serve them."""
        back: list[Item] = []
        for it in items:
            if it.done or it.flights > 0:
                continue
            if blame:
                it.failed_on.add(b.name)
                it.attempts += 1
            if it.attempts >= self.config.max_attempts:
                self._fail_item(it, JobFailed(
                    f"Image with seed {it.seed} failed {it.attempts} times; last error: {why}. "
                    "Check the backends panel and the logs."), out)
                continue
            it.move(ItemStatus.QUEUED)
            back.append(it)
        if back:
            self.queue.extendleft(reversed(back))
            self._dirty = True
            seeds = ", ".join(str(it.seed) for it in back[:8]) + (" ..." if len(back) > 8
                                                                  else "")
            what = (f"seed {seeds} goes" if len(back) == 1
                    else f"{len(back)} images (seeds {seeds}) go")
            out(Log("info", f"{what} back to the front of the queue ({b.name}: {why})"))

    # ----- backends --------------------------------------------------------------------------
    def _set_status(self, b: Backend, status: BackendStatus, reason: str | None,
                    out: _Out, level: str = "info") -> None:
        was = b.status
        if change_status(b, status, reason):
            out(BackendChanged(b.name))
            self._dirty = self._recheck = True
            if was != status:
                tail = f": {reason}" if reason and status != BackendStatus.RUNNING else ""
                out(Log(level, f"{b.name} is {status.value}{tail}"))

    def _apply_info(self, b: Backend, info: Info, now: float, out: _Out) -> None:
        if info_fingerprint(info) != info_fingerprint(b.info) and b.refused:
            b.refused.clear()  # what it can serve changed: its old refusals may not hold
        b.info = info
        b.last_seen = now
        b.failures = 0
        if info.state == "ready":
            status, reason = BackendStatus.RUNNING, None
        elif info.state == "loading":
            status, reason = BackendStatus.LOADING, clean_text(
                info.state_detail or "loading its model", 200)
        else:
            status, reason = BackendStatus.ERRORED, clean_text(
                f"model failed: {info.state_detail}", 300)
        if b.enabled:
            self._set_status(b, status, reason, out,
                             "warning" if status == BackendStatus.ERRORED else "info")
        if info.step_seconds_per_mpix:  # a hint from the worker: believed only within reason
            b.speed.seed(min(max(info.step_seconds_per_mpix, 1e-4), 1e3))
        self._dirty = self._recheck = True

    def _added(self, ev: BackendAdded, out: _Out) -> None:
        b = ev.backend
        self.backends.append(b)
        if ev.info is not None:
            self._apply_info(b, ev.info, ev.now, out)
        else:
            b.failures = 1
            self._set_status(b, BackendStatus.IDLE, clean_text(ev.error or "away", 300), out)
        b.next_check = ev.now + next_check_delay(b.status, b.failures, self.config.health_every)
        out(Log("info", f"added {b.name} ({b.url}), {b.status.value}"))
        out(BackendChanged(b.name))
        self._dirty = self._recheck = True

    def _removed(self, ev: BackendRemoved, out: _Out) -> None:
        b = self.backend(ev.name)
        self.backends.remove(b)
        for f in self.flights.values():
            if f.backend is b:
                out(CancelFlight(f.id, "backend removed"))
        out(Log("info", f"removed {b.name}"))
        out(BackendChanged(None))
        self._dirty = self._recheck = True

    def _settings(self, ev: BackendSettings, out: _Out) -> None:
        b = self.backend(ev.name)
        if ev.slots is not None:
            if not 1 <= ev.slots <= 64:
                raise InvalidRequest(f"slots must be between 1 and 64 (got {ev.slots}).")
            b.slots = ev.slots
        if ev.allow_idle is not None:
            b.allow_idle = ev.allow_idle
        if ev.enabled is not None:
            b.enabled = ev.enabled
            if not ev.enabled:
                self._set_status(b, BackendStatus.DISABLED, "disabled by you", out)
                for f in self.flights.values():
                    if f.backend is b:
                        out(CancelFlight(f.id, "backend disabled"))
            else:  # the user's word also lifts a quarantine and a pause
                b.quarantine_until = b.paused_until = 0.0
                self._set_status(b, BackendStatus.LOADING, "checking", out)
                b.next_check = ev.now
        if ev.index is not None:
            self.backends.remove(b)
            self.backends.insert(max(0, min(ev.index, len(self.backends))), b)
        out(BackendChanged(b.name))
        self._dirty = self._recheck = True

    def _health_ok(self, ev: HealthChecked, out: _Out) -> None:
        b = self._known(ev.name)
        if b is None:
            return
        b.checking = False
        if b.enabled and ev.now >= b.quarantine_until:
            self._apply_info(b, ev.info, ev.now, out)
        b.next_check = ev.now + next_check_delay(b.status, 0, self.config.health_every)

    def _health_failed(self, ev: HealthFailed, out: _Out) -> None:
        b = self._known(ev.name)
        if b is None:
            return
        b.checking = False
        if not b.enabled:
            return
        reason = clean_text(ev.message, 300)
        rule = FAILURE_RULES.get(ev.kind, FAILURE_RULES[ErrorKind.CRASH])
        if rule.verdict is Verdict.QUARANTINE:
            self._quarantine(b, reason, ev.now, out)
        elif b.status in (BackendStatus.RUNNING, BackendStatus.LOADING) \
                or rule.verdict is Verdict.ERRORED:
            self._mark_down(b, reason, ev.now, out, errored=rule.verdict is Verdict.ERRORED)
        else:
            b.failures += 1
            b.reason = reason
            b.next_check = ev.now + next_check_delay(b.status, b.failures,
                                                     self.config.health_every)

    def _known(self, name: str) -> Backend | None:
        return next((b for b in self.backends if b.name == name), None)

    def _mark_down(self, b: Backend, reason: str, now: float, out: _Out,
                   errored: bool = False) -> None:
        """A backend stopped answering: AllowIdle ones go quietly idle, others errored."""
        if not b.enabled:
            return
        b.failures += 1
        idle = b.allow_idle and not errored
        self._set_status(b, BackendStatus.IDLE if idle else BackendStatus.ERRORED, reason, out,
                         "info" if idle else "warning")
        b.next_check = now + next_check_delay(b.status, b.failures, self.config.health_every)
        for f in self.flights.values():
            if f.backend is b:
                out(CancelFlight(f.id, "backend down"))

    def _quarantine(self, b: Backend, reason: str, now: float, out: _Out) -> None:
        """A worker that sent what no honest worker sends stays errored for a while (1 min,
        doubling to 1 h), even if its /v1/info looks fine meanwhile."""
        b.offences += 1
        b.quarantine_until = now + min(_QUARANTINE_S * 2 ** (b.offences - 1), 3600.0)
        self._mark_down(b, f"{reason} (quarantined)", now, out, errored=True)
        b.next_check = b.quarantine_until

    def _tick(self, now: float, out: _Out) -> None:
        for b in self.backends:
            if b.enabled and not b.checking and b.next_check <= now \
                    and now >= b.quarantine_until:
                b.checking = True
                out(CheckHealth(b.name))
        for b in self.backends:
            if b.refused and any(now - w.at > _REFUSAL_S for w in b.refused.values()):
                b.refused = {k: w for k, w in b.refused.items() if now - w.at <= _REFUSAL_S}
                self._dirty = self._recheck = True
        if any(0 < b.paused_until <= now for b in self.backends):
            for b in self.backends:
                if 0 < b.paused_until <= now:
                    b.paused_until = 0.0
            self._dirty = True
        if (self.queue or (self.config.copies and self.flights)) \
                and now - self._last_timed >= _TIMED_DISPATCH_S:
            # time alone may open a slot (a straggler guard's estimate) or make a copy pay
            self._last_timed = now
            self._dirty = True

    # ----- flights ---------------------------------------------------------------------------
    def _launch(self, b: Backend, items: list[Item], now: float, out: _Out,
                copy_of: Flight | None = None) -> None:
        rate = rates([x for x in self.backends if x.usable] + [b])
        estimate = batch_seconds(b, len(items), items[0].units, rate)
        known = b.job_seconds(len(items), items[0].units)
        timeout = min(max(self.config.flight_timeout_min,
                          8 * known + 30 if known else 600.0), 1800.0)
        want = model_of(b, items[0].template)
        loads = None
        if want is not None and want != loaded_model(b, self.flights.values()):
            loads = want
            timeout = min(timeout + 2 * b.load_seconds(want), 3600.0)  # it loads first
        f = Flight(b, items, now, estimate, copy_of=copy_of, id=next(self._flight_ids),
                   timeout=timeout, loads_model=loads)
        for it in items:
            it.flights += 1
            if it.status is ItemStatus.QUEUED:
                it.move(ItemStatus.FLYING)
        b.running += 1
        self.flights[f.id] = f
        out(StartFlight(f))
        out(Progress())

    def _land(self, flight_id: int, now: float, outcome: str) -> Flight | None:
        f = self.flights.pop(flight_id, None)
        if f is None:
            return None
        f.backend.running -= 1
        for it in f.items:
            it.flights -= 1
        # the worker runs one job at a time: the oldest job of this backend still out begins
        # now, if it was sent earlier and waited behind this one
        waiting = [g for g in self.flights.values() if g.backend is f.backend]
        if waiting:
            nxt = min(waiting, key=lambda g: g.started)
            nxt.began = max(nxt.began, now)
        if self.trace is not None:
            self.trace.append((f.backend.name, len(f.items), f.started, now, outcome,
                               f.copy_of is not None))
        self._dirty = True
        return f

    def _flight_ok(self, ev: FlightSucceeded, out: _Out) -> None:
        f = self._land(ev.flight_id, ev.now, "ok")
        if f is None:
            return
        b, items = f.backend, f.items
        elapsed = max(ev.now - f.started, 0.0)
        problem = None
        if len(ev.results) != len(items):
            problem = f"sent {len(ev.results)} images for {len(items)} seeds"
        elif not (math.isfinite(ev.run_s) and math.isfinite(ev.queued_s)
                  and 0.0 <= ev.run_s <= elapsed + 1.0 and 0.0 <= ev.queued_s <= elapsed + 1.0):
            problem = (f"reported running {ev.run_s:.3g}s and queueing {ev.queued_s:.3g}s "
                       f"for a job that took {elapsed:.3g}s")
        if problem:
            self._quarantine(b, f"{b.name} {problem}", ev.now, out)
            self._requeue(items, b, problem, True, out)
            return
        # the worker's own run time: wall time would count waiting behind our other slot
        ran = ev.run_s if ev.run_s > 0 else elapsed
        b.note_job(len(items), ran, elapsed - ev.queued_s, items[0].units)
        b.images_done += len(items)
        b.busy_answers = 0
        per = elapsed / len(items)
        for it, result in zip(items, ev.results, strict=True):
            self._deliver(it, result, b.name, per, out)
        self._drop_finished_from_queue()
        for other in list(self.flights.values()):  # copies that lost the race
            if all(it.done for it in other.items):
                out(CancelFlight(other.id, "a copy won"))
        out(Progress())

    def _flight_failed(self, ev: FlightFailed, out: _Out) -> None:
        f = self._land(ev.flight_id, ev.now, "failed")
        if f is None:
            return
        b, items = f.backend, f.items
        msg = clean_text(ev.message, 300)
        rule = FAILURE_RULES.get(ev.kind, FAILURE_RULES[ErrorKind.CRASH])
        verdict = rule.verdict
        if verdict is Verdict.SHRINK and len(items) == 1:
            verdict = Verdict.RETRY  # one image that does not fit: a failure like any other
        blame = rule.blame or verdict is Verdict.RETRY
        mine = items
        if verdict is Verdict.QUARANTINE:
            self._quarantine(b, msg, ev.now, out)
        elif verdict is Verdict.DOWN:
            self._mark_down(b, msg, ev.now, out)
        elif verdict is Verdict.ERRORED:
            self._mark_down(b, msg, ev.now, out, errored=True)
        elif verdict is Verdict.PAUSE:
            b.busy_answers += 1
            wait = ev.retry_after_s if ev.retry_after_s is not None else \
                min(1.0 * 2 ** (b.busy_answers - 1), 60.0)
            b.paused_until = ev.now + min(max(wait, 0.1), _MAX_PAUSE_S)
            out(Log("info", f"{b.name} is busy ({msg}); no new job there for "
                            f"{b.paused_until - ev.now:.0f}s"))
        elif verdict is Verdict.REFUSED:
            b.refused[items[0].key] = Why(msg, hard=True, kind=ev.kind, at=ev.now)
            self._recheck = True
            out(Log("warning", f"{b.name} refused a job: {msg}"))
        elif verdict is Verdict.SHRINK:
            b.batch_cap = max(1, len(items) // 2)
            out(Log("warning", f"{b.name} ran out of memory at {len(items)} images; its "
                               f"batches are now at most {b.batch_cap}"))
        else:
            out(Log("warning", f"{b.name} failed a job: {msg}"))
        if ev.kind is ErrorKind.INTERRUPTED:  # our own interrupt: its runs are gone already
            mine = [it for it in mine if it.run_id in self.runs]
        self._requeue(mine, b, msg, blame, out)

    def _flight_cancelled(self, ev: FlightCancelled, out: _Out) -> None:
        f = self._land(ev.flight_id, ev.now, "cancelled")
        if f is None:
            return
        why = f.backend.reason or "its job was called off"
        self._requeue(f.items, f.backend, why, False, out)

    # ----- dispatch --------------------------------------------------------------------------
    def _dispatch(self, now: float, out: _Out) -> None:
        self._dirty = False
        self._drop_finished_from_queue()
        if not self.queue and not (self.config.copies and self.flights):
            return
        if self._recheck:  # only what a backend can do, or a new run, can change the answer
            self._recheck = False
            self._fail_unservable(out)
        ready = [b for b in self.backends if b.paused_until <= now]
        if not any(b.free_slots for b in ready):
            return  # every slot is taken: nothing to plan until one lands
        flights = list(self.flights.values())
        cfg = self.config
        plan, skips = plan_dispatch(list(self.queue), ready, flights, now,
                                    max_batch=cfg.max_batch, batching=cfg.batching,
                                    straggler_guard=cfg.straggler_guard,
                                    switching=cfg.switching)
        for b, it, why in skips:
            text = str(why)
            key = (b.name, it.key, text)
            if text != "busy" and key not in self._skips_logged:
                if len(self._skips_logged) >= _SKIP_MEMORY:
                    self._skips_logged.clear()
                self._skips_logged.add(key)
                out(Log("skip", f"{b.name} skipped for {self._job_words(it)}: {text}"))
        for b, batch in plan:
            self._launch(b, batch, now, out)
        if plan:
            self._drop_finished_from_queue()
        if cfg.copies and not self.queue:
            for b, f in pick_copies(self.queue, ready, list(self.flights.values()), now):
                f.has_copy = True
                out(Log("info", f"{b.name} runs a copy of {len(f.items)} image(s) held by "
                                f"{f.backend.name} (first result wins)"))
                self._launch(b, [it for it in f.items if not it.done], now, out, copy_of=f)

    def _job_words(self, it: Item) -> str:
        """'an upscale tile', 'an img2img job', 'a txt2img job': for log lines people read."""
        run = self.runs.get(it.run_id)
        if run is not None and run.kind == "upscale":
            return "an upscale tile"
        kind = it.template.kind
        return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind} job"

    def _fail_unservable(self, out: _Out) -> None:
        """Items no registered backend could ever serve fail now, with the reason."""
        if not self.backends or not self.queue:
            return  # waiting for the user to add one
        live = [b for b in self.backends if b.enabled and b.status != BackendStatus.DISABLED]
        if not live or any(b.info is None or b.status != BackendStatus.RUNNING for b in live):
            return  # someone may still come up able
        seen: dict[tuple, list[tuple[str, Why | None]]] = {}
        for it in list(self.queue):
            if it.done:
                continue
            reasons = seen.get(it.key)
            if reasons is None:
                reasons = seen[it.key] = [(b.name, b.why_not(it.template, it.key))
                                          for b in live]
            if all(w is not None and w.hard for _, w in reasons):
                why = "; ".join(f"{n}: {w}" for n, w in reasons)
                missing = all(w is not None and w.kind is ErrorKind.MODEL_NOT_AVAILABLE
                              for _, w in reasons)
                err = ModelNotAvailable if missing else InvalidRequest
                self._fail_item(it, err(f"No backend can run this job ({why})."), out)
