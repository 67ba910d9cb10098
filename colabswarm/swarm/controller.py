"""The Swarm: many workers as one. Runs on its own event-loop thread so a notebook stays free.

Every mutation of swarm state happens on that loop; sync methods hand coroutines to it and wait,
async twins (``a...``) await it from any other loop, and ``submit_*`` return futures at once
for widgets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from ..backend.client import WorkerClient
from ..errors import (
    AuthError,
    BackendUnavailable,
    BadShareString,
    ColabSwarmError,
    InvalidRequest,
    JobFailed,
    JobInterrupted,
    ModelNotAvailable,
    WorkerMisbehaved,
)
from ..protocol import MAX_SEED, JobRequest, decode_share
from .backends import Backend, BackendStatus, next_check_delay
from .outputs import GeneratedImage, save_image
from .scheduler import (
    Flight,
    Item,
    batch_seconds,
    estimate_eta,
    pick_copies,
    plan_dispatch,
    rates,
)
from .upscale import UpscaleResult, check_upscale_params, run_upscale

__all__ = ["GenerationResult", "Swarm", "SwarmStatus", "format_duration"]

log = logging.getLogger("colabswarm.swarm")
T = TypeVar("T")
Listener = Callable[[dict[str, Any]], None]


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    return f"{s // 3600}h {s % 3600 // 60}m"


@dataclass
class SwarmStatus:
    current: int
    running: int
    queued: int
    eta_s: float | None
    backends: list[dict[str, Any]]

    @property
    def line(self) -> str:
        est = "" if self.current == 0 else f" (est. {format_duration(self.eta_s)})"
        return (f"{self.current} current generations, {self.running} running, "
                f"{self.queued} queued{est}")


@dataclass
class GenerationResult:
    """Every image of one request, in seed order."""

    images: list[GeneratedImage]
    params: dict[str, Any]
    seconds: float

    def __iter__(self):
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)


@dataclass(eq=False)
class _Run:
    id: int
    kind: str
    items: list[Item]
    params: dict[str, Any]
    future: asyncio.Future
    on_image: Callable[[GeneratedImage], Any] | None
    save: bool
    started: float = field(default_factory=time.monotonic)
    results: dict[int, GeneratedImage] = field(default_factory=dict)
    stream: asyncio.Queue | None = None


class Swarm:
    """An ordered list of workers, driven as one: see DESIGN.md's scheduling rules."""

    def __init__(
        self,
        output_dir: str | Path | None = "outputs",
        *,
        max_batch: int = 8,
        batching: bool = True,
        copies: bool = True,
        straggler_guard: bool = True,
        max_attempts: int = 5,
        health_every: float = 2.0,
        flight_timeout_min: float = 60.0,
        log_lines: int = 500,
        trace: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir) if output_dir else None
        self.max_batch = max_batch
        self.batching = batching
        self.copies = copies
        self.straggler_guard = straggler_guard
        self.max_attempts = max_attempts
        self.health_every = health_every
        self.flight_timeout_min = flight_timeout_min
        self.logs: deque[tuple[float, str, str]] = deque(maxlen=log_lines)
        # (backend, images, started, ended, outcome, copy) per finished job, for benchmarks
        self.trace: list[tuple[str, int, float, float, str, bool]] | None = [] if trace else None
        self._backends: list[Backend] = []
        self._queue: deque[Item] = deque()
        self._flights: list[Flight] = []
        self._runs: dict[int, _Run] = {}
        self._run_ids = itertools.count(1)
        self._listeners: list[Listener] = []
        self._skip_seen: set[tuple[str, tuple, str]] = set()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="colabswarm-swarm",
                                        daemon=True)
        self._thread.start()
        self._wake: asyncio.Event = self._call(self._make_event())
        self._tasks = [
            asyncio.run_coroutine_threadsafe(self._dispatch_loop(), self._loop),
            asyncio.run_coroutine_threadsafe(self._health_loop(), self._loop),
        ]

    async def _make_event(self) -> asyncio.Event:
        return asyncio.Event()

    # ----- loop plumbing -------------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run on the swarm loop and wait (sync callers, e.g. a notebook cell)."""
        if self._in_loop():
            coro.close()
            raise RuntimeError("Use the async twin (await swarm.a...) inside the swarm's loop.")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _acall(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._in_loop():
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _in_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call listener(event) for every change; returns an unsubscribe function.

        Events are dicts with a 'type': backend, image, progress, run, log. Listeners run on
        the swarm's thread and must be quick.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _emit(self, **event: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken view must not break the swarm
                log.exception("listener failed")

    def _log(self, level: str, message: str) -> None:
        self.logs.append((time.time(), level, message))
        getattr(log, level if level != "skip" else "debug")(message)
        self._emit(type="log", level=level, message=message)

    def _kick(self) -> None:
        self._wake.set()

    # ----- backends ------------------------------------------------------------------------
    def _read(self, fn: Callable[[], T]) -> T:
        """A consistent read of swarm state: on the loop's thread, from wherever it is asked."""
        if self._in_loop():
            return fn()

        async def on_loop() -> T:
            return fn()

        return self._call(on_loop())

    @property
    def backends(self) -> list[dict[str, Any]]:
        """Snapshots of the backends, in order (no tokens)."""
        return self._read(lambda: [b.snapshot() for b in self._backends])

    def add(self, share_or_url: str, token: str | None = None, name: str | None = None,
            allow_idle: bool = False, slots: int = 2) -> dict[str, Any]:
        """Register a worker by its share string; contacts it once before returning."""
        return self._call(self.aadd(share_or_url, token, name, allow_idle, slots))

    async def aadd(self, share_or_url: str, token: str | None = None, name: str | None = None,
                   allow_idle: bool = False, slots: int = 2) -> dict[str, Any]:
        return await self._acall(self._add(share_or_url, token, name, allow_idle, slots))

    def add_many(self, text: str, allow_idle: bool = False, slots: int = 2) -> list[Any]:
        """Register every share string in a pasted block; returns a snapshot or an error each."""
        out: list[Any] = []
        for line in [ln.strip() for ln in text.replace(",", "\n").splitlines() if ln.strip()]:
            try:
                out.append(self.add(line, allow_idle=allow_idle, slots=slots))
            except ColabSwarmError as exc:
                out.append(exc)
        return out

    async def _add(self, share: str, token: str | None, name: str | None, allow_idle: bool,
                   slots: int) -> dict[str, Any]:
        url, token = decode_share(share, token)
        if slots < 1 or slots > 64:
            raise BadShareString(f"slots must be between 1 and 64 (got {slots}).")
        if any(b.url == url for b in self._backends):
            raise BadShareString(f"{url} is already registered.")
        client = WorkerClient(url, token, timeout=30.0, connect_retries=1)
        b = Backend(name=name or url, url=url, token=token, allow_idle=allow_idle, slots=slots,
                    client=client)
        try:
            try:
                info = await asyncio.wait_for(client.info(), 15.0)
            except TimeoutError:
                raise BackendUnavailable(f"{url} did not answer within 15s.") from None
        except (BackendUnavailable, AuthError) as exc:
            if isinstance(exc, AuthError) or not allow_idle:
                await client.aclose()
                raise
            b.status, b.reason = BackendStatus.IDLE, str(exc)
            b.failures = 1
        else:
            self._apply_info(b, info)
            if name is None:
                b.name = self._unique_name(info.name)
        b.next_check = time.monotonic() + next_check_delay(b.status, b.failures, self.health_every)
        if name and any(x.name == name for x in self._backends):
            await client.aclose()
            raise BadShareString(f"A backend named {name!r} already exists; pick another name.")
        self._backends.append(b)
        self._log("info", f"added {b.name} ({url}), {b.status.value}")
        self._emit(type="backend", backend=b.snapshot())
        self._kick()
        return b.snapshot()

    def _unique_name(self, base: str) -> str:
        names = {b.name for b in self._backends}
        if base not in names:
            return base
        for i in itertools.count(2):
            if f"{base}-{i}" not in names:
                return f"{base}-{i}"
        raise AssertionError

    def _find(self, name: str) -> Backend:
        for b in self._backends:
            if b.name == name or b.url == name:
                return b
        raise KeyError(f"No backend {name!r}; known: {[b.name for b in self._backends]}")

    def remove(self, name: str) -> None:
        self._call(self._remove(name))

    async def _remove(self, name: str) -> None:
        b = self._find(name)
        self._backends.remove(b)
        for f in [f for f in self._flights if f.backend is b]:
            f.task.cancel()
        await b.client.aclose()
        self._log("info", f"removed {b.name}")
        self._emit(type="backend", backend=None)

    def move(self, name: str, index: int) -> None:
        """Reorder: index 0 is tried first."""
        self._call(self._move(name, index))

    async def _move(self, name: str, index: int) -> None:
        b = self._find(name)
        self._backends.remove(b)
        self._backends.insert(max(0, min(index, len(self._backends))), b)
        self._emit(type="backend", backend=b.snapshot())
        self._kick()

    def set(self, name: str, *, enabled: bool | None = None, allow_idle: bool | None = None,
            slots: int | None = None) -> None:
        self._call(self._set(name, enabled, allow_idle, slots))

    async def _set(self, name: str, enabled: bool | None, allow_idle: bool | None,
                   slots: int | None) -> None:
        b = self._find(name)
        if enabled is not None:
            b.enabled = enabled
            if not enabled:
                b.status, b.reason = BackendStatus.DISABLED, "disabled by you"
            else:  # the user's word also lifts a quarantine
                b.status, b.reason, b.next_check = BackendStatus.LOADING, None, 0.0
                b.quarantine_until = 0.0
        if allow_idle is not None:
            b.allow_idle = allow_idle
        if slots is not None:
            if not 1 <= slots <= 64:
                raise InvalidRequest(f"slots must be between 1 and 64 (got {slots}).")
            b.slots = slots
        self._emit(type="backend", backend=b.snapshot())
        self._kick()

    def enable(self, name: str) -> None:
        self.set(name, enabled=True)

    def disable(self, name: str) -> None:
        self.set(name, enabled=False)

    def _apply_info(self, b: Backend, info: Any) -> None:
        b.info = info
        b.last_seen = time.monotonic()
        b.failures = 0
        if info.state == "ready":
            b.status, b.reason = BackendStatus.RUNNING, None
        elif info.state == "loading":
            b.status, b.reason = BackendStatus.LOADING, "loading its model"
        else:
            b.status, b.reason = BackendStatus.ERRORED, f"model failed: {info.state_detail}"
        if info.step_seconds_per_mpix:  # a hint from the worker: believed only within reason
            b.speed.seed(min(max(info.step_seconds_per_mpix, 1e-4), 1e3))

    def _mark_down(self, b: Backend, reason: str) -> None:
        """A backend stopped answering: AllowIdle ones go quietly idle, others errored."""
        if not b.enabled:
            return
        was = b.status
        b.failures += 1
        if b.allow_idle and "refused the token" not in reason:
            b.status, b.reason = BackendStatus.IDLE, reason
        else:
            b.status, b.reason = BackendStatus.ERRORED, reason
        b.next_check = time.monotonic() + next_check_delay(b.status, b.failures,
                                                           self.health_every)
        if was != b.status:
            level = "info" if b.status == BackendStatus.IDLE else "warning"
            self._log(level, f"{b.name} is {b.status.value}: {reason}")
            self._emit(type="backend", backend=b.snapshot())
        for f in [f for f in self._flights if f.backend is b]:
            if f.task is not None:
                f.task.cancel(msg="backend down")

    def _quarantine(self, b: Backend, reason: str) -> None:
        """A worker that sent what no honest worker sends stays errored for a while (1 min,
        doubling to 1 h), even if its /v1/info looks fine meanwhile."""
        b.offences += 1
        b.quarantine_until = time.monotonic() + min(60.0 * 2 ** (b.offences - 1), 3600.0)
        allow_idle, b.allow_idle = b.allow_idle, False  # a liar is errored, never quietly idle
        self._mark_down(b, f"{reason} (quarantined)")
        b.allow_idle = allow_idle
        b.next_check = b.quarantine_until

    async def _check(self, b: Backend) -> None:
        if time.monotonic() < b.quarantine_until:
            b.next_check = b.quarantine_until
            return
        try:
            info = await asyncio.wait_for(b.client.info(), 10.0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = str(exc) if not isinstance(exc, TimeoutError) else "no answer within 10s"
            if b.status in (BackendStatus.RUNNING, BackendStatus.LOADING):
                self._mark_down(b, reason)
            else:
                b.failures += 1
                b.reason = reason
                b.next_check = time.monotonic() + next_check_delay(b.status, b.failures,
                                                                   self.health_every)
            return
        was = b.status
        self._apply_info(b, info)
        b.next_check = time.monotonic() + next_check_delay(b.status, 0, self.health_every)
        if was != b.status:
            self._log("info", f"{b.name} is {b.status.value}")
            self._emit(type="backend", backend=b.snapshot())
            self._kick()

    async def _health_loop(self) -> None:
        checking: dict[str, asyncio.Task] = {}
        while not self._closed:
            now = time.monotonic()
            for b in list(self._backends):
                if not b.enabled or b.next_check > now:
                    continue
                t = checking.get(b.name)
                if t is None or t.done():
                    b.next_check = now + 3600  # set properly when the check ends
                    checking[b.name] = asyncio.ensure_future(self._check(b))
            await asyncio.sleep(0.1)

    def check_now(self) -> None:
        """Ask every backend for its state at once (the panel's refresh)."""
        self._call(self._check_all())

    async def _check_all(self) -> None:
        await asyncio.gather(*(self._check(b) for b in self._backends if b.enabled))

    # ----- dispatch ------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while not self._closed:
            try:
                await asyncio.wait_for(self._wake.wait(), 0.25)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                self._dispatch()
            except Exception:
                log.exception("dispatch failed")

    def _dispatch(self) -> None:
        now = time.monotonic()
        self._fail_unservable()
        plan, skips = plan_dispatch(
            list(self._queue), self._backends, self._flights, now,
            max_batch=self.max_batch, batching=self.batching,
            straggler_guard=self.straggler_guard,
        )
        for b, it, why in skips:
            key = (b.name, it.key, why)
            if key not in self._skip_seen and why != "busy":
                self._skip_seen.add(key)
                self._log("skip", f"{b.name} skipped for a {it.template.kind} job: {why}")
        for b, batch in plan:
            for it in batch:
                self._queue.remove(it)
            self._launch(b, batch)
        if self.copies and not self._queue:
            for b, f in pick_copies(self._queue, self._backends, self._flights, now):
                f.has_copy = True
                self._log("info", f"{b.name} runs a copy of {len(f.items)} image(s) held by "
                                  f"{f.backend.name} (first result wins)")
                self._launch(b, [it for it in f.items if not it.done], copy_of=f)

    def _fail_unservable(self) -> None:
        """Items no registered backend could ever serve fail now, with the reason."""
        if not self._queue:
            return
        live = [b for b in self._backends if b.enabled and b.status != BackendStatus.DISABLED]
        for it in list(self._queue):
            if it.done:
                continue
            reasons = [(b.name, b.why_not(it.template)) for b in live
                       if b.info is not None and b.status == BackendStatus.RUNNING]
            if not self._backends:
                continue  # waiting for the user to add one
            if live and reasons and len(reasons) == len(live) and all(r for _, r in reasons):
                # every backend answered and every one refuses for a hard reason
                hard = all("status" not in r and "failed this image" not in r
                           for _, r in reasons if r)
                if hard:
                    why = "; ".join(f"{n}: {r}" for n, r in reasons)
                    err = ModelNotAvailable if "model" in why else InvalidRequest
                    self._fail_item(it, err(f"No backend can run this job ({why})."))

    def _launch(self, b: Backend, items: list[Item], copy_of: Flight | None = None) -> None:
        rate = rates([x for x in self._backends if x.usable] + [b])
        estimate = batch_seconds(b, len(items), items[0].units, rate)
        f = Flight(b, items, time.monotonic(), estimate, copy_of=copy_of)
        for it in items:
            it.flights += 1
        b.running += 1
        self._flights.append(f)
        f.task = asyncio.ensure_future(self._fly(f))
        self._emit(type="progress")

    async def _fly(self, f: Flight) -> None:
        b, items = f.backend, f.items
        template = items[0].template
        update: dict[str, Any] = {"seeds": [it.seed for it in items]}
        if items[0].crop is not None:
            update["crops"] = [it.crop for it in items]
        req = template.model_copy(update=update)
        pngs: list[bytes] | None = None
        if template.kind != "txt2img":
            first = items[0].init_png
            shared = all(it.init_png is first for it in items)
            pngs = [first] if shared and first is not None else [it.init_png or b"" for it in items]
        known = b.job_seconds(len(items), items[0].units)
        timeout = min(max(self.flight_timeout_min, 8 * known + 30 if known else 600.0), 1800.0)

        last: list[Any] = [None]

        def progress(status: Any) -> None:
            last[0] = status
            f.step, f.total_steps = status.step, status.total_steps
            self._emit(type="progress")

        outcome: str = "failed"
        error: BaseException | None = None
        try:
            images = await b.client.run(req, pngs, on_progress=progress, timeout=timeout)
            outcome = "ok"
        except asyncio.CancelledError:
            outcome = "cancelled"
        except WorkerMisbehaved as exc:
            error = exc
            self._quarantine(b, str(exc))
        except (BackendUnavailable, AuthError) as exc:
            error = exc
            self._mark_down(b, str(exc))
        except InvalidRequest as exc:
            error = exc
            b.refused[template.param_key()] = str(exc)
            self._log("warning", f"{b.name} refused a job: {exc}")
        except JobInterrupted as exc:
            error = exc
            outcome = "interrupted"
        except JobFailed as exc:
            error = exc
            if "out of memory" in str(exc).lower() and len(items) > 1:
                # the GPU is smaller than the batch: halve its batches and retry, no blame
                b.batch_cap = max(1, len(items) // 2)
                outcome = "cancelled"
                self._log("warning", f"{b.name} ran out of memory at {len(items)} images; "
                                     f"its batches are now at most {b.batch_cap}")
            else:
                self._log("warning", f"{b.name} failed a job: {exc}")
        except Exception as exc:  # a bug or an odd worker: requeue, never lose the images
            error = exc
            log.exception("flight on %s failed", b.name)
        finally:
            b.running -= 1
            if f in self._flights:
                self._flights.remove(f)
            for it in items:
                it.flights -= 1
        if self.trace is not None:
            self.trace.append((b.name, len(items), f.started, time.monotonic(), outcome,
                               f.copy_of is not None))
        if outcome == "ok":
            elapsed = time.monotonic() - f.started
            # the worker's own run time: wall time would count waiting behind our other slot
            st = last[0]
            ran = st.run_s if st is not None and st.run_s > 0 else elapsed
            waited = st.queued_s if st is not None else 0.0
            b.note_job(len(items), ran, elapsed - waited, items[0].units)
            b.images_done += len(items)
            per = elapsed / len(items)
            for it, img in zip(items, images, strict=True):
                self._deliver(it, img, b.name, per)
            self._cancel_losers(f)
        else:
            for it in items:
                if it.done or it.flights > 0:
                    continue
                if outcome == "interrupted" and self._runs.get(it.run_id) is None:
                    continue
                self._requeue(it, b, None if outcome == "cancelled" else error,
                              count=outcome != "cancelled")
        self._emit(type="progress")
        self._kick()

    def _cancel_losers(self, winner: Flight) -> None:
        for f in list(self._flights):
            if f is winner or f.task is None:
                continue
            if all(it.done for it in f.items):
                f.task.cancel(msg="a copy won")

    def _requeue(self, it: Item, b: Backend, error: BaseException | None, count: bool) -> None:
        if error is not None and not isinstance(error, InvalidRequest):
            it.failed_on.add(b.name)
        if count and error is not None and not isinstance(error, InvalidRequest):
            it.attempts += 1
        if it.attempts >= self.max_attempts:
            self._fail_item(it, JobFailed(
                f"Image with seed {it.seed} failed {it.attempts} times; last error: {error}. "
                "Check the backends panel and the logs."
            ))
            return
        self._queue.appendleft(it)
        why = error if error is not None else (b.reason or "its job was called off")
        self._log("info", f"seed {it.seed} goes back to the front of the queue ({b.name}: {why})")

    def _fail_item(self, it: Item, exc: BaseException) -> None:
        run = self._runs.get(it.run_id)
        if it in self._queue:
            self._queue.remove(it)
        it.done = True
        if run is not None and not run.future.done():
            self._finish_run(run, exc)

    def _deliver(self, it: Item, image: Image.Image, backend: str, seconds: float) -> None:
        if it.done:
            return
        it.done = True
        run = self._runs.get(it.run_id)
        if run is None:
            return
        g = GeneratedImage(image=image, seed=it.seed, backend=backend, index=it.index,
                           seconds=seconds, params=run.params)
        run.results[it.index] = g
        if run.save and self.output_dir is not None and run.kind == "generate":
            try:
                save_image(g, self.output_dir)
            except OSError as exc:
                self._log("warning", f"could not save image {it.seed}: {exc}")
        if run.stream is not None:
            run.stream.put_nowait(g)
        if run.on_image is not None:
            try:
                run.on_image(g)
            except Exception:
                log.exception("on_image callback failed")
        self._emit(type="image", run=run.id, image=g, done=len(run.results),
                   total=len(run.items))
        if len(run.results) == len(run.items):
            self._finish_run(run, None)

    def _finish_run(self, run: _Run, exc: BaseException | None) -> None:
        self._runs.pop(run.id, None)
        for it in run.items:
            if not it.done:
                it.done = True
                if it in self._queue:
                    self._queue.remove(it)
        for f in list(self._flights):
            if all(it.done for it in f.items) and f.task is not None:
                f.task.cancel(msg="run finished")
        if run.stream is not None:
            run.stream.put_nowait(None)
        if not run.future.done():
            if exc is not None:
                run.future.set_exception(exc)
            else:
                images = [run.results[i] for i in sorted(run.results)]
                run.future.set_result(GenerationResult(
                    images, run.params, time.monotonic() - run.started))
        self._emit(type="run", run=run.id, kind=run.kind, total=len(run.items),
                   done=len(run.results), finished=True, error=str(exc) if exc else None)

    # ----- generation ----------------------------------------------------------------------
    def _new_run(self, kind: str, template: JobRequest, seeds: list[int],
                 params: dict[str, Any], on_image: Any, save: bool,
                 init_pngs: list[bytes | None] | None = None,
                 crops: list[tuple[int, int, int, int]] | None = None) -> _Run:
        rid = next(self._run_ids)
        items = [Item(rid, i, s, template, (init_pngs[i] if init_pngs else None),
                      crops[i] if crops else None)
                 for i, s in enumerate(seeds)]
        run = _Run(rid, kind, items, params, self._loop.create_future(), on_image, save)
        self._runs[rid] = run
        self._queue.extend(items)
        self._kick()
        self._emit(type="run", run=rid, kind=kind, total=len(items), done=0, finished=False,
                   error=None)
        return run

    @staticmethod
    def _template(prompt: str, negative_prompt: str, width: int, height: int, steps: int,
                  cfg: float, model: str | None, **extra: Any) -> JobRequest:
        try:
            return JobRequest(prompt=prompt, negative_prompt=negative_prompt, width=width,
                              height=height, steps=steps, cfg=cfg, model=model, seeds=[0],
                              **extra)
        except Exception as exc:  # pydantic's message, made one line
            msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                            for e in getattr(exc, "errors", lambda: [])()) or str(exc)
            raise InvalidRequest(f"Bad generation parameters: {msg}") from None

    def _prepare_generate(self, prompt: str, images: int, seed: int | None, kw: dict) -> tuple:
        if images < 1:
            raise InvalidRequest(f"images must be at least 1 (got {images}).")
        if images > 10000:
            raise InvalidRequest(f"images must be at most 10000 per request (got {images}).")
        if seed is None:
            seed = random.randrange(0, 2**32)
        if not 0 <= seed <= MAX_SEED - images:
            raise InvalidRequest(f"seed must be between 0 and {MAX_SEED - images}.")
        width, height = kw.get("width", 512), kw.get("height", 512)
        for side, v in (("width", width), ("height", height)):
            if v % 8:
                raise InvalidRequest(f"{side} must be a multiple of 8 (got {v}); try "
                                     f"{max(8, v // 8 * 8)} or {v // 8 * 8 + 8}.")
        template = self._template(prompt, kw.get("negative_prompt", ""), width, height,
                                  kw.get("steps", 20), kw.get("cfg", 7.0), kw.get("model"))
        params = template.model_dump(exclude={"seeds", "init_images", "upscaler", "scale",
                                              "strength"})
        params.update(images=images, seed=seed)
        return template, [seed + i for i in range(images)], params

    def generate(self, prompt: str, images: int = 1, seed: int | None = None, *,
                 negative_prompt: str = "", width: int = 512, height: int = 512,
                 steps: int = 20, cfg: float = 7.0, model: str | None = None,
                 on_image: Callable[[GeneratedImage], Any] | None = None,
                 save: bool = True) -> GenerationResult:
        """Make `images` images with seeds seed, seed+1, ...; blocks until all are back."""
        return self.submit_generate(prompt, images, seed, negative_prompt=negative_prompt,
                                    width=width, height=height, steps=steps, cfg=cfg,
                                    model=model, on_image=on_image, save=save).result()

    async def agenerate(self, prompt: str, images: int = 1, seed: int | None = None,
                        **kw: Any) -> GenerationResult:
        return await asyncio.wrap_future(self.submit_generate(prompt, images, seed, **kw))

    def submit_generate(self, prompt: str, images: int = 1, seed: int | None = None,
                        **kw: Any) -> concurrent.futures.Future:
        """Queue a generation and return at once; the future resolves to the result."""
        on_image, save = kw.pop("on_image", None), kw.pop("save", True)
        template, seeds, params = self._prepare_generate(prompt, images, seed, kw)

        async def start() -> asyncio.Future:
            return self._new_run("generate", template, seeds, params, on_image, save).future

        async def wait() -> GenerationResult:
            fut = await start()
            return await fut

        return asyncio.run_coroutine_threadsafe(wait(), self._loop)

    async def agenerate_iter(self, prompt: str, images: int = 1, seed: int | None = None,
                             **kw: Any) -> AsyncIterator[GeneratedImage]:
        """Yield images as they arrive (arrival order, not seed order); raises if the run
        fails, after yielding what did arrive."""
        caller = asyncio.get_running_loop()
        stream: asyncio.Queue[GeneratedImage] = asyncio.Queue()

        def forward(g: GeneratedImage) -> None:  # on the swarm's thread
            caller.call_soon_threadsafe(stream.put_nowait, g)

        done = asyncio.wrap_future(self.submit_generate(prompt, images, seed, on_image=forward,
                                                        **kw))
        received = 0
        while received < images:
            getter = asyncio.ensure_future(stream.get())
            await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            received += 1
            yield getter.result()
        while not stream.empty():
            yield stream.get_nowait()
        if done.done() and done.exception() is not None:
            raise done.exception()  # type: ignore[misc]

    async def _run_items(self, kind: str, template: JobRequest, seeds: list[int],
                         params: dict[str, Any], init_pngs: list[bytes | None],
                         on_image: Any,
                         crops: list[tuple[int, int, int, int]] | None = None,
                         ) -> GenerationResult:
        """Queue items for the tiled upscaler and wait; runs on the swarm's loop."""
        return await self._new_run(kind, template, seeds, params, on_image, False,
                                   init_pngs, crops).future

    # ----- tiled upscaling -----------------------------------------------------------------
    def upscale(self, image: Any, scale: int = 2, upscaler: str = "lanczos", tile: int = 512,
                overlap: int = 64, denoise: float = 0.3, **kw: Any) -> UpscaleResult:
        """Upscale, then refine tiles across the swarm and blend them; blocks until done."""
        return self.submit_upscale(image, scale, upscaler, tile, overlap, denoise,
                                   **kw).result()

    async def aupscale(self, image: Any, scale: int = 2, upscaler: str = "lanczos",
                       tile: int = 512, overlap: int = 64, denoise: float = 0.3,
                       **kw: Any) -> UpscaleResult:
        return await asyncio.wrap_future(
            self.submit_upscale(image, scale, upscaler, tile, overlap, denoise, **kw))

    def submit_upscale(self, image: Any, scale: int = 2, upscaler: str = "lanczos",
                       tile: int = 512, overlap: int = 64, denoise: float = 0.3,
                       **kw: Any) -> concurrent.futures.Future:
        """Start an upscale and return at once; kw: prompt, negative_prompt, seed, steps, cfg,
        model, padding, on_tile(done, total), save."""
        check_upscale_params(scale, denoise, kw.get("steps", 20))
        return asyncio.run_coroutine_threadsafe(
            run_upscale(self, image, scale=scale, upscaler=upscaler, tile=tile,
                        overlap=overlap, denoise=denoise, **kw), self._loop)

    # ----- control and status --------------------------------------------------------------
    def interrupt(self) -> int:
        """Stop everything: queued images are dropped, running jobs interrupted."""
        return self._call(self._interrupt())

    async def ainterrupt(self) -> int:
        return await self._acall(self._interrupt())

    async def _interrupt(self) -> int:
        runs = list(self._runs.values())
        for run in runs:
            self._finish_run(run, JobInterrupted(
                f"Interrupted with {len(run.results)} of {len(run.items)} images done."))
        n = len(self._flights)
        for f in list(self._flights):
            if f.task is not None:
                f.task.cancel(msg="interrupted")
        self._queue.clear()
        self._log("info", f"interrupted {len(runs)} request(s), {n} running job(s)")
        return len(runs)

    def status(self) -> SwarmStatus:
        return self._read(self._status_now)

    def _status_now(self) -> SwarmStatus:
        now = time.monotonic()
        running = len({id(it) for f in self._flights for it in f.items if not it.done})
        queued = sum(1 for it in self._queue if not it.done)
        eta = estimate_eta(list(self._queue), self._backends, self._flights, now)
        return SwarmStatus(running + queued, running, queued, eta,
                           [b.snapshot() for b in self._backends])

    def status_line(self) -> str:
        """'10 current generations, 4 running, 6 queued (est. 3m 50s)'"""
        return self.status().line

    def _union(self, field: str, first: tuple[str, ...] = ()) -> list[str]:
        seen = dict.fromkeys(first)
        for b in self.backends:
            seen.update(dict.fromkeys(b[field]))
        return list(seen)

    def models(self) -> list[str]:
        """Every model some backend offers (for the model dropdown)."""
        return self._union("models")

    def close(self) -> None:
        """Stop the loops and close connections; running jobs are interrupted."""
        if self._closed:
            return
        try:
            self._call(self._close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self._loop.close()

    async def _close(self) -> None:
        await self._interrupt()
        self._closed = True
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        for b in self._backends:
            await b.client.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    def upscalers(self) -> list[str]:
        """Every upscaler some backend offers, Lanczos first (for the upscaler dropdown)."""
        return self._union("upscalers", ("lanczos",))

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Swarm({len(self._backends)} backends)"

