"""The Swarm: many workers as one. The I/O half of the controller, on its own event-loop thread.

What to do is decided by `state.SwarmState` (pure: events in, actions out). This module only
turns what happens on the wire (a flight's outcome, a health check's answer, a user's call) into
events with the time, and carries out the actions that come back: start or cancel a flight's
task, check a backend, hand an image to its run, finish a run, tell the views.

Every mutation happens on the swarm's loop; sync methods hand coroutines to it and wait, async
twins (``a...``, same explicit signatures) await it from any other loop, and ``submit_*``
return futures at once for widgets.
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
from ..backend.png import encode_png
from ..errors import (
    AuthError,
    BackendUnavailable,
    BadShareString,
    ColabSwarmError,
    ErrorKind,
    InvalidRequest,
    JobInterrupted,
    ModelNotAvailable,
    WorkerMisbehaved,
)
from ..prompts import split_prompt
from ..protocol import (
    MAX_SEED,
    Info,
    JobRequest,
    LoraRef,
    clean_text,
    decode_share,
    make_request,
)
from ..samplers import canonical_sampler
from .backends import Backend
from .grid import apply_axis, cell_count, compose_grid, parse_axis
from .outputs import GeneratedImage, save_image
from .remote import BackendRemote
from .state import (
    BackendAdded,
    BackendChanged,
    BackendMisbehaved,
    BackendRemoved,
    BackendSettings,
    CancelFlight,
    CancelRun,
    CheckHealth,
    Deliver,
    Event,
    FinishRun,
    FlightCancelled,
    FlightFailed,
    FlightProgress,
    FlightSucceeded,
    HealthChecked,
    HealthFailed,
    InterruptAll,
    Log,
    NewRun,
    Progress,
    StartFlight,
    SwarmConfig,
    SwarmState,
    Tick,
)
from .upscale import UpscaleResult, as_image, check_upscale_params, run_upscale

__all__ = ["GenerationResult", "GridResult", "Swarm", "SwarmStatus", "format_duration"]

log = logging.getLogger("colabswarm.swarm")
T = TypeVar("T")
Listener = Callable[[dict[str, Any]], None]
_TICK_S = 0.1


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
    running: int  # sent to workers (generating, or waiting there for their turn)
    queued: int  # waiting here for a free worker
    eta_s: float | None
    backends: list[dict[str, Any]]
    loading: int = 0  # of `running`: images whose worker is loading their model first
    generating: int = 0  # of `running`: images whose denoising has begun

    @property
    def waiting(self) -> int:
        """Sent to a worker but not begun: behind its other job, or its model loading."""
        return max(self.running - self.generating, 0)

    @property
    def line(self) -> str:
        if self.current == 0:
            est = ""
        elif self.eta_s is not None and self.eta_s < 1.0:
            est = " (finishing…)"
        else:
            est = f" (est. {format_duration(self.eta_s)})"
        wait = f", {self.loading} waiting on a model load" if self.loading else ""
        return (f"{self.current} current generations, {self.running} running, "
                f"{self.queued} queued{wait}{est}")


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
    """The I/O side of a run: who waits for it and where its images go."""

    id: int
    kind: str
    total: int
    params: dict[str, Any]
    future: asyncio.Future
    on_image: Callable[[GeneratedImage], Any] | None
    save: bool
    started: float = field(default_factory=time.monotonic)
    results: dict[int, GeneratedImage] = field(default_factory=dict)
    item_params: list[dict[str, Any]] | None = None  # each image's own (prompt lists, grids)


class _WatchedImage(GeneratedImage):
    """A GeneratedImage that tells the swarm if its pixels turn out broken when decoded."""

    __slots__ = ("on_broken",)

    @property
    def image(self) -> Image.Image:
        try:
            return GeneratedImage.image.fget(self)  # type: ignore[attr-defined]
        except WorkerMisbehaved as exc:
            hook = getattr(self, "on_broken", None)
            if hook is not None:
                hook(self.backend, str(exc))
            raise

    @image.setter
    def image(self, value: Image.Image) -> None:
        GeneratedImage.image.fset(self, value)  # type: ignore[attr-defined]


@dataclass
class _Generation:
    """A checked request, before the LoRA hashes are chosen on the swarm's loop."""

    kind: str
    split: list[tuple[str, dict[str, float]]]  # per prompt: the text, its LoRA weights
    seeds: list[list[int]]  # per prompt
    base: dict[str, Any]  # the other JobRequest fields
    init_png: bytes | None
    images: int
    seed: int


@dataclass
class GridResult:
    """An X/Y grid: the labelled image, and the cells row by row (each a GeneratedImage)."""

    image: Image.Image
    cells: list[list[GeneratedImage]]
    x: Any
    y: Any
    seconds: float
    path: Path | None = None

    def _repr_png_(self) -> bytes:
        return encode_png(self.image.convert("RGB"))


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
        model_switching: str = "cost",
    ) -> None:
        if model_switching not in ("cost", "never", "always"):
            raise InvalidRequest(f"model_switching must be 'cost', 'never' or 'always' (got "
                                 f"{model_switching!r}).")
        self.output_dir = Path(output_dir) if output_dir else None
        self.logs: deque[tuple[float, str, str]] = deque(maxlen=log_lines)
        self._state = SwarmState(SwarmConfig(
            max_batch=max_batch, batching=batching, copies=copies,
            straggler_guard=straggler_guard, max_attempts=max_attempts,
            health_every=health_every, flight_timeout_min=flight_timeout_min,
            switching=model_switching))
        if trace:
            self._state.trace = []
        self._clients: dict[str, WorkerClient] = {}
        self._flight_tasks: dict[int, asyncio.Task] = {}
        self._checks: set[asyncio.Task] = set()
        self._runs: dict[int, _Run] = {}
        self._run_ids = itertools.count(1)
        self._listeners: list[Listener] = []
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="colabswarm-swarm",
                                        daemon=True)
        self._thread.start()
        self._ticker = asyncio.run_coroutine_threadsafe(self._tick_loop(), self._loop)

    @property
    def trace(self) -> list[tuple[str, int, float, float, str, bool]] | None:
        """(backend, images, started, ended, outcome, copy) per finished job, if traced."""
        return self._state.trace

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

    def _read(self, fn: Callable[[], T]) -> T:
        """A consistent read of swarm state: on the loop's thread, from wherever it is asked."""
        if self._in_loop():
            return fn()

        async def on_loop() -> T:
            return fn()

        return self._call(on_loop())

    async def _aread(self, fn: Callable[[], T]) -> T:
        async def on_loop() -> T:
            return fn()

        return await self._acall(on_loop())

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

    def note(self, level: str, message: str) -> None:
        """Write a line into the swarm's log (the Logs panel shows it); on the swarm's loop."""
        self._log(level, clean_text(message, 1000))

    # ----- the state machine's I/O ---------------------------------------------------------
    def _feed(self, event: Event) -> None:
        """Hand one event to the state and carry out what it says. Runs on the swarm's loop."""
        if self._closed and not isinstance(event, (FlightCancelled, InterruptAll)):
            return
        try:
            actions = self._state.handle(event)
        except ColabSwarmError:
            raise  # a user's bad setting: the caller hears it
        except Exception:  # a bug: the swarm keeps going, and says so
            log.exception("swarm state failed on %s", type(event).__name__)
            self._log("warning", f"internal error on {type(event).__name__}; see the Python "
                                 "log (please report it)")
            return
        for action in actions:
            try:
                self._execute(action)
            except Exception:
                log.exception("action %s failed", type(action).__name__)

    def _execute(self, action: Any) -> None:
        match action:
            case StartFlight(flight=f):
                self._flight_tasks[f.id] = asyncio.ensure_future(self._fly(f))
            case CancelFlight(flight_id=fid, why=why):
                task = self._flight_tasks.get(fid)
                if task is not None and not task.done():
                    task.cancel(msg=why)
            case CheckHealth(name=name):
                task = asyncio.ensure_future(self._check(name))
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)
            case Deliver():
                self._deliver(action)
            case FinishRun(run_id=rid, error=error):
                self._finish_run(rid, error)
            case BackendChanged(name=name):
                snap = None
                if name is not None:
                    try:
                        snap = self._snapshot(self._state.backend(name))
                    except KeyError:
                        snap = None
                self._emit(type="backend", backend=snap)
            case Progress():
                self._emit(type="progress")
            case Log(level=level, message=message):
                self._log(level, message)

    async def _tick_loop(self) -> None:
        while not self._closed:
            self._feed(Tick(time.monotonic()))
            await asyncio.sleep(_TICK_S)

    async def _fly(self, f: Any) -> None:
        client = self._clients.get(f.backend.name)
        event: Event
        try:
            if client is None:
                raise asyncio.CancelledError
            req, pngs = f.request()

            def progress(status: Any) -> None:
                self._feed(FlightProgress(f.id, status.step, status.total_steps))

            run = self._runs.get(f.items[0].run_id)
            # pixels are decoded where they are needed at once (tiles to blend); a generated
            # image is decoded when someone looks at it, and saved as the worker sent it
            lazy = run is not None and run.kind in ("generate", "grid")
            result = await client.run_job(req, pngs, on_progress=progress, timeout=f.timeout,
                                          decode=not lazy)
        except asyncio.CancelledError:
            event = FlightCancelled(f.id, time.monotonic())
        except ColabSwarmError as exc:
            event = FlightFailed(f.id, exc.kind, str(exc), time.monotonic(),
                                 getattr(exc, "retry_after_s", None))
        except Exception as exc:  # a bug or an odd worker: requeue, never lose the images
            log.exception("flight on %s failed", f.backend.name)
            event = FlightFailed(f.id, ErrorKind.CRASH, f"unexpected {type(exc).__name__}",
                                 time.monotonic())
        else:
            event = FlightSucceeded(f.id, tuple(result.images), result.status.run_s,
                                    result.status.queued_s, time.monotonic())
        finally:
            self._flight_tasks.pop(f.id, None)
        self._feed(event)

    async def _check(self, name: str) -> None:
        client = self._clients.get(name)
        if client is None:
            return
        event: Event
        try:
            info = await asyncio.wait_for(client.info(), 10.0)
        except TimeoutError:
            event = HealthFailed(name, ErrorKind.UNREACHABLE, "no answer within 10s",
                                 time.monotonic())
        except ColabSwarmError as exc:
            event = HealthFailed(name, exc.kind, str(exc), time.monotonic())
        except Exception as exc:
            log.exception("health check of %s failed", name)
            event = HealthFailed(name, ErrorKind.CRASH, f"unexpected {type(exc).__name__}",
                                 time.monotonic())
        else:
            event = HealthChecked(name, info, time.monotonic())
        self._feed(event)

    def _deliver(self, d: Deliver) -> None:
        run = self._runs.get(d.run_id)
        if run is None:
            return
        params = run.item_params[d.index] if run.item_params else run.params
        if params.get("model") is None and "model" in params:  # say which model made it
            params = {**params, "model": self._default_model(d.backend)}
        raw = isinstance(d.result, bytes | bytearray)
        g = _WatchedImage(None if raw else d.result, d.seed, d.backend, d.index, d.seconds,
                          params, png=bytes(d.result) if raw else None)
        g.on_broken = self._broken_image
        run.results[d.index] = g
        if run.save and self.output_dir is not None and run.kind in ("generate", "grid"):
            try:
                save_image(g, self.output_dir)
            except OSError as exc:
                self._log("warning", f"could not save image {d.seed}: {exc.strerror or exc}")
        if run.on_image is not None:
            try:
                run.on_image(g)
            except Exception:
                log.exception("on_image callback failed")
        self._emit(type="image", run=run.id, image=g, done=len(run.results), total=run.total)

    def _broken_image(self, backend: str, message: str) -> None:
        """A delivered image whose pixels do not decode: its worker lied; quarantine it."""
        def feed() -> None:
            self._feed(BackendMisbehaved(backend, message, time.monotonic()))

        if self._in_loop():
            feed()
        elif not self._closed:
            self._loop.call_soon_threadsafe(feed)

    def _default_model(self, backend: str) -> str | None:
        try:
            info = self._state.backend(backend).info
        except KeyError:
            return None
        return (info.model_loaded or (info.models[0] if info.models else None)) if info else None

    def _finish_run(self, rid: int, error: ColabSwarmError | None) -> None:
        run = self._runs.pop(rid, None)
        if run is None:
            return
        images = [run.results[i] for i in sorted(run.results)]
        result = GenerationResult(images, run.params, time.monotonic() - run.started)
        if not run.future.done():
            if error is not None:
                error.partial = result  # type: ignore[attr-defined]  # what was made is kept
                run.future.set_exception(error)
            else:
                run.future.set_result(result)
        self._emit(type="run", run=run.id, kind=run.kind, total=run.total,
                   done=len(run.results), finished=True, error=str(error) if error else None)

    # ----- backends ------------------------------------------------------------------------
    @property
    def backends(self) -> list[dict[str, Any]]:
        """Snapshots of the backends, in order (no tokens)."""
        return self._read(self._snapshots)

    async def abackends(self) -> list[dict[str, Any]]:
        return await self._aread(self._snapshots)

    def _snapshots(self) -> list[dict[str, Any]]:
        return [self._snapshot(b) for b in self._state.backends]

    def _snapshot(self, b: Backend) -> dict[str, Any]:
        return {**b.snapshot(), "activity": self._state.activity(b)}

    def flights(self) -> list[dict[str, Any]]:
        """The jobs running now: backend, seeds, how many images of which run ({run id:
        count}), step of total_steps (step progress for views), whether a copy, and the model
        the worker loads first, if any."""
        return self._read(self._flight_snapshots)

    def _flight_snapshots(self) -> list[dict[str, Any]]:
        out = []
        for f in self._state.flights.values():
            runs: dict[int, int] = {}
            for it in f.items:
                runs[it.run_id] = runs.get(it.run_id, 0) + 1
            out.append({"backend": f.backend.name, "seeds": [it.seed for it in f.items],
                        "runs": runs, "step": f.step, "total_steps": f.total_steps,
                        "copy": f.copy_of is not None, "started": f.started,
                        "loads_model": f.loads_model})
        return out

    def backend(self, name: str) -> BackendRemote:
        """Remote management of one backend (its logs, free, interrupt, guests): the owner's
        routes, so they work with the worker's admin token; a guest token gets Forbidden."""
        def find() -> tuple[str, WorkerClient]:
            b = self._state.backend(name)  # KeyError: no such backend
            return b.name, self._clients[b.name]

        found, client = self._read(find)
        return BackendRemote(found, client, self._call, self._acall)

    def worker_infos(self) -> list[Info]:
        """The last /v1/info of every enabled backend that answered (for upscale planning)."""
        return [b.info for b in self._state.backends if b.enabled and b.info is not None]

    def add(self, share_or_url: str, token: str | None = None, name: str | None = None,
            allow_idle: bool = False, slots: int = 2) -> dict[str, Any]:
        """Register a worker by its share string; contacts it once before returning."""
        return self._call(self._add(share_or_url, token, name, allow_idle, slots))

    async def aadd(self, share_or_url: str, token: str | None = None, name: str | None = None,
                   allow_idle: bool = False, slots: int = 2) -> dict[str, Any]:
        return await self._acall(self._add(share_or_url, token, name, allow_idle, slots))

    def add_many(self, text: str, allow_idle: bool = False, slots: int = 2) -> list[Any]:
        """Register every share string in a pasted block; returns a snapshot or an error each."""
        return self._call(self._add_many(text, allow_idle, slots))

    async def aadd_many(self, text: str, allow_idle: bool = False, slots: int = 2
                        ) -> list[Any]:
        return await self._acall(self._add_many(text, allow_idle, slots))

    async def _add_many(self, text: str, allow_idle: bool, slots: int) -> list[Any]:
        out: list[Any] = []
        for line in [ln.strip() for ln in text.replace(",", "\n").splitlines() if ln.strip()]:
            try:
                out.append(await self._add(line, None, None, allow_idle, slots))
            except ColabSwarmError as exc:
                out.append(exc)
        return out

    async def _add(self, share: str, token: str | None, name: str | None, allow_idle: bool,
                   slots: int) -> dict[str, Any]:
        url, token = decode_share(share, token)
        if not isinstance(slots, int) or not 1 <= slots <= 64:
            raise BadShareString(f"slots must be between 1 and 64 (got {slots!r}).")
        if name is not None:
            name = clean_text(name, 64)
            if not name:
                raise BadShareString("A backend's name needs at least one visible character.")
        self._check_new(url, name)
        client = WorkerClient(url, token, name=name, timeout=30.0, connect_retries=1)
        info: Info | None = None
        error: str | None = None
        try:
            try:
                info = await asyncio.wait_for(client.info(), 15.0)
            except TimeoutError:
                raise BackendUnavailable(f"{url} did not answer within 15s.") from None
        except (BackendUnavailable, AuthError) as exc:
            if isinstance(exc, (AuthError, WorkerMisbehaved)) or not allow_idle:
                await client.aclose()
                raise
            error = str(exc)
        try:
            self._check_new(url, name)  # another add may have won while this one waited
        except BadShareString:
            await client.aclose()
            raise
        final = name or self._state.unique_name(
            clean_text(info.name, 64) or url if info is not None else url)
        client.name = final
        backend = Backend(name=final, url=url, allow_idle=allow_idle, slots=slots)
        self._clients[final] = client
        self._feed(BackendAdded(backend, time.monotonic(), info, error))
        return self._snapshot(backend)

    def _check_new(self, url: str, name: str | None) -> None:
        if any(b.url == url for b in self._state.backends):
            raise BadShareString(f"{url} is already registered.")
        if name and any(b.name == name for b in self._state.backends):
            raise BadShareString(f"A backend named {name!r} already exists; pick another name.")

    def remove(self, name: str) -> None:
        self._call(self._remove(name))

    async def aremove(self, name: str) -> None:
        await self._acall(self._remove(name))

    async def _remove(self, name: str) -> None:
        b = self._state.backend(name)
        self._feed(BackendRemoved(b.name, time.monotonic()))
        client = self._clients.pop(b.name, None)
        if client is not None:
            await asyncio.sleep(0)  # let the flights' tasks see their cancellation first
            await client.aclose()

    def move(self, name: str, index: int) -> None:
        """Reorder: index 0 is tried first."""
        self.set(name, index=index)

    async def amove(self, name: str, index: int) -> None:
        await self.aset(name, index=index)

    def set(self, name: str, *, enabled: bool | None = None, allow_idle: bool | None = None,
            slots: int | None = None, index: int | None = None) -> None:
        self._call(self._set(name, enabled, allow_idle, slots, index))

    async def aset(self, name: str, *, enabled: bool | None = None,
                   allow_idle: bool | None = None, slots: int | None = None,
                   index: int | None = None) -> None:
        await self._acall(self._set(name, enabled, allow_idle, slots, index))

    async def _set(self, name: str, enabled: bool | None, allow_idle: bool | None,
                   slots: int | None, index: int | None) -> None:
        if slots is not None and (not isinstance(slots, int) or not 1 <= slots <= 64):
            raise InvalidRequest(f"slots must be between 1 and 64 (got {slots!r}).")
        b = self._state.backend(name)
        self._feed(BackendSettings(b.name, time.monotonic(), enabled, allow_idle, slots, index))

    def enable(self, name: str) -> None:
        self.set(name, enabled=True)

    async def aenable(self, name: str) -> None:
        await self.aset(name, enabled=True)

    def disable(self, name: str) -> None:
        self.set(name, enabled=False)

    async def adisable(self, name: str) -> None:
        await self.aset(name, enabled=False)

    def check_now(self) -> None:
        """Ask every backend for its state at once (the panel's refresh)."""
        self._call(self._check_all())

    async def acheck_now(self) -> None:
        await self._acall(self._check_all())

    async def _check_all(self) -> None:
        await asyncio.gather(*(self._check(b.name) for b in self._state.backends if b.enabled))

    # ----- runs ----------------------------------------------------------------------------
    def _start_run(self, kind: str, template: JobRequest, seeds: list[int],
                   params: dict[str, Any], on_image: Any, save: bool,
                   init_pngs: list[bytes | None] | None = None,
                   crops: list[tuple[int, int, int, int]] | None = None, *,
                   templates: list[JobRequest] | None = None,
                   item_params: list[dict[str, Any]] | None = None,
                   ) -> tuple[int, asyncio.Future]:
        """Queue a run's items (all of `template`, or one template each); on the swarm's
        loop. Returns its id and a future of its result."""
        if self._closed:
            raise ColabSwarmError("This swarm is closed; make a new Swarm().")
        rid = next(self._run_ids)
        run = _Run(rid, kind, len(seeds), params, self._loop.create_future(), on_image, save,
                   item_params=item_params)
        self._runs[rid] = run
        self._emit(type="run", run=rid, kind=kind, total=len(seeds), done=0, finished=False,
                   error=None)
        if init_pngs is not None and len(init_pngs) == 1 and len(seeds) > 1:
            init_pngs = init_pngs * len(seeds)  # one image shared by every seed
        self._feed(NewRun(rid, kind, template, tuple(seeds), time.monotonic(),
                          tuple(init_pngs) if init_pngs else None,
                          tuple(crops) if crops else None,
                          tuple(templates) if templates else None))
        return rid, run.future

    async def arun_items(self, kind: str, template: JobRequest, seeds: list[int],
                         params: dict[str, Any], *,
                         init_pngs: list[bytes | None] | None = None,
                         crops: list[tuple[int, int, int, int]] | None = None,
                         on_image: Callable[[GeneratedImage], Any] | None = None,
                         ) -> GenerationResult:
        """Run one image per seed of `template` across the swarm and wait (no saving): the
        interface the tiled upscaler uses. Results come in seed order."""
        async def start() -> GenerationResult:
            rid, future = self._start_run(kind, template, seeds, params, on_image, False,
                                          init_pngs, crops)
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:  # the caller gave up: its items leave the queue
                self.cancel_run(rid, JobInterrupted("called off by its caller"))
                raise

        return await self._acall(start())

    def _generation(self, prompt: str | None, prompts: list[str] | None, images: int,
                    seed: int | None, negative_prompt: str, width: int, height: int,
                    steps: int, cfg: float, model: str | None, sampler: str | None,
                    loras: dict[str, float] | None, clip_skip: int, init_image: Any,
                    strength: float) -> _Generation:
        """Check a request and turn it into what a run is made of (LoRA hashes are chosen on
        the swarm's loop, from the backends' infos)."""
        if prompts is not None:
            if prompt is not None:
                raise InvalidRequest("Give prompt or prompts, not both.")
            if isinstance(prompts, str) or not prompts:
                raise InvalidRequest("prompts is a non-empty list of prompts (one image set "
                                     "each); for one prompt, use prompt=.")
            texts = list(prompts)
        elif prompt is None:
            raise InvalidRequest("generate needs a prompt (or prompts=[...]).")
        else:
            texts = [prompt]
        if not all(isinstance(t, str) for t in texts):
            raise InvalidRequest("Prompts are text.")
        if not isinstance(images, int) or images < 1:
            raise InvalidRequest(f"images must be a whole number, at least 1 (got {images!r}).")
        total = images * len(texts)
        if total > 10000:
            raise InvalidRequest(f"At most 10000 images per request (got {total}).")
        if seed is None or seed == -1:
            seed = random.randrange(0, 2**32)
        if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - total:
            raise InvalidRequest(f"seed must be between 0 and {MAX_SEED - total}.")
        for side, v in (("width", width), ("height", height)):
            if isinstance(v, int) and v % 8:
                raise InvalidRequest(f"{side} must be a multiple of 8 (got {v}); try "
                                     f"{max(8, v // 8 * 8)} or {v // 8 * 8 + 8}.")
        if sampler is not None:
            sampler = canonical_sampler(sampler)
        kind, init_png = "txt2img", None
        if init_image is not None:
            kind = "img2img"
            source = as_image(init_image)
            if source.size != (width, height):
                source = source.resize((width, height), Image.Resampling.LANCZOS)
            init_png = encode_png(source)
        split = [split_prompt(t, loras) for t in texts]
        base = dict(kind=kind, negative_prompt=negative_prompt, width=width, height=height,
                    steps=steps, cfg=cfg, model=model, sampler=sampler, clip_skip=clip_skip,
                    **({"strength": strength} if kind == "img2img" else {}))
        make_request(prompt=split[0][0], seeds=[0], **base)  # every field checked, now
        return _Generation(kind, split, [[seed + k * images + i for i in range(images)]
                                         for k in range(len(texts))],
                           base, init_png, images, seed)

    def _templates(self, gen: _Generation) -> tuple[list[JobRequest], list[dict[str, Any]]]:
        """One template and one PNG-parameters dict per image; on the swarm's loop (LoRA hashes
        come from the backends' infos)."""
        templates: list[JobRequest] = []
        params: list[dict[str, Any]] = []
        for (text, weights), seeds in zip(gen.split, gen.seeds, strict=True):
            refs = [LoraRef(name=n, weight=w, hash=self._lora_hash(n))
                    for n, w in weights.items()]
            tpl = make_request(prompt=text, seeds=[0], loras=refs, **gen.base)
            p = tpl.model_dump(exclude={"seeds", "init_images", "upscaler", "scale", "crops",
                                        "prompts"}
                               | ({"strength"} if gen.kind == "txt2img" else set()))
            p.update(images=gen.images, seed=seeds[0],
                     loras=[r.model_dump() for r in refs])
            templates += [tpl] * len(seeds)
            params += [p] * len(seeds)
        return templates, params

    def _lora_hash(self, name: str) -> str:
        """The hash a job asks for: the file most backends that offer `name` have."""
        counts: dict[str, int] = {}
        for b in self._state.backends:
            for lo in (b.info.loras if b.info is not None else ()):
                if lo.name == name:
                    counts[lo.hash] = counts.get(lo.hash, 0) + 1
        if not counts:
            offered = sorted({lo.name for b in self._state.backends if b.info is not None
                              for lo in b.info.loras})
            raise ModelNotAvailable(
                f"No backend offers LoRA {name!r}"
                + (f"; they offer {offered[:20]}." if offered else "; none offers any LoRA.")
                + " A worker's owner adds LoRAs with --lora/--loras-dir.")
        return max(counts, key=lambda h: counts[h])

    def _start_generation(self, gen: _Generation, on_image: Any, save: bool
                          ) -> asyncio.Future:
        templates, params = self._templates(gen)
        seeds = [s for group in gen.seeds for s in group]
        run_params = dict(params[0])
        if len(gen.split) > 1:
            run_params["prompts"] = [text for text, _ in gen.split]
        return self._start_run("generate", templates[0], seeds, run_params, on_image, save,
                               [gen.init_png] if gen.init_png else None,
                               templates=templates, item_params=params)[1]

    def generate(self, prompt: str | None = None, images: int = 1, seed: int | None = None,
                 *, prompts: list[str] | None = None, negative_prompt: str = "",
                 width: int = 512, height: int = 512, steps: int = 20, cfg: float = 7.0,
                 model: str | None = None, sampler: str | None = None,
                 loras: dict[str, float] | None = None, clip_skip: int = 1,
                 init_image: Any = None, strength: float = 0.75,
                 on_image: Callable[[GeneratedImage], Any] | None = None,
                 save: bool = True) -> GenerationResult:
        """Make `images` images with seeds seed, seed+1, ...; blocks until all are back.

        prompts=[...]: `images` images of each prompt (seeds continue from one prompt to the
        next). sampler: an A1111 name ("DPM++ 2M Karras"); loras: {name: weight}, also
        written in the prompt as <lora:name:weight>; clip_skip as A1111 counts it;
        init_image (a PIL image, a GeneratedImage or a path) with strength: img2img."""
        return self.submit_generate(
            prompt, images, seed, prompts=prompts, negative_prompt=negative_prompt,
            width=width, height=height, steps=steps, cfg=cfg, model=model, sampler=sampler,
            loras=loras, clip_skip=clip_skip, init_image=init_image, strength=strength,
            on_image=on_image, save=save).result()

    async def agenerate(self, prompt: str | None = None, images: int = 1,
                        seed: int | None = None, *, prompts: list[str] | None = None,
                        negative_prompt: str = "", width: int = 512, height: int = 512,
                        steps: int = 20, cfg: float = 7.0, model: str | None = None,
                        sampler: str | None = None, loras: dict[str, float] | None = None,
                        clip_skip: int = 1, init_image: Any = None, strength: float = 0.75,
                        on_image: Callable[[GeneratedImage], Any] | None = None,
                        save: bool = True) -> GenerationResult:
        return await asyncio.wrap_future(self.submit_generate(
            prompt, images, seed, prompts=prompts, negative_prompt=negative_prompt,
            width=width, height=height, steps=steps, cfg=cfg, model=model, sampler=sampler,
            loras=loras, clip_skip=clip_skip, init_image=init_image, strength=strength,
            on_image=on_image, save=save))

    def submit_generate(self, prompt: str | None = None, images: int = 1,
                        seed: int | None = None, *, prompts: list[str] | None = None,
                        negative_prompt: str = "", width: int = 512, height: int = 512,
                        steps: int = 20, cfg: float = 7.0, model: str | None = None,
                        sampler: str | None = None, loras: dict[str, float] | None = None,
                        clip_skip: int = 1, init_image: Any = None, strength: float = 0.75,
                        on_image: Callable[[GeneratedImage], Any] | None = None,
                        save: bool = True) -> concurrent.futures.Future:
        """Queue a generation and return at once; the future resolves to the result."""
        gen = self._generation(prompt, prompts, images, seed, negative_prompt, width, height,
                               steps, cfg, model, sampler, loras, clip_skip, init_image,
                               strength)

        async def wait() -> GenerationResult:
            return await self._start_generation(gen, on_image, save)

        return asyncio.run_coroutine_threadsafe(wait(), self._loop)

    async def agenerate_iter(self, prompt: str | None = None, images: int = 1,
                             seed: int | None = None, *, prompts: list[str] | None = None,
                             negative_prompt: str = "", width: int = 512, height: int = 512,
                             steps: int = 20, cfg: float = 7.0, model: str | None = None,
                             sampler: str | None = None,
                             loras: dict[str, float] | None = None, clip_skip: int = 1,
                             init_image: Any = None, strength: float = 0.75,
                             save: bool = True) -> AsyncIterator[GeneratedImage]:
        """Yield images as they arrive (arrival order, not seed order); raises if the run
        fails, after yielding what did arrive."""
        caller = asyncio.get_running_loop()
        stream: asyncio.Queue[GeneratedImage] = asyncio.Queue()

        def forward(g: GeneratedImage) -> None:  # on the swarm's thread
            caller.call_soon_threadsafe(stream.put_nowait, g)

        done = asyncio.wrap_future(self.submit_generate(
            prompt, images, seed, prompts=prompts, negative_prompt=negative_prompt,
            width=width, height=height, steps=steps, cfg=cfg, model=model, sampler=sampler,
            loras=loras, clip_skip=clip_skip, init_image=init_image, strength=strength,
            on_image=forward, save=save))
        expected = images * (len(prompts) if prompts else 1)
        received = 0
        while received < expected:
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

    # ----- X/Y grids -----------------------------------------------------------------------
    def grid(self, prompt: str, x: tuple[str, list[Any]] | None = None,
             y: tuple[str, list[Any]] | None = None, seed: int | None = None, *,
             negative_prompt: str = "", width: int = 512, height: int = 512, steps: int = 20,
             cfg: float = 7.0, model: str | None = None, sampler: str | None = None,
             loras: dict[str, float] | None = None, clip_skip: int = 1,
             on_image: Callable[[GeneratedImage], Any] | None = None,
             save: bool = True) -> GridResult:
        """An X/Y grid: one image per cell, the cells spread over the swarm like any images,
        back as one labelled image plus the cells (each saved with its own parameters).
        x, y: (what, values) with what one of grid.AXES, e.g. ("cfg", [5, 7, 9]),
        ("sampler", ["Euler", "DPM++ 2M Karras"]), ("prompt", ["fox", "cat", "owl"]) (search
        and replace), ("lora:detail", [0, 0.5, 1])."""
        return self.submit_grid(
            prompt, x, y, seed, negative_prompt=negative_prompt, width=width, height=height,
            steps=steps, cfg=cfg, model=model, sampler=sampler, loras=loras,
            clip_skip=clip_skip, on_image=on_image, save=save).result()

    async def agrid(self, prompt: str, x: tuple[str, list[Any]] | None = None,
                    y: tuple[str, list[Any]] | None = None, seed: int | None = None, *,
                    negative_prompt: str = "", width: int = 512, height: int = 512,
                    steps: int = 20, cfg: float = 7.0, model: str | None = None,
                    sampler: str | None = None, loras: dict[str, float] | None = None,
                    clip_skip: int = 1,
                    on_image: Callable[[GeneratedImage], Any] | None = None,
                    save: bool = True) -> GridResult:
        return await asyncio.wrap_future(self.submit_grid(
            prompt, x, y, seed, negative_prompt=negative_prompt, width=width, height=height,
            steps=steps, cfg=cfg, model=model, sampler=sampler, loras=loras,
            clip_skip=clip_skip, on_image=on_image, save=save))

    def submit_grid(self, prompt: str, x: tuple[str, list[Any]] | None = None,
                    y: tuple[str, list[Any]] | None = None, seed: int | None = None, *,
                    negative_prompt: str = "", width: int = 512, height: int = 512,
                    steps: int = 20, cfg: float = 7.0, model: str | None = None,
                    sampler: str | None = None, loras: dict[str, float] | None = None,
                    clip_skip: int = 1,
                    on_image: Callable[[GeneratedImage], Any] | None = None,
                    save: bool = True) -> concurrent.futures.Future:
        """Start a grid and return at once; the future resolves to a GridResult."""
        ax, ay = parse_axis(x, "x"), parse_axis(y, "y")
        if ax is None and ay is None:
            raise InvalidRequest("A grid needs an x or a y axis, e.g. x=('cfg', [5, 7, 9]).")
        cell_count(ax, ay)
        if seed is None or seed == -1:
            seed = random.randrange(0, 2**32)
        base = dict(prompt=prompt, seed=seed, negative_prompt=negative_prompt, cfg=cfg,
                    steps=steps, sampler=sampler, loras=loras, clip_skip=clip_skip,
                    model=model)
        gens: list[_Generation] = []
        for r in range(len(ay.values) if ay else 1):
            for c in range(len(ax.values) if ax else 1):
                kw = apply_axis(ay, r, apply_axis(ax, c, base))
                gens.append(self._generation(
                    kw["prompt"], None, 1, kw["seed"], kw["negative_prompt"], width, height,
                    kw["steps"], kw["cfg"], kw["model"], kw["sampler"], kw["loras"],
                    kw["clip_skip"], None, 0.75))

        async def run() -> GridResult:
            t0 = time.monotonic()
            templates, params = [], []
            for g in gens:
                tp, pp = self._templates(g)
                templates += tp
                params += pp
            seeds = [g.seeds[0][0] for g in gens]
            run_params = {**params[0], "grid": {"x": x, "y": y}}
            result = await self._start_run("grid", templates[0], seeds, run_params, on_image,
                                           save, templates=templates, item_params=params)[1]
            cols = len(ax.values) if ax else 1
            rows = [result.images[r * cols:(r + 1) * cols]
                    for r in range(len(result.images) // cols)]
            image = await asyncio.to_thread(compose_grid, [[g.image for g in row]
                                                           for row in rows], ax, ay)
            out = GridResult(image, rows, ax, ay, time.monotonic() - t0)
            if save and self.output_dir is not None:
                text = (f"X/Y grid: {ax.title + ' ' + str(list(ax.values)) if ax else ''}"
                        f"{'; ' if ax and ay else ''}"
                        f"{ay.title + ' ' + str(list(ay.values)) if ay else ''}")
                g = GeneratedImage(image, seed, ",".join(sorted({c.backend for c in
                                                                  result.images})),
                                   0, out.seconds, {**params[0], "grid": text})
                out.path = await asyncio.to_thread(save_image, g, self.output_dir, "grid")
            return out

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    # ----- tiled upscaling -----------------------------------------------------------------
    def upscale(self, image: Any, scale: int = 2, upscaler: str = "lanczos", tile: int = 512,
                overlap: int = 64, denoise: float = 0.3, *, padding: int = 32,
                prompt: str = "", negative_prompt: str = "", seed: int | None = None,
                steps: int = 20, cfg: float = 7.0, model: str | None = None,
                on_tile: Callable[[int, int], Any] | None = None,
                save: bool = True) -> UpscaleResult:
        """Upscale, then refine tiles across the swarm and blend them; blocks until done."""
        return self.submit_upscale(
            image, scale, upscaler, tile, overlap, denoise, padding=padding, prompt=prompt,
            negative_prompt=negative_prompt, seed=seed, steps=steps, cfg=cfg, model=model,
            on_tile=on_tile, save=save).result()

    async def aupscale(self, image: Any, scale: int = 2, upscaler: str = "lanczos",
                       tile: int = 512, overlap: int = 64, denoise: float = 0.3, *,
                       padding: int = 32, prompt: str = "", negative_prompt: str = "",
                       seed: int | None = None, steps: int = 20, cfg: float = 7.0,
                       model: str | None = None,
                       on_tile: Callable[[int, int], Any] | None = None,
                       save: bool = True) -> UpscaleResult:
        return await asyncio.wrap_future(self.submit_upscale(
            image, scale, upscaler, tile, overlap, denoise, padding=padding, prompt=prompt,
            negative_prompt=negative_prompt, seed=seed, steps=steps, cfg=cfg, model=model,
            on_tile=on_tile, save=save))

    def submit_upscale(self, image: Any, scale: int = 2, upscaler: str = "lanczos",
                       tile: int = 512, overlap: int = 64, denoise: float = 0.3, *,
                       padding: int = 32, prompt: str = "", negative_prompt: str = "",
                       seed: int | None = None, steps: int = 20, cfg: float = 7.0,
                       model: str | None = None,
                       on_tile: Callable[[int, int], Any] | None = None,
                       save: bool = True) -> concurrent.futures.Future:
        """Start an upscale and return at once; the future resolves to an UpscaleResult."""
        check_upscale_params(scale, denoise, steps)
        return asyncio.run_coroutine_threadsafe(
            run_upscale(self, image, scale=scale, upscaler=upscaler, tile=tile,
                        overlap=overlap, padding=padding, denoise=denoise, prompt=prompt,
                        negative_prompt=negative_prompt, seed=seed, steps=steps, cfg=cfg,
                        model=model, on_tile=on_tile, save=save), self._loop)

    # ----- control and status --------------------------------------------------------------
    def interrupt(self) -> int:
        """Stop everything: queued images are dropped, running jobs interrupted."""
        return self._call(self._interrupt())

    async def ainterrupt(self) -> int:
        return await self._acall(self._interrupt())

    async def _interrupt(self) -> int:
        n = len(self._runs)
        self._feed(InterruptAll(time.monotonic()))
        return n

    def cancel_run(self, run_id: int, error: ColabSwarmError) -> None:
        """Call one run off (on the swarm's loop); its future gets `error`."""
        self._feed(CancelRun(run_id, error, time.monotonic()))

    def status(self) -> SwarmStatus:
        return self._read(self._status_now)

    async def astatus(self) -> SwarmStatus:
        return await self._aread(self._status_now)

    def _status_now(self) -> SwarmStatus:
        running, queued, loading, generating = self._state.counts()
        return SwarmStatus(running + queued, running, queued,
                           self._state.eta(time.monotonic()), self._snapshots(), loading,
                           generating)

    def status_line(self) -> str:
        """'10 current generations, 4 running, 6 queued (est. 3m 50s)'"""
        return self.status().line

    async def astatus_line(self) -> str:
        return (await self.astatus()).line

    def _union(self, snaps: list[dict[str, Any]], key: str,
               first: tuple[str, ...] = ()) -> list[str]:
        seen = dict.fromkeys(first)
        for b in snaps:
            seen.update(dict.fromkeys(b[key]))
        return list(seen)

    def models(self) -> list[str]:
        """Every model some backend offers (for the model dropdown)."""
        return self._union(self.backends, "models")

    def samplers(self) -> list[str]:
        """Every sampler some backend runs, Euler first (for the sampler dropdown)."""
        return self._union(self.backends, "samplers", ("Euler",))

    async def asamplers(self) -> list[str]:
        return self._union(await self.abackends(), "samplers", ("Euler",))

    def loras(self) -> list[str]:
        """Every LoRA some backend offers, by name (for the LoRA picker)."""
        return self._union(self.backends, "loras")

    async def aloras(self) -> list[str]:
        return self._union(await self.abackends(), "loras")

    def retry(self, name: str) -> None:
        """Try to reach one backend now (the panel's 'Retry now')."""
        self._call(self._retry(name))

    async def aretry(self, name: str) -> None:
        await self._acall(self._retry(name))

    async def _retry(self, name: str) -> None:
        await self._check(self._state.backend(name).name)

    async def amodels(self) -> list[str]:
        return self._union(await self.abackends(), "models")

    def upscalers(self) -> list[str]:
        """Every upscaler some backend offers, Lanczos first (for the upscaler dropdown)."""
        return self._union(self.backends, "upscalers", ("lanczos",))

    async def aupscalers(self) -> list[str]:
        return self._union(await self.abackends(), "upscalers", ("lanczos",))

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

    async def aclose(self) -> None:
        """Close from another event loop (the loop thread stops once this returns)."""
        if self._closed:
            return
        await self._acall(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _close(self) -> None:
        self._feed(InterruptAll(time.monotonic()))
        self._closed = True
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        for client in self._clients.values():
            await client.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Swarm({len(self._state.backends)} backends)"
