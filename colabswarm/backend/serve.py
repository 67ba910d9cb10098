"""Start and stop a worker server in a background thread of this process (a notebook kernel).

The kernel stays free: uvicorn runs its own event loop on a daemon thread, the engine runs on
another, and the handle returned here is all a notebook cell needs: the share string, the
owner's guests (``add_guest`` returns a guest's share string, ``revoke`` takes it back), who
used the GPU (``info()``, ``usage()``), the worker's log, and the idle stop that shuts a worker
no controller has contacted for a while (``idle_stop="30m"``), so a rented GPU stops costing.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ColabSwarmError, InvalidRequest, TunnelError
from ..protocol import (
    ControllerSeen,
    GuestLimits,
    Limits,
    LogLine,
    TokenUsage,
    clean_name,
    encode_share,
    make_guest_limits,
    mask_token,
    new_token,
)
from .compiled import DEFAULT_BATCHES, check_batches, check_mode, check_sizes
from .connections import guarded_protocol
from .server import WorkerApp, create_app
from .textcache import MAX_CACHE_MB

__all__ = ["WorkerHandle", "idle_verdict", "make_engine", "parse_duration",
           "release_colab_runtime", "start_worker"]

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(value: str | float | None) -> float | None:
    """Seconds from "30m", "1h", "1h30m", "90s", "90" or a number; None for None, "off",
    "none", "0" or 0 (off)."""
    if value is None or value is False:
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        if text in ("", "off", "none", "no", "false", "0"):
            return None
        m = _DURATION.match(text)
        if not m or not any(m.groups()):
            raise InvalidRequest(
                f"Cannot read the duration {str(value)[:40]!r}: write it like 30m, 1h, 1h30m, "
                "90s or a number of seconds (off: none).")
        h, mins, secs = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mins * 60 + secs
    if seconds <= 0:
        return None
    if not seconds >= 1 or seconds > 30 * 86400:
        raise InvalidRequest(f"A duration must be between 1 s and 30 days (got {value!r}).")
    return seconds


def release_colab_runtime() -> bool:
    """On Colab, give the runtime (the GPU machine) back, which is what stops its billing;
    elsewhere do nothing. Returns whether it asked Colab. For start_worker's on_idle_stop."""
    try:
        from google.colab import runtime  # type: ignore[import-not-found]
    except ImportError:
        return False
    log.warning("giving the Colab runtime back (idle stop)")
    runtime.unassign()
    return True


def idle_verdict(now: float, last_contact: float, idle_stop_s: float | None
                 ) -> tuple[str, float | None]:
    """("ok" | "warn" | "stop", seconds left before the stop) for a worker last contacted at
    `last_contact`. The warning comes a fifth of the time before, at most 5 minutes."""
    if idle_stop_s is None:
        return "ok", None
    left = idle_stop_s - (now - last_contact)
    if left <= 0:
        return "stop", 0.0
    if left <= min(idle_stop_s / 5, 300.0):
        return "warn", left
    return "ok", left


def _say(seconds: float) -> str:
    s = int(round(seconds))
    if s < 90:
        return f"{s}s"
    if s < 5400:
        return f"{s // 60}m" + (f"{s % 60}s" if s % 60 and s < 600 else "")
    return f"{s // 3600}h{s % 3600 // 60:02d}m"

log = logging.getLogger("colabswarm.serve")


def make_engine(
    model: str | list[str] = "tiny",
    *,
    device: str | None = None,
    allow_downloads: bool = False,
    device_map: str | None = None,
    upscalers_dir: str | None = None,
    simulate_speed: float | None = None,
    simulate_step_seconds: float = 0.1,
    simulate_load_seconds: float = 0.0,
    loras: str | os.PathLike[str] | list[str | os.PathLike[str]] | None = None,
    lora_cache: int = 4,
    compile: str = "auto",
    compile_batches: str | tuple[int, ...] | list[int] = DEFAULT_BATCHES,
    compile_sizes: str | list[tuple[int, int]] | None = None,
    compile_cache: str | os.PathLike[str] | None = None,
    text_cache_mb: float = 64.0,
) -> Any:
    """The real diffusers engine, or the bench-only simulator when simulate_speed is set.

    ``loras``: .safetensors LoRA files and/or folders of them (searched recursively), offered
    by file name; ``lora_cache``: how many stay loaded between jobs. ``compile``: off, auto,
    reduce-overhead or default (see start_worker). ``text_cache_mb``: see start_worker."""
    if not 0 <= text_cache_mb <= MAX_CACHE_MB:  # also NaN and infinity
        raise InvalidRequest(f"text_cache_mb must be 0 (off) to {MAX_CACHE_MB} MiB, not "
                             f"{text_cache_mb}.")
    compile = check_mode(compile)
    batches = check_batches(compile_batches)
    models = [model] if isinstance(model, str) else list(model)
    if simulate_speed is not None:
        from .simulated import SimulatedEngine

        return SimulatedEngine(speed=simulate_speed, step_s=simulate_step_seconds,
                               models=tuple(models), load_s=simulate_load_seconds)
    from .engine import Engine

    if isinstance(loras, str | os.PathLike):
        loras = [loras]
    return Engine(
        models=models, device=device, allow_downloads=allow_downloads,
        device_map=device_map, upscalers_dir=upscalers_dir,
        loras=[os.fspath(p) for p in loras] if loras is not None else None,
        lora_cache=lora_cache, compile=compile, compile_batches=batches,
        compile_sizes=check_sizes(compile_sizes),
        compile_cache=os.fspath(compile_cache) if compile_cache is not None else None,
        text_cache_bytes=int(text_cache_mb * 2**20),
    )


@dataclass(repr=False)
class WorkerHandle:
    """A running worker: its addresses, token, share string, tunnel, and stop(). Its repr
    shows the token masked (``mask_token``), never whole."""

    worker: WorkerApp
    host: str
    port: int
    token: str = field(repr=False)
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    tunnel: Any = None
    tunnel_provider: str = "none"
    tunnel_deadline_s: float = 60.0
    tunnel_authtoken: str | None = field(default=None, repr=False)
    idle_stop_s: float | None = None
    on_idle_stop: Callable[[], Any] | None = field(default=None, repr=False)
    stopped_reason: str | None = None   # why it stopped, if it stopped itself
    idle_warning: str | None = None     # shown while an idle stop is near
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)

    def __repr__(self) -> str:
        tunnel = self.tunnel.public_url if self.tunnel is not None else None
        return (f"WorkerHandle(name={self.worker.name!r}, local_url={self.local_url!r}, "
                f"tunnel={self.tunnel_provider!r}, public_url={tunnel!r}, "
                f"token={mask_token(self.token)!r}, running={self.running})")

    @property
    def open_connections(self) -> int:
        """HTTP connections open now (at most ``limits.max_connections``)."""
        return len(self._server.server_state.connections)

    @property
    def local_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The address peers should use: the tunnel's public URL, else the local one."""
        return self.tunnel.public_url if self.tunnel is not None else self.local_url

    @property
    def share(self) -> str:
        return encode_share(self.url, self.token)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._server.should_exit

    @property
    def tunnel_alive(self) -> bool:
        return self.tunnel is None or self.tunnel.alive()

    def info(self) -> Any:
        """The owner's view of /v1/info: every token's use and the connected controllers."""
        return self.worker.info()

    # ----- guests ----------------------------------------------------------------------------
    def add_guest(self, name: str, *, images_per_hour: int | None = None,
                  max_pixels: int | None = None, max_steps: int | None = None,
                  max_images: int | None = None, max_queued: int = 16,
                  weight: float = 1.0) -> str:
        """A named guest token with its own limits (None: the worker's); returns the guest's
        share string. The guest may generate, upscale and see or stop its own jobs only."""
        limits = make_guest_limits(
            images_per_hour=images_per_hour, max_pixels=max_pixels, max_steps=max_steps,
            max_images=max_images, max_queued=max_queued, weight=weight)
        self.worker.add_guest(name, limits)
        return self.guest_share(name)

    def update_guest(self, name: str, *, images_per_hour: int | None = None,
                     max_pixels: int | None = None, max_steps: int | None = None,
                     max_images: int | None = None, max_queued: int = 16,
                     weight: float = 1.0) -> None:
        """Give a guest these limits (all of them: a left-out one goes back to its default);
        its token stays the same."""
        self.worker.update_guest(name, make_guest_limits(
            images_per_hour=images_per_hour, max_pixels=max_pixels, max_steps=max_steps,
            max_images=max_images, max_queued=max_queued, weight=weight))

    def revoke(self, name: str) -> bool:
        """Take a guest's token back: its next request gets 401, its queued and running jobs
        stop. False if there is no such guest."""
        return self.worker.revoke(name)

    def set_weight(self, name: str, weight: float) -> None:
        """A token's share of the GPU while several have work queued: "owner" or a guest's
        name; 2 gets twice the images of 1."""
        self.worker.set_weight(name, weight)

    def guest_share(self, name: str) -> str:
        """A guest's share string (this worker's current URL and the guest's token)."""
        return encode_share(self.url, self.worker.tokens.token_of(name))

    def guests(self) -> dict[str, GuestLimits]:
        """The guests and their limits (no tokens: guest_share(name) has the share string)."""
        return {g.name: g.limits or GuestLimits() for g in self.worker.tokens.guests()}

    def usage(self) -> list[TokenUsage]:
        """Who used the GPU: per token, images, GPU seconds, last seen (revoked ones too)."""
        return self.worker.usage_rows()

    def controllers(self) -> list[ControllerSeen]:
        """Controllers that contacted this worker in the last 2 minutes."""
        return self.worker.usage.controllers(time.monotonic())

    def logs(self, lines: int = 200) -> list[LogLine]:
        """The worker's recent log lines, oldest first, tokens masked."""
        return self.worker.log.lines(lines)

    # ----- idle stop -------------------------------------------------------------------------
    @property
    def idle_stop_in_s(self) -> float | None:
        """Seconds until this worker stops itself unless a controller contacts it (None: off
        or stopped)."""
        if self.idle_stop_s is None or not self.running:
            return None
        return idle_verdict(time.monotonic(), self.worker.last_contact, self.idle_stop_s)[1]

    def _watch_idle(self) -> None:
        assert self.idle_stop_s is not None
        every = min(1.0, max(0.05, self.idle_stop_s / 50))
        warned = False
        note = self.worker.log.note
        while not self._stopping.wait(every):
            verdict, left = idle_verdict(time.monotonic(), self.worker.last_contact,
                                         self.idle_stop_s)
            if verdict == "ok" and warned:
                warned, self.idle_warning = False, None
                note(logging.INFO, "a controller is back: the idle stop is called off")
            elif verdict == "warn" and not warned:
                warned = True
                self.idle_warning = (
                    f"No controller has contacted this worker for "
                    f"{_say(self.idle_stop_s - (left or 0))}: it stops itself (and its "
                    f"tunnel) in {_say(left or 0)} unless one does (idle_stop "
                    f"{_say(self.idle_stop_s)}).")
                note(logging.WARNING, self.idle_warning)
            elif verdict == "stop":
                self.stopped_reason = (
                    f"idle: no controller contacted this worker for {_say(self.idle_stop_s)} "
                    "(idle_stop), so it stopped itself and its tunnel")
                note(logging.WARNING, f"stopping: {self.stopped_reason}")
                self.idle_warning = None
                self.stop()
                if self.on_idle_stop is not None:
                    try:
                        self.on_idle_stop()
                    except Exception:
                        log.exception("on_idle_stop failed")
                return

    def open_tunnel(self, provider: str | None = None) -> str:
        """Open (or re-open) the tunnel and check the worker through it; returns the share."""
        from ..tunnel import publish

        provider = provider or self.tunnel_provider
        self.close_tunnel()
        self.tunnel_provider = provider
        if provider == "none":
            return self.share
        # one deadline (tunnel_deadline_s) for opening the tunnel and checking it
        tunnel = publish(
            provider, self.port, self.token, host="127.0.0.1",
            deadline_s=self.tunnel_deadline_s, authtoken=self.tunnel_authtoken,
        )
        self.tunnel = tunnel
        log.info("worker published at %s (token %s)", tunnel.public_url, mask_token(self.token))
        return self.share

    def reopen(self) -> str:
        """A new tunnel (new public URL, same token) after the old one died."""
        if self.tunnel_provider == "none":
            raise TunnelError("This worker has no tunnel to reopen (it was started with 'none').")
        return self.open_tunnel(self.tunnel_provider)

    def close_tunnel(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None

    def stop(self, timeout: float = 10.0) -> None:
        """Close the tunnel, stop the server and the engine thread; idempotent."""
        self._stopping.set()
        self.close_tunnel()
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> WorkerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_worker(
    model: str | list[str] = "tiny",
    tunnel: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    *,
    name: str | None = None,
    limits: Limits | None = None,
    device: str | None = None,
    allow_downloads: bool = False,
    device_map: str | None = None,
    upscalers_dir: str | None = None,
    simulate_speed: float | None = None,
    simulate_step_seconds: float = 0.1,
    simulate_load_seconds: float = 0.0,
    tunnel_deadline_s: float = 60.0,
    ngrok_authtoken: str | None = None,
    wait_ready: bool = True,
    engine: Any = None,
    loras: str | os.PathLike[str] | list[str | os.PathLike[str]] | None = None,
    lora_cache: int = 4,
    guests_file: str | None = None,
    idle_stop: str | float | None = None,
    on_idle_stop: Callable[[], Any] | None = None,
    compile: str = "auto",
    compile_batches: str | tuple[int, ...] | list[int] = DEFAULT_BATCHES,
    compile_sizes: str | list[tuple[int, int]] | None = None,
    compile_cache: str | os.PathLike[str] | None = None,
    text_cache_mb: float = 64.0,
) -> WorkerHandle:
    """Serve a model from this process on a background thread; returns at once with a handle.

    The model loads in the background (the worker reports 'loading' until then); with
    wait_ready it returns once the model is loaded or failed. ``loras`` lists .safetensors
    LoRA files and/or folders of them (pickle files are refused); each is offered by its file
    name and content hash, and ``lora_cache`` of them stay loaded between jobs.

    guests_file: keep the guests (their names, tokens, limits) in this file across restarts
    (mode 0600; a file others can read is refused). Without it, guests last until the worker
    stops. idle_stop: "30m", "1h", seconds, or None (off, the default): stop the worker and its
    tunnel once no controller has contacted it for that long (a warning comes first, in the
    log and the panel); on_idle_stop is then called (e.g. to release a rented machine).
    ``compile``: 'auto' (default: on where it pays, a CUDA GPU of compute capability 8.0+ with
    Triton and 4+ CPU cores; off on CPU and MPS), 'reduce-overhead' (torch.compile with CUDA
    graphs), 'default' (torch.compile without them) or 'off'. A compiled worker serves at once,
    eagerly, while it compiles the model's own size (or ``compile_sizes`` instead, e.g.
    "512x512,576x576" to add upscale tiles) at ``compile_batches`` (capped by
    ``limits.max_images``) in the background; a job of another size runs eagerly and queues its
    size. ``Info.compile`` says how far it got.
    ``compile_cache``: a folder for compiled artifacts, so a restart skips most of the compile
    (default: colabswarm's cache folder; on Colab, a Drive folder keeps them across sessions).
    Only point it at a folder nobody else can write to: the worker runs what it finds there.
    ``text_cache_mb``: device memory for the text encoders' answers to recent prompts, so a
    repeated prompt is not encoded again (default 64; 0 turns it off).
    """
    import uvicorn

    idle_stop_s = parse_duration(idle_stop)
    token = token or new_token()
    lim = limits or Limits()
    eng = engine or make_engine(
        model, device=device, allow_downloads=allow_downloads, device_map=device_map,
        upscalers_dir=upscalers_dir, simulate_speed=simulate_speed,
        simulate_step_seconds=simulate_step_seconds,
        simulate_load_seconds=simulate_load_seconds, loras=loras, lora_cache=lora_cache,
        compile=compile, compile_batches=check_batches(compile_batches, lim.max_images),
        compile_sizes=compile_sizes, compile_cache=compile_cache, text_cache_mb=text_cache_mb,
    )
    worker = WorkerApp(
        eng, token, lim, name=clean_name(name or socket.gethostname()),
        simulated=simulate_speed is not None, guests_file=guests_file,
    )
    # proto IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they are
    # TCP, and without it every keep-alive response waits 40 ms for a delayed ACK (Nagle)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ColabSwarmError(
            f"Cannot listen on {host}:{port} ({exc.strerror}); pick another port or port=0."
        ) from None
    lim = worker.limits
    # uvicorn's own settings where it has them (keep-alive, header size); the header and stall
    # timeouts and the connection cap come with the protocol class (connections.py). No
    # WebSockets: an upgraded connection would leave that protocol's watch.
    config = uvicorn.Config(
        create_app(worker), log_level="warning", access_log=False, lifespan="on",
        http=guarded_protocol(lim), ws="none", timeout_keep_alive=lim.idle_timeout_s,
        h11_max_incomplete_event_size=lim.max_header_bytes,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="colabswarm-server", daemon=True
    )
    thread.start()
    handle = WorkerHandle(
        worker, host, sock.getsockname()[1], token, server, thread,
        tunnel_provider=tunnel or "none", tunnel_deadline_s=tunnel_deadline_s,
        tunnel_authtoken=ngrok_authtoken, idle_stop_s=idle_stop_s, on_idle_stop=on_idle_stop,
    )
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        handle.stop()
        raise ColabSwarmError("The worker server did not start; see the log above for why.")
    if wait_ready:
        worker.jobs.ready.wait()
        if worker.state == "error":
            handle.stop()
            raise ColabSwarmError(f"The model failed to load: {worker.state_detail}")
    if tunnel and tunnel != "none":
        try:
            handle.open_tunnel(tunnel)
        except BaseException:
            handle.stop()
            raise
    models = getattr(eng, "model_names", [])
    worker.log.note(logging.INFO, f"worker {worker.name} serving {models} at "
                                  f"{handle.local_url}"
                                  + (f", idle stop after {_say(idle_stop_s)}" if idle_stop_s
                                     else ""))
    if idle_stop_s is not None:
        worker.last_contact = time.monotonic()  # the idle time counts from now
        threading.Thread(target=handle._watch_idle, name="colabswarm-idle-stop",
                         daemon=True).start()
    return handle
