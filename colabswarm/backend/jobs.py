"""The worker's job queue: one thread feeds the engine; HTTP handlers wait on versions.

Every job belongs to a token (the owner's or a guest's); when several tokens have work queued,
the engine serves them round-robin by images, by weight (``fairshare.FairQueue``), and a
job's queue position is the one that rule will give it.

Jobs are kept until the client acknowledges them (DELETE) or their time-to-live runs out, so a
client whose connection dropped mid-download can fetch again, and a long-running worker's memory
stays flat.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from ..errors import Busy, ColabSwarmError, ErrorKind, JobInterrupted
from ..protocol import JobRequest, JobStatus, Limits
from .fairshare import FairQueue
from .png import encode_png

__all__ = ["Job", "JobManager", "Launched", "Runner", "error_kind_of", "out_of_memory_types",
           "public_error", "retry_after_s"]

log = logging.getLogger("colabswarm.jobs")

# COLABSWARM_OVERLAP=off: the engine's thread waits for each job's images before the next job
# (bench/bench_compile.py compares the two on a GPU); on by default
_OVERLAP = os.environ.get("COLABSWARM_OVERLAP", "on").strip().lower() not in ("off", "0", "no")
# jobs launched whose images are not yet on the host: the engine's thread waits past this many
# (two keep the GPU fed; a slow PNG thread must not pile up pinned memory behind it)
_MAX_IN_FLIGHT = 3


class Launched(Protocol):
    """A job's images on their way (inflight.InFlight): ``wait()`` gives them."""

    def wait(self) -> list: ...


class Runner(Protocol):
    """What the job thread needs from an engine (the real one or the bench simulator)."""

    def launch(self, req: JobRequest, init_images: Any, on_step: Any, should_stop: Any, *,
               scope: str = "owner") -> Launched: ...  # scope: the job's token (Who.scope)


def out_of_memory_types() -> tuple[type[BaseException], ...]:
    """The exception types torch raises when a device runs out of memory: torch.OutOfMemoryError
    (raised for CUDA, and for other devices whose allocator raises c10's OutOfMemoryError) and
    its older name torch.cuda.OutOfMemoryError. torch is only looked up, never imported: if the
    engine never imported it, nothing it ran can have raised one. An MPS out-of-memory that
    torch raises as a plain RuntimeError is reported as a crash: no message text is read."""
    torch = sys.modules.get("torch")
    if torch is None:
        return ()
    found = {getattr(torch, "OutOfMemoryError", None),
             getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)}
    return tuple(t for t in found if isinstance(t, type) and issubclass(t, BaseException))


def error_kind_of(exc: BaseException) -> ErrorKind:
    """The kind a failed job reports, decided by the exception's type alone."""
    if isinstance(exc, ColabSwarmError):
        return exc.kind  # JobInterrupted: interrupted; ModelNotAvailable: model_not_available
    oom = out_of_memory_types()
    if oom and isinstance(exc, oom):
        return ErrorKind.OUT_OF_MEMORY
    return ErrorKind.CRASH


_ADDRESS = re.compile(r"<[^<>]{0,200}? at 0x[0-9A-Fa-f]+>|\b0x[0-9A-Fa-f]{6,}\b")
_PUBLIC_CHARS = 300


def public_error(exc: BaseException) -> str:
    """An exception as one line a token holder may read: its type and message, with object
    reprs and heap addresses taken out, control characters dropped, and the length bounded
    (the worker's own log keeps the whole traceback)."""
    text = str(exc) if isinstance(exc, ColabSwarmError) else f"{type(exc).__name__}: {exc}"
    text = _ADDRESS.sub("<object>", text)
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if len(text) > _PUBLIC_CHARS:
        text = text[: _PUBLIC_CHARS - 1] + "…"
    return text or type(exc).__name__


def retry_after_s(steps_left: int, mpix: float, images: int,
                  step_seconds_per_mpix: float | None, default: float = 5.0) -> float:
    """When a full queue will probably take a job again: once the running job is done, from
    its steps left and the engine's measured speed (the default when either is unknown),
    within 1 s .. 10 min."""
    if step_seconds_per_mpix is None or not math.isfinite(step_seconds_per_mpix) \
            or steps_left <= 0:
        return default
    estimate = steps_left * mpix * max(images, 1) * step_seconds_per_mpix
    return float(min(max(estimate, 1.0), 600.0)) if math.isfinite(estimate) else default


@dataclass
class Job:
    id: str
    req: JobRequest
    init_images: list[Image.Image]
    created: float = field(default_factory=time.monotonic)
    state: str = "queued"
    step: int = 0
    total_steps: int = 0
    error: str | None = None
    error_kind: ErrorKind | None = None
    started: float | None = None
    finished: float | None = None
    computed: float | None = None  # when the engine was done (PNG writing comes after)
    pngs: list[bytes] = field(default_factory=list)
    version: int = 0
    stop: bool = False
    event: asyncio.Event = field(default_factory=asyncio.Event)
    out_size: tuple[int, int] = (0, 0)
    owner: str = "owner"  # the token's name: "owner" or a guest's
    scope: str = "owner"  # the token's own key for the engine's caches (guests.Who.scope)
    ended: bool = False   # the end hook has run

    def __post_init__(self) -> None:
        if self.req.kind == "upscale" and self.init_images:
            first, scale = self.init_images[0], self.req.scale
            self.out_size = (first.width * scale, first.height * scale)
        else:
            self.out_size = (self.req.width, self.req.height)

    def status(self, position: int = 0) -> JobStatus:
        now = time.monotonic()
        started = self.started or now
        return JobStatus(
            id=self.id,
            state=self.state,  # type: ignore[arg-type]
            kind=self.req.kind,
            step=self.step,
            total_steps=self.total_steps,
            seeds=list(self.req.seeds),
            images_ready=len(self.pngs),
            queue_position=position,
            error=self.error,
            error_kind=self.error_kind,
            queued_s=round(started - self.created, 4),
            run_s=round((self.computed or now) - started, 4) if self.started else 0.0,
            version=self.version,
            width=self.out_size[0],
            height=self.out_size[1],
            sampler=self.req.sampler if self.req.kind != "upscale" else None,
        )




class JobManager:
    """Owns the queue, the engine thread and the finished results."""

    def __init__(self, runner: Runner, limits: Limits, *,
                 on_end: Callable[[Job], None] | None = None, fair: bool = True) -> None:
        self.runner = runner
        self.limits = limits
        self.on_end = on_end  # called once per job, outside the lock, when it ends
        self._jobs: dict[str, Job] = {}
        self._queue: FairQueue[Job] = FairQueue(fair)
        self._lock = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self.jobs_served = 0
        self.running: Job | None = None
        self.ready = threading.Event()
        self._encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="colabswarm-job-png")
        self._in_flight = threading.BoundedSemaphore(_MAX_IN_FLIGHT)
        # the images of one job are written side by side: the last job of a run is waited for,
        # and zlib lets go of the GIL
        self._png_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                            thread_name_prefix="colabswarm-png")

    # ----- lifecycle -----------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, warmup: Any = None) -> None:
        self._loop = loop
        self._thread = threading.Thread(
            target=self._work, args=(warmup,), name="colabswarm-engine", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            for job in self._jobs.values():
                job.stop = True
            self._lock.notify_all()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        close = getattr(self.runner, "close", None)  # the engine's compile thread
        if close is not None:
            close()
        self._encoder.shutdown(wait=True, cancel_futures=False)
        self._png_pool.shutdown(wait=True, cancel_futures=False)

    # ----- what handlers call --------------------------------------------------------------
    def submit(self, req: JobRequest, init_images: list[Image.Image],
               owner: str = "owner", scope: str | None = None) -> JobStatus:
        with self._lock:
            self._sweep()
            waiting = len(self._queue) + (1 if self.running else 0)
            if waiting >= self.limits.max_queue:
                wait = round(self._next_slot_s(), 1)
                if not self.ready.is_set():
                    raise Busy(
                        f"This worker is still loading its model and its queue is full "
                        f"({waiting} jobs); retry in about {wait:g} s or use another worker.",
                        kind=ErrorKind.LOADING, retry_after_s=wait,
                    )
                raise Busy(
                    f"This worker's queue is full ({waiting} jobs); retry in about {wait:g} s "
                    "or use another worker.",
                    kind=ErrorKind.QUEUE_FULL, retry_after_s=wait,
                )
            job = Job(secrets.token_hex(8), req, init_images, owner=owner,
                      scope=scope or owner)
            self._jobs[job.id] = job
            self._queue.push(job, owner, len(req.seeds))
            self._lock.notify_all()
            return job.status(self._queue.position(job))

    def next_slot_s(self) -> float:
        """Seconds until the running job is probably done."""
        with self._lock:
            return self._next_slot_s()

    def _next_slot_s(self) -> float:
        """Call with the lock held: seconds until the running job is probably done."""
        job = self.running
        if job is None:
            return retry_after_s(0, 0.0, 0, None)
        total = job.total_steps or job.req.steps
        return retry_after_s(
            total - job.step, job.req.width * job.req.height / 1e6, len(job.req.seeds),
            getattr(self.runner, "step_seconds_per_mpix", None),
        )

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def status(self, job: Job) -> JobStatus:
        with self._lock:
            return job.status(self._position(job))

    def _position(self, job: Job) -> int:
        return self._queue.position(job) if job.state == "queued" else 0

    async def wait(self, job: Job, since: int, timeout: float,
                   progress_every: float = 0.0) -> JobStatus:
        """Long-poll: return once the job's version passes `since`, or at the timeout.

        A change of state returns at once; step progress alone returns at most every
        `progress_every` seconds, so a client is not woken (and billed a request) per step.
        """
        start = time.monotonic()
        deadline = start + timeout
        with self._lock:
            first_state = job.state
        while True:
            with self._lock:
                changed = job.version > since
                if job.state in ("done", "failed", "interrupted") or (
                    changed and (job.state != first_state
                                 or time.monotonic() - start >= progress_every)
                ):
                    return job.status(self._position(job))
                event = job.event
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                return self.status(job)
            if changed:  # progress is waiting for the interval: sleep until it is due
                remaining = min(remaining, max(start + progress_every - now, 0.0))
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return self.status(job)

    def delete(self, job_id: str) -> bool:
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job is None:
                return False
            job.stop = True
            dropped = job.state == "queued" and self._queue.remove(job)
            job.pngs = []
        if dropped:  # it will never run: its end is now
            self._ended(job)
        return True

    def interrupt(self, job: Job | None = None, owner: str | None = None) -> int:
        """Stop one job, or every queued and running job (of one owner); returns how many
        were stopped."""
        stopped: list[Job] = []
        with self._lock:
            targets = [job] if job else [j for j in self._jobs.values()
                                         if owner is None or j.owner == owner]
            count = 0
            for j in targets:
                if j.state == "queued":
                    self._queue.remove(j)
                    stopped.append(j)
                    j.state = "interrupted"
                    j.error = "interrupted before it started"
                    j.error_kind = ErrorKind.INTERRUPTED
                    j.finished = time.monotonic()
                    self._changed(j)
                    count += 1
                elif j.state == "running":
                    j.stop = True
                    count += 1
        for j in stopped:
            self._ended(j)
        return count

    def per_owner(self) -> dict[str, int]:
        """Jobs waiting or running, per owner."""
        with self._lock:
            out = self._queue.owners()
            if self.running is not None:
                out[self.running.owner] = out.get(self.running.owner, 0) + 1
            return out

    def set_weight(self, owner: str, weight: float) -> None:
        """An owner's share of the GPU when several have work queued (default 1)."""
        with self._lock:
            self._queue.set_weight(owner, weight)

    def weights(self, owners: list[str]) -> dict[str, float]:
        with self._lock:
            return {o: self._queue.weight(o) for o in owners}

    def counts(self) -> tuple[int, int, int]:
        """(queued, running, finished-but-uncollected) jobs."""
        with self._lock:
            held = sum(1 for j in self._jobs.values() if j.finished is not None)
            return len(self._queue), (1 if self.running else 0), held

    # ----- internals -----------------------------------------------------------------------
    def _changed(self, job: Job) -> None:
        """Call with the lock held: bump the version and wake long-pollers."""
        job.version += 1
        old, job.event = job.event, asyncio.Event()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(old.set)

    def _sweep(self) -> None:
        """Drop finished jobs nobody collected within the time-to-live."""
        now = time.monotonic()
        ttl = self.limits.result_ttl_s
        for jid in [
            j.id for j in self._jobs.values() if j.finished is not None and now - j.finished > ttl
        ]:
            del self._jobs[jid]

    def _work(self, warmup: Any) -> None:
        if warmup is not None:
            try:
                warmup()
            except Exception:  # the server reports the load error through /v1/info
                log.exception("model load failed")
        self.ready.set()
        idle = getattr(self.runner, "idle_work", None)  # the engine's first runs of shapes
        again: float | None = 0.0 if idle is not None else None  # when to ask idle() again
        while True:
            # a slot for the next job's images before taking the job: past _MAX_IN_FLIGHT
            # launched jobs whose images are not in, the next one stays queued
            self._in_flight.acquire()
            with self._lock:
                if not self._queue and not self._closing and again != 0.0:
                    self._lock.wait(timeout=5.0 if again is None else again)
                    self._sweep()
                if self._closing:
                    self._in_flight.release()
                    return
                job = self._queue.pop() if self._queue else None
                if job is not None:
                    job.state = "running"
                    job.started = time.monotonic()
                    self.running = job
                    self._changed(job)
            if job is not None:
                self._run(job)  # gives the slot back when the job's images are in
            else:
                self._in_flight.release()
            if idle is not None:
                # one piece of the engine's own work between jobs, outside the lock, also when
                # jobs are waiting (a compiled shape's first run takes a fraction of a second,
                # and until it is made the shape is not listed)
                try:
                    again = idle()
                except Exception:  # noqa: BLE001 - the engine thread serves jobs regardless
                    log.exception("engine idle work failed")
                    again = None

    def _run(self, job: Job) -> None:
        """Launch one job on the engine and hand its images to the encoder threads: they wait
        for the GPU and write the PNGs while the engine already prepares and queues the next
        job (the GPU never waits for Python between jobs, nor for zlib)."""

        def on_step(step: int, total: int) -> None:
            with self._lock:
                job.step, job.total_steps = step, total
                self._changed(job)

        try:
            launched = self.runner.launch(job.req, job.init_images, on_step,
                                          lambda: job.stop, scope=job.scope)
        except Exception as exc:  # interrupted, out of memory, a bad request, or a crash
            self._in_flight.release()
            self._failed(job, exc)
            return
        with self._lock:
            self.running = None
        if _OVERLAP:
            self._encoder.submit(self._encode, job, launched)
        else:  # the bench's comparison: the engine's thread waits for each job's images
            self._encode(job, launched)

    def _failed(self, job: Job, exc: BaseException) -> None:
        kind = error_kind_of(exc)
        if job.stop or isinstance(exc, JobInterrupted):
            error = f"interrupted at step {job.step} of {job.total_steps}"
            self._finish(job, [], "interrupted", error, ErrorKind.INTERRUPTED)
        elif kind is ErrorKind.OUT_OF_MEMORY:
            log.warning("job %s ran out of device memory: %s", job.id, public_error(exc))
            req = job.req
            self._free_memory()
            self._finish(job, [], "failed",
                         f"The device ran out of memory on this job ({len(req.seeds)} "
                         f"images of {req.width}x{req.height}); fewer images per job or a "
                         "smaller size may fit.", kind)
        else:
            log.exception("job %s failed", job.id, exc_info=exc)
            self._finish(job, [], "failed", public_error(exc), kind)

    def _encode(self, job: Job, launched: Launched) -> None:
        try:
            images = launched.wait()
            if len(images) != len(job.req.seeds):
                raise RuntimeError(
                    f"engine returned {len(images)} images for {len(job.req.seeds)} seeds"
                )
        except Exception as exc:  # the device failed after the job was queued
            self._failed(job, exc)
            return
        finally:
            self._in_flight.release()
        with self._lock:
            job.computed = time.monotonic()
            # its last steps ran after the engine's thread had moved on: all of them are done
            job.step = max(job.step, job.total_steps)
            self._changed(job)
        try:
            pngs = list(self._png_pool.map(_rgb_png, images))
        except Exception as exc:
            log.exception("job %s: PNG encoding failed", job.id)
            self._finish(job, [], "failed", f"PNG encoding failed: {public_error(exc)}",
                         error_kind_of(exc))
            return
        self._finish(job, pngs, "done", None)

    def _free_memory(self) -> None:
        free = getattr(self.runner, "free", None)
        if free is not None:
            try:
                free()
            except Exception:
                log.exception("freeing memory after an out-of-memory error failed")

    def _finish(self, job: Job, pngs: list[bytes], state: str, error: str | None,
                kind: ErrorKind | None = None) -> None:
        with self._lock:
            job.pngs = pngs if job.id in self._jobs else []
            job.state, job.error, job.error_kind = state, error, kind
            job.finished = time.monotonic()
            job.computed = job.computed or job.finished
            job.init_images = []
            if self.running is job:
                self.running = None
            if state == "done":
                self.jobs_served += 1
            self._changed(job)
        self._ended(job)

    def _ended(self, job: Job) -> None:
        """Run the end hook once per job (outside the lock)."""
        with self._lock:
            if job.ended:
                return
            job.ended = True
        if self.on_end is not None:
            try:
                self.on_end(job)
            except Exception:
                log.exception("job %s: the end hook failed", job.id)


def _rgb_png(image: Image.Image) -> bytes:
    return encode_png(image.convert("RGB") if image.mode != "RGB" else image)
