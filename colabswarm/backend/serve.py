"""Start and stop a worker server in a background thread of this process (a notebook kernel).

The kernel stays free: uvicorn runs its own event loop on a daemon thread, the engine runs on
another, and the handle returned here is all a notebook cell needs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ColabSwarmError, TunnelError
from ..protocol import Limits, clean_name, encode_share, mask_token, new_token
from .compiled import DEFAULT_BATCHES, check_batches, check_mode, check_sizes
from .connections import guarded_protocol
from .server import WorkerApp, create_app

__all__ = ["WorkerHandle", "make_engine", "start_worker"]

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
    loras: str | os.PathLike[str] | list[str | os.PathLike[str]] | None = None,
    lora_cache: int = 4,
    compile: str = "auto",
    compile_batches: str | tuple[int, ...] | list[int] = DEFAULT_BATCHES,
    compile_sizes: str | list[tuple[int, int]] | None = None,
    compile_cache: str | os.PathLike[str] | None = None,
) -> Any:
    """The real diffusers engine, or the bench-only simulator when simulate_speed is set.

    ``loras``: .safetensors LoRA files and/or folders of them (searched recursively), offered
    by file name; ``lora_cache``: how many stay loaded between jobs. ``compile``: off, auto,
    reduce-overhead or default (see start_worker)."""
    compile = check_mode(compile)
    batches = check_batches(compile_batches)
    models = [model] if isinstance(model, str) else list(model)
    if simulate_speed is not None:
        from .simulated import SimulatedEngine

        return SimulatedEngine(speed=simulate_speed, step_s=simulate_step_seconds,
                               models=tuple(models))
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
        return self.worker.info()

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
    tunnel_deadline_s: float = 60.0,
    ngrok_authtoken: str | None = None,
    wait_ready: bool = True,
    engine: Any = None,
    loras: str | os.PathLike[str] | list[str | os.PathLike[str]] | None = None,
    lora_cache: int = 4,
    compile: str = "auto",
    compile_batches: str | tuple[int, ...] | list[int] = DEFAULT_BATCHES,
    compile_sizes: str | list[tuple[int, int]] | None = None,
    compile_cache: str | os.PathLike[str] | None = None,
) -> WorkerHandle:
    """Serve a model from this process on a background thread; returns at once with a handle.

    The model loads in the background (the worker reports 'loading' until then); with
    wait_ready it returns once the model is loaded or failed. ``loras`` lists .safetensors
    LoRA files and/or folders of them (pickle files are refused); each is offered by its file
    name and content hash, and ``lora_cache`` of them stay loaded between jobs.

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
    """
    import uvicorn

    token = token or new_token()
    lim = limits or Limits()
    eng = engine or make_engine(
        model, device=device, allow_downloads=allow_downloads, device_map=device_map,
        upscalers_dir=upscalers_dir, simulate_speed=simulate_speed,
        simulate_step_seconds=simulate_step_seconds, loras=loras, lora_cache=lora_cache,
        compile=compile, compile_batches=check_batches(compile_batches, lim.max_images),
        compile_sizes=compile_sizes, compile_cache=compile_cache,
    )
    worker = WorkerApp(
        eng, token, lim, name=clean_name(name or socket.gethostname()),
        simulated=simulate_speed is not None,
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
        tunnel_authtoken=ngrok_authtoken,
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
    return handle
