"""A worker's compiled fast path: torch.compile of the UNet and the VAE decoder, compiled one
shape at a time on a background thread while the engine keeps serving every job eagerly, and a
compile cache that a restarted worker loads instead of compiling again.

The rules, and why (docs/ARCHITECTURE.md, "The compiled fast path"):

- **Shapes.** Compiled graphs are per shape (image size x batch size; ``dynamic=False``). After
  a model loads, its native size (512 for SD 1.x, 1024 for SDXL) is compiled at each of the
  worker's batch sizes (1, 2, 4, 8 by default, capped by ``Limits.max_images``), or the sizes
  its owner names instead; a job of a new image size runs eagerly and queues that size (at most
  ``MAX_SIZES`` sizes per model). A size
  is listed in ``Info.compile.shapes`` once all its batch sizes are done and batch 1 compiled;
  the controller then sends it only the listed batch sizes for that size.
- **The engine never compiles.** The UNet's and the decoder's ``forward`` are replaced (on the
  instances) by a dispatcher: a call whose inputs (shapes, dtypes, strides, the other
  arguments) are those of a compiled, warmed shape runs the compiled code through
  ``torch._dynamo.run`` (cached code only: should dynamo's guards still disagree, it runs
  eagerly, never compiles); every other call runs the module's own forward. Timesteps are
  passed on as float32 (the UNet's time embedding starts with ``timesteps.float()``, so this
  is exact), so samplers with integer and float timesteps share the graphs.
- **One lock per model.** The compile thread holds it while it compiles and warms one shape;
  the engine thread takes it without waiting for a job that may run compiled, and runs the job
  eagerly when it cannot (or when the compile thread is waiting for it: compilation comes
  first). A job that changes the UNet (LoRA adapters loaded, switched or unloaded) waits for
  it: a trace must never see the module change under it.
- **Jobs get the interpreter back sooner.** While a shape compiles, the interpreter's switch
  interval is 0.5 ms instead of Python's 5 ms (``_engine_first``; ``SWITCH_ENV``, read when the
  compiler is made, sets it or ``off``): an eager job gives up the GIL in every torch op, and
  the compile thread's tracing is pure Python, so jobs served meanwhile crawled. It bounds the
  worst job and serves more of them; the compile takes longer while jobs come, not otherwise.
- **CUDA graphs are recorded by the engine thread**, in a shape's first compiled job: torch
  keeps one graph tree per thread, so graphs recorded by the compile thread would never be
  replayed by the engine (they only held memory). The compile thread compiles and runs each
  shape once (no recording). The engine thread then runs each compiled shape once itself
  (``FIRST_RUN_STEPS`` UNet steps) between jobs, so that recording the graphs does not
  fall in a user's job, and only then lists the shape: a shape is ``compiled`` by the compile
  thread, ``ready`` once the engine ran it (or a job of that shape made those calls compiled).
  The compile thread lets a waiting first run go before its next shape, and no first run is made
  while LoRA adapters are loaded (the graphs were traced without them). While the
  engine records, nothing else in the worker calls CUDA:
  the compile thread is shut out by the lock, freeing memory waits for the engine's lock, and
  /v1/info reports the GPU memory the engine read last. On a GPU the compile thread then waits
  for more work rather than ending: a thread's end tears down its torch state at a moment of
  its own. (A restarted worker died when these overlapped: docs/BENCHMARKS.md.)
- **Layout.** On a GPU the UNet and the decoder are put in ``channels_last`` memory format before
  their first trace: the compiled UNet then ran 8 % faster at batch 1 and 4 % at batch 8 (SD 1.5,
  H200, docs/BENCHMARKS.md "Which compiled UNet is fastest"); fused QKV projections gave no
  measured gain on top and would clash with LoRA adapters, so they stay off. Eager jobs of a
  compiled worker (LoRAs, sizes not compiled) run in that layout too. On a CPU nothing was
  measured and the layout stays as loaded. The layout is part of the cache key.
- **LoRAs** run eagerly. A job without LoRAs on a compiled model unloads any adapters first, so
  the compiled graphs (traced without them) apply again and compilation can go on.
- **Cache.** Inductor's own caches (FX graph, AOTAutograd, Triton kernels) live in
  ``TORCHINDUCTOR_CACHE_DIR`` (set to colabswarm's cache folder unless set already); with a
  torch that has them (2.7+), ``torch.compiler.save_cache_artifacts`` files are written to the
  owner's compile cache folder (a Drive folder on Colab: one file per compiled shape, not
  thousands of small ones; ``write_artifacts`` says why never one file rewritten), in a
  subfolder keyed by GPU, torch, CUDA, Triton, diffusers, model, its configuration, dtype,
  mode and layout, and all of them loaded back before compiling. A file holds what its shape
  compiled (cache hits are dropped before each shape, torch records them again), and a shape
  served by the machine's own inductor cache is written when the folder has no file of it. A
  file is named by its shape; where a file of the same shape appeared in the folder after this
  worker loaded it (another worker sharing the folder finished that shape first), this worker
  does not write its own copy.
- **Ahead of time.** Where torch can (``precompiled.supported``), each shape's calls are
  compiled with torch's AOT precompile instead and written as one ``.aot`` file per shape; a
  restarted worker loads a shape's files before its warm run, which then runs them without
  tracing (a restart went from 25.8-33.4 s to 9.1 s). Whatever torch cannot save, load or run
  falls back to the traced compile for that module (``_compile_call``): a file that does not
  load is compiled again, a loaded or new call that raises is traced instead.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest
from ..protocol import CompiledShape, CompileInfo
from . import precompiled

__all__ = [
    "COMPILE_MODES",
    "DEFAULT_BATCHES",
    "MAX_SIZES",
    "SWITCH_ENV",
    "Compiler",
    "JobPlan",
    "Shape",
    "cache_key",
    "cache_settings",
    "check_batches",
    "check_mode",
    "choose_mode",
    "default_cache_dir",
    "memory_format_for",
    "native_side",
    "read_artifacts",
    "write_artifacts",
]

log = logging.getLogger("colabswarm.compiled")

COMPILE_MODES = ("auto", "off", "reduce-overhead", "default")
DEFAULT_BATCHES = (1, 2, 4, 8)
MAX_SIZES = 4              # image sizes compiled per model (the native one first)
MAX_BATCH = 64             # a batch size past this is refused (CompiledShape allows 1024)
_MIN_TORCH = (2, 5)        # parameters are graph inputs (not constants) from 2.5 on
_AUTO_MIN_CAPABILITY = (8, 0)
_AUTO_MIN_CPUS = 4
_CACHE_FORMAT = 1
_MAX_CACHE_FILE = 4 << 30  # bytes; a bigger file in the cache folder is not read
_MAX_CACHE_FILES = 64
_MAX_SHAPE_FILES = 4       # ahead-of-time compiled files read per shape (the newest)
FIRST_RUN_STEPS = 3        # a shape's first run on the engine thread: CUDA graph trees warm up
                           # a function once, record it on the next call, then replay it
IDLE_POLL_S = 0.2          # how soon an idle engine asks again while shapes are on their way
ENGINE_TURN_S = 2.0        # how long the compile thread waits for the engine's first run
CompileFn = Callable[[Callable[..., Any], str, bool], Callable[..., Any]]


# ----- the option --------------------------------------------------------------------------
def check_mode(mode: object) -> str:
    """The compile option as given, or InvalidRequest naming the choices."""
    if not isinstance(mode, str) or mode.strip().lower() not in COMPILE_MODES:
        raise InvalidRequest(
            f"compile must be one of {', '.join(COMPILE_MODES)} (got {mode!r}): 'auto' compiles "
            "where it pays (a CUDA GPU of compute capability 8.0+ with Triton and 4+ CPU "
            "cores), 'reduce-overhead' is torch.compile with CUDA graphs, 'default' without."
        )
    return mode.strip().lower()


def check_batches(batches: object, max_images: int | None = None) -> tuple[int, ...]:
    """The batch sizes to compile at each image size: sorted, 1 always among them, capped by
    the worker's max_images. Accepts a sequence of ints or a string like "1,2,4,8"."""
    if isinstance(batches, str):
        parts = [p.strip() for p in batches.split(",") if p.strip()]
        if not parts or not all(p.isdigit() for p in parts):
            raise InvalidRequest(
                f"compile batches must be whole numbers separated by commas, like "
                f"'1,2,4,8' (got {batches!r})."
            )
        values = [int(p) for p in parts]
    else:
        try:
            values = [int(b) for b in batches]  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise InvalidRequest(
                f"compile batches must be a list of whole numbers like [1, 2, 4, 8] "
                f"(got {batches!r})."
            ) from None
    if not values or any(not 1 <= v <= MAX_BATCH for v in values):
        raise InvalidRequest(f"compile batches must be 1..{MAX_BATCH} (got {values}).")
    cap = max_images if max_images is not None else MAX_BATCH
    return tuple(sorted({1} | {v for v in values if v <= cap}))


def _torch_version() -> tuple[int, int]:
    import torch

    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    try:
        return bool(has_triton())
    except Exception:  # noqa: BLE001 - a broken Triton is no Triton
        return False


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_mode(asked: str, device: str, device_map: str | None = None) -> tuple[str, str]:
    """(the mode to run, why). 'auto' is on only where it pays: a CUDA device of compute
    capability 8.0 or newer, with Triton, a torch >= 2.5, at least 4 CPU cores and no
    device_map; off on CPU and MPS. An explicit mode that cannot run is refused."""
    asked = check_mode(asked)
    if asked == "off":
        return "off", "off (asked for)"
    if device_map:
        if asked == "auto":
            return "off", "auto: off with device_map (the pipeline spans several devices)"
        raise InvalidRequest(
            f"compile={asked!r} does not go with device_map={device_map!r}: a compiled UNet "
            "runs on one device. Use one of them (compile='off' to keep device_map)."
        )
    if _torch_version() < _MIN_TORCH:
        if asked == "auto":
            return "off", f"auto: off with torch {_torch_version()} (needs 2.5 or newer)"
        raise InvalidRequest(
            f"compile={asked!r} needs torch 2.5 or newer; upgrade torch or use compile='off'.")
    if asked != "auto":
        return asked, f"{asked} (asked for)"
    if not device.startswith("cuda"):
        return "off", f"auto: off on {device} (compiling pays on CUDA GPUs)"
    import torch

    if not torch.cuda.is_available():
        return "off", "auto: off (CUDA is not available)"
    if not _has_triton():
        return "off", "auto: off (Triton is not installed; torch.compile needs it on GPUs)"
    idx = torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    cap = tuple(torch.cuda.get_device_capability(idx))
    name = torch.cuda.get_device_name(idx)
    if cap < _AUTO_MIN_CAPABILITY:
        return "off", (f"auto: off on {name} (compute capability {cap[0]}.{cap[1]}; on by "
                       "default from 8.0, or ask for compile='reduce-overhead')")
    if _cpus() < _AUTO_MIN_CPUS:
        return "off", (f"auto: off with {_cpus()} CPU cores (compiling would take the CPU "
                       "that feeds the GPU for minutes; ask for compile='reduce-overhead')")
    return "reduce-overhead", f"auto: CUDA graphs on {name}"


def check_sizes(sizes: object) -> tuple[tuple[int, int], ...]:
    """Image sizes to compile at start, "512x512,576x576" or pairs (none: the native one)."""
    if sizes is None:
        return ()
    items = [p.strip() for p in sizes.split(",") if p.strip()] if isinstance(sizes, str) \
        else list(sizes)  # type: ignore[call-overload]
    out = []
    for item in items:
        try:
            w, h = ((int(v) for v in item.lower().split("x")) if isinstance(item, str)
                    else (int(item[0]), int(item[1])))
        except (ValueError, TypeError, IndexError):
            raise InvalidRequest(f"compile sizes are WIDTHxHEIGHT, like '512x512,576x576' "
                                 f"(got {item!r}).") from None
        if not (64 <= w <= 4096 and 64 <= h <= 4096 and w % 8 == 0 and h % 8 == 0):
            raise InvalidRequest(f"compile size {w}x{h}: each side 64..4096, a multiple of 8.")
        out.append((w, h))
    if len(out) > MAX_SIZES:
        raise InvalidRequest(f"at most {MAX_SIZES} compile sizes.")
    return tuple(out)


def memory_format_for(device_type: str) -> str | None:
    """The memory format a compiled worker puts its UNet and decoder in on this device:
    ``"channels_last"`` on a GPU (measured faster compiled), None (as loaded) elsewhere."""
    return "channels_last" if device_type == "cuda" else None


def native_side(pipe: Any) -> int:
    """The model's own image side: 512 for SD 1.x, 1024 for SDXL (64..1024, a multiple of 8)."""
    side = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    return max(64, min(side, 1024)) // 8 * 8


def default_cache_dir() -> Path:
    from .tiny import cache_root

    return cache_root() / "compile"


# ----- shapes and their status -------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Shape:
    width: int
    height: int
    batch: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height} batch {self.batch}"


class ShapeState(enum.Enum):
    """Where one shape is. ``COMPILED``: the compile thread is done with it; ``READY``: the
    engine thread has also run it (its CUDA graphs recorded), so it is listed."""

    PENDING = "pending"
    COMPILING = "compiling"
    COMPILED = "compiled"
    READY = "ready"
    FAILED = "failed"


# the moves a shape may make (``Compiler._move``; any other is ignored: a shape that failed or
# was listed meanwhile stays so)
_MOVES: dict[ShapeState, frozenset[ShapeState]] = {
    ShapeState.PENDING: frozenset({ShapeState.COMPILING}),
    ShapeState.COMPILING: frozenset({ShapeState.COMPILED, ShapeState.FAILED}),
    ShapeState.COMPILED: frozenset({ShapeState.READY, ShapeState.FAILED}),
    ShapeState.READY: frozenset(),
    ShapeState.FAILED: frozenset(),
}
_DONE = (ShapeState.READY, ShapeState.FAILED)


@dataclass(frozen=True)
class JobPlan:
    """What the engine does for one job: unload LoRA adapters first (so the compiled graphs
    apply again), and whether calls of compiled shapes may run compiled."""

    unload_adapters: bool = False
    compiled: bool = False


_EAGER = JobPlan()


@dataclass
class _Attached:
    """The compiled state of one loaded model."""

    epoch: int
    model: str
    pipe: Any
    private: Any                     # the compile thread's own pipeline object (same modules)
    unet: Any
    decoder: Any | None              # None: the VAE decoder stays eager
    has_adapters: Callable[[], bool]
    native: int
    fns: dict[str, Any] = field(default_factory=dict)      # "unet"/"decoder" -> compiled
    run_only: dict[str, Any] = field(default_factory=dict)
    fullgraph: dict[str, bool] = field(default_factory=dict)
    ready_keys: dict[str, frozenset] = field(default_factory=dict)  # union of shape_keys
    shape_keys: dict[Any, dict[str, frozenset]] = field(default_factory=dict)  # per Shape

    def set_keys(self, shape: Any, keys: dict[str, frozenset] | None) -> None:
        """A shape's input keys (None: the shape is dropped); ``ready_keys``, which the
        dispatcher reads on every call, is their union."""
        if keys is None:
            self.shape_keys.pop(shape, None)
        else:
            self.shape_keys[shape] = keys
        self.ready_keys = {name: frozenset().union(*(k.get(name, frozenset())
                                                     for k in self.shape_keys.values()))
                           for name in self.fns}
    cache_dir: Path | None = None
    cache_known: frozenset[str] = frozenset()  # the folder's file names when they were loaded
    decoder_off: str | None = None   # why the decoder stays eager
    # ahead-of-time compiled calls (precompiled.py): name -> key -> function, the modes the
    # modules compile in, why a module compiles the traced way instead, and this shape's new
    # calls (written to its file once it warmed)
    aot: dict[str, dict[Any, Any]] = field(default_factory=dict)
    modes: dict[str, str] = field(default_factory=dict)
    aot_off: dict[str, str] = field(default_factory=dict)
    aot_new: list[Any] = field(default_factory=list)
    aot_known: frozenset[str] = frozenset()  # the folder's .aot files, loaded or written here


# ----- inputs as keys ----------------------------------------------------------------------
def _sig(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), tuple(value.stride()), str(value.dtype),
                str(value.device))
    if value is None or isinstance(value, bool | int | float | str):
        return ("V", value)
    if isinstance(value, dict):
        return ("D", tuple(sorted((str(k), _sig(v)) for k, v in value.items())))
    if isinstance(value, list | tuple):
        return ("L", tuple(_sig(v) for v in value))
    return ("O", type(value).__qualname__, id(value))  # never equal to a warmed call's key


def _key(args: tuple, kwargs: dict) -> tuple:
    return (tuple(_sig(a) for a in args),
            tuple(sorted((k, _sig(v)) for k, v in kwargs.items())))


def _float_timestep(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The UNet's timestep as float32 on the sample's device: exact, since its time embedding
    begins with ``timesteps.float()``; samplers with integer timesteps then share the graphs."""
    if len(args) >= 2:
        args = (args[0], _as_float(args[1], args[0]), *args[2:])
    elif "timestep" in kwargs:
        sample = args[0] if args else kwargs.get("sample")
        kwargs = {**kwargs, "timestep": _as_float(kwargs["timestep"], sample)}
    return args, kwargs


def _as_float(t: Any, sample: Any) -> Any:
    import torch

    if isinstance(t, torch.Tensor):
        return t if t.dtype == torch.float32 else t.to(torch.float32)
    if isinstance(t, int | float) and isinstance(sample, torch.Tensor):
        return torch.tensor(float(t), dtype=torch.float32, device=sample.device)
    return t


def _cloned(out: Any) -> Any:
    """A CUDA graph's outputs live in its pool and are overwritten by its next replay: hand out
    copies, so a sampler that keeps a model output across steps keeps the right one."""
    import torch

    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in out)
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        out.sample = sample.clone()
    return out


BACKEND_ENV = "COLABSWARM_COMPILE_BACKEND"


def _backend() -> str | None:
    """A dynamo backend instead of inductor (tests and CPU smoke runs), or None."""
    return os.environ.get(BACKEND_ENV) or None


def _torch_compile(fn: Callable[..., Any], mode: str, fullgraph: bool) -> Callable[..., Any]:
    import torch

    backend = _backend()
    if backend:  # tests and CPU smoke runs of the benchmarks: e.g. dynamo's "eager" backend
        return torch.compile(fn, backend=backend, fullgraph=fullgraph, dynamic=False)
    return torch.compile(fn, mode=None if mode == "default" else mode, fullgraph=fullgraph,
                         dynamic=False)


# ----- the cache ---------------------------------------------------------------------------
def cache_key(model: str, mode: str, pipe: Any) -> str:
    """The compile cache subfolder of this GPU, software, model and mode: a different GPU,
    torch, CUDA, Triton, diffusers, model (name, configuration, dtype) or mode never reads
    another's artifacts; nor does a worker with another memory layout (channels_last on a
    GPU, ``memory_format_for``). Readable prefix, then a hash of everything."""
    import torch

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:  # pragma: no cover - the engine needs it anyway
        diffusers_version = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    unet = pipe.unet
    device = unet.device
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        capability = list(torch.cuda.get_device_capability(device))
    else:
        gpu, capability = device.type, None
    vae = getattr(pipe, "vae", None)
    parts = {
        "format": _CACHE_FORMAT, "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton_version, "diffusers": diffusers_version,
        "python": list(sys.version_info[:2]), "gpu": gpu, "capability": capability,
        "model": model, "mode": mode, "dtype": str(unet.dtype), "pipeline": type(pipe).__name__,
        "layout": memory_format_for(device.type),
        "unet": dict(unet.config), "vae": dict(vae.config) if vae is not None else None,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{gpu}-torch{torch.__version__}-{model}-{mode}")
    return f"{slug.strip('-.')[:120]}-{digest[:16]}"


def cache_settings() -> None:
    """torch's compile caches on: inductor's FX graphs with their Triton kernels bundled in
    (so a cache file carries compiled kernels, not their source), and AOTAutograd's."""
    try:
        import torch._functorch.config as fcfg
        import torch._inductor.config as icfg
    except ImportError:  # pragma: no cover - torch without inductor
        return
    for name in ("fx_graph_cache", "bundle_triton_into_fx_graph_cache"):
        if hasattr(icfg, name):
            setattr(icfg, name, True)
    if hasattr(fcfg, "enable_autograd_cache"):
        fcfg.enable_autograd_cache = True


def _mega_cache() -> tuple[Any, Any] | None:
    import torch

    save = getattr(torch.compiler, "save_cache_artifacts", None)
    load = getattr(torch.compiler, "load_cache_artifacts", None)
    return (save, load) if save is not None and load is not None else None


def _cache_counts() -> tuple[int, int]:
    """(hits, misses) of inductor's and AOTAutograd's caches so far in this process."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0, 0
    ind, aot = counters["inductor"], counters["aot_autograd"]
    return (int(ind.get("fxgraph_cache_hit", 0) + aot.get("autograd_cache_hit", 0)),
            int(ind.get("fxgraph_cache_miss", 0) + aot.get("autograd_cache_miss", 0)))


# where a shape's compile time goes: dynamo's own timers (cumulative for the process)
_PHASES = (("tracing", "bytecode_tracing"), ("AOT", "create_aot_dispatcher_function"),
           ("inductor", "compile_fx_inner"), ("kernels", "async_compile.wait"))


def _compile_timers() -> dict[str, float]:
    """Dynamo's cumulative compile timers of this process, for the phases in ``_PHASES``
    (empty where this torch has none)."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
        got = dict(zip(names, values, strict=False))
    except Exception:  # noqa: BLE001 - a diagnostic only
        return {}
    out: dict[str, float] = {}
    for label, key in _PHASES:
        try:
            out[label] = float(got.get(key, 0.0))
        except (TypeError, ValueError):
            continue
    return out


def _phase_text(before: dict[str, float], after: dict[str, float]) -> str:
    parts = [f"{label} {after[label] - before.get(label, 0.0):.1f} s"
             for label, _ in _PHASES if label in after]
    return f" ({', '.join(parts)})" if parts else ""


# A torch bug this keeps away: with a CUDA build of torch and no GPU visible (a CPU machine
# with CUDA torch; CUDA_VISIBLE_DEVICES=""), dynamo's FakeTensorMode swaps the CUDA device
# guard for a no-op one that the *calling thread* owns (a thread_local in c10's
# ensureCUDADeviceGuardSet) and puts it in the process-wide registry. When that thread ends,
# the registry points at freed memory, and the next thread that traces dies with a
# segmentation fault. On a CPU the compile thread ends whenever its queue is empty, so the
# second compile thread of a worker (a new size, a second model) crashed the whole process
# (bench/diag_fake_guard.py shows it). A thread that lives as long as the process sets the
# guard first; FakeTensorMode then finds it set and swaps nothing.
_guard_keeper: threading.Thread | None = None
_guard_lock = threading.Lock()


def _keep_cuda_guard() -> None:
    """Set the no-op CUDA device guard from a thread that never ends (once per process),
    where a CUDA build of torch sees no GPU. Nothing to do where torch sees a GPU."""
    global _guard_keeper
    if _guard_keeper is not None:  # once per process
        return
    import torch

    ensure = getattr(torch._C, "_ensureCUDADeviceGuardSet", None)
    if ensure is None or torch.cuda.is_available():
        return
    with _guard_lock:
        if _guard_keeper is not None:
            return
        done = threading.Event()

        def keep() -> None:
            try:
                ensure()
            except Exception:  # noqa: BLE001 - compiling goes on, unprotected; said so
                log.warning("could not set the CUDA device guard; a second compile thread may "
                            "crash this process", exc_info=True)
            finally:
                done.set()
            threading.Event().wait()  # lives, idle, as long as the process

        _guard_keeper = threading.Thread(target=keep, name="colabswarm-cuda-guard",
                                         daemon=True)
        _guard_keeper.start()
        done.wait()


# The interpreter's switch interval while a shape compiles. Tracing and inductor's code
# generation are pure Python on the compile thread; the engine thread's eager jobs give up the
# GIL in every torch op and then wait up to the switch interval (Python's 5 ms) to get it back,
# so jobs served while a shape compiled crawled. A shorter interval hands it back sooner and
# costs the compile what the jobs then take; with no jobs it changes nothing (the GIL is only
# handed over when another thread asks). 0.5 ms is the middle of what was measured
# (docs/BENCHMARKS.md, "Jobs served while compiling").
SWITCH_ENV = "COLABSWARM_COMPILE_SWITCH_MS"
COMPILE_SWITCH_S = 0.0005
_SWITCH_RANGE_MS = (0.01, 5.0)  # 10 us to Python's default
_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved: float | None = None  # the interval before the first compile thread set one
_switch_set: float | None = None    # the interval it set


def _compile_switch_s() -> float | None:
    """The switch interval to use while compiling (None: leave it), from ``SWITCH_ENV`` where
    set (milliseconds; "off", "no", "false" or 0 and below leave it), else
    ``COMPILE_SWITCH_S``. A value that is no number, or is clamped, is warned about."""
    raw = os.environ.get(SWITCH_ENV, "").strip().lower()
    if not raw:
        return COMPILE_SWITCH_S
    if raw in ("off", "no", "false", "none"):
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = float("nan")
    if ms <= 0:
        return None
    low, high = _SWITCH_RANGE_MS
    if not ms < float("inf"):  # NaN, inf, no number
        why, use = "is not a number of milliseconds nor 'off'", COMPILE_SWITCH_S * 1000
    elif not low <= ms <= high:
        why, use = f"is outside {low}-{high} ms", min(max(ms, low), high)
    else:
        return ms / 1000
    log.warning("%s=%r %s; using %.2f ms", SWITCH_ENV, raw, why, use)
    return use / 1000


@contextmanager
def _engine_first(want: float | None) -> Iterator[None]:
    """While a shape compiles: the switch interval ``want`` (None: as it is). Process-wide: the
    first of several compile threads saves the interval and the last one out restores it,
    unless someone else changed it meanwhile."""
    global _switch_users, _switch_saved, _switch_set
    if want is None:
        yield
        return
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(want, _switch_saved))
            _switch_set = sys.getswitchinterval()
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                if _switch_saved is not None and sys.getswitchinterval() == _switch_set:
                    sys.setswitchinterval(_switch_saved)
                _switch_saved = _switch_set = None


# ----- the compiler ------------------------------------------------------------------------
class Compiler:
    """One engine's compiled path. ``mode`` is what to run ('off', 'reduce-overhead' or
    'default', after ``choose_mode``); ``why`` says how it was chosen. ``compile_fn`` is the
    test seam: ``compile_fn(fn, mode, fullgraph)`` instead of ``torch.compile``."""

    def __init__(self, mode: str, why: str = "", *, batches: tuple[int, ...] = DEFAULT_BATCHES,
                 sizes: tuple[tuple[int, int], ...] = (),
                 cache_dir: str | os.PathLike[str] | None = None,
                 compile_fn: CompileFn | None = None, max_sizes: int = MAX_SIZES,
                 background: bool = True) -> None:
        if mode not in ("off", "reduce-overhead", "default"):
            raise InvalidRequest(f"unknown compile mode {mode!r}")
        self.mode, self.why = mode, why
        self.batches = check_batches(batches)
        self.sizes = check_sizes(sizes)
        self.max_sizes = max_sizes
        self.background = background
        self.cache_dir = Path(os.path.expanduser(os.fspath(cache_dir))) if cache_dir else None
        self._compile_fn = compile_fn or _torch_compile
        self._lock = threading.Lock()       # compile/warm-up vs compiled calls and UNet changes
        self._want = threading.Event()      # the compile thread waits for _lock: yield it
        self._cv = threading.Condition()
        self._tasks: deque[tuple[int, Shape | None]] = deque()  # (epoch, shape); None: reset
        self._status: dict[Shape, ShapeState] = {}  # changed by _move alone
        self._errors: dict[Shape, str] = {}
        self._sizes: list[tuple[int, int]] = []
        self._seconds: dict[Shape, float] = {}
        self._tls = threading.local()
        self._att: _Attached | None = None
        self._epoch = 0
        self._thread: threading.Thread | None = None
        self._closing = False
        self._started_at: float | None = None
        self.calls: Counter[str] = Counter()  # compiled / eager calls, for tests and benches
        # this process's compile cache files: <run id>-001.bin, -002.bin, ... one per save
        self._run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
        self._saves = 0
        self._adapters_in = False  # the compile thread waits for a job to unload LoRAs
        self._switch_s = _compile_switch_s()  # read once: the env is the owner's, per worker
        # shapes compiled ahead of time, saved and loaded without tracing (precompiled.py);
        # not with the test seam, whose stand-in backends torch cannot save
        self._aot = compile_fn is None and precompiled.supported()
        if self.on:
            self._setup_caches()

    @property
    def on(self) -> bool:
        return self.mode != "off"

    # ----- what the engine calls -----------------------------------------------------------
    def attach(self, pipe: Any, model: str, has_adapters: Callable[[], bool]) -> None:
        """A model was loaded (engine thread): install the dispatchers, queue its native size."""
        if not self.on:
            return
        import torch

        with self._lock:
            self._epoch += 1
            unet = pipe.unet
            vae = getattr(pipe, "vae", None)
            # SDXL pipelines cast an fp16 VAE to fp32 around each decode and back: a compiled
            # decoder would see its weights change under it every call, so it stays eager
            upcasts = (vae is not None and vae.dtype == torch.float16
                       and bool(getattr(vae.config, "force_upcast", False))
                       and hasattr(type(pipe), "upcast_vae"))
            decoder = getattr(vae, "decoder", None) if vae is not None and not upcasts else None
            # the same modules under a pipeline object of its own (its own scheduler and
            # progress state). Not ``from_pipe``: it casts the shared modules to float32 unless
            # given a dtype, which turned an fp16 worker into a slow fp32 one
            private = _quietly(type(pipe), **{**pipe.components,
                                              "scheduler": copy.deepcopy(pipe.scheduler)})
            private.set_progress_bar_config(disable=True)
            att = _Attached(self._epoch, model, pipe, private, unet, decoder, has_adapters,
                            native_side(pipe))
            # frozen, as peft leaves them after a LoRA was loaded and unloaded: dynamo guards
            # on requires_grad, and the graphs must still apply after a LoRA job
            unet.requires_grad_(False)
            if decoder is not None:
                decoder.requires_grad_(False)
            if memory_format_for(unet.device.type) == "channels_last":
                unet.to(memory_format=torch.channels_last)
                if decoder is not None:
                    decoder.to(memory_format=torch.channels_last)
            self._install(att, "unet", unet, self.mode)
            if decoder is not None:  # the decoder runs once per job: graphs do not pay there
                self._install(att, "decoder", decoder, "default")
            self._att = att
            with self._cv:
                self._status.clear()
                self._errors.clear()
                self._seconds.clear()
                self._sizes = []
            self._started_at = time.monotonic()
            for w, h in self.sizes or ((att.native, att.native),):
                self._queue_size(w, h)
            limit = max(64, 4 * self.max_sizes * len(self.batches))
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name,
                            max(getattr(torch._dynamo.config, name), limit))
        log.info("compile (%s): %d shapes of %s queued", self.why or self.mode,
                 len(self._status), model)
        if self.background:
            self._start_thread()

    def compile_now(self) -> None:
        """Compile every queued shape on this thread (benchmarks: ``background=False``)."""
        while True:
            with self._cv:
                if not self._tasks:
                    return
                epoch, shape = self._tasks.popleft()
            with self._lock:
                if shape is None:
                    self._reset()
                elif self._att is not None and epoch == self._epoch:
                    self._compile_shape(self._att, shape)
                    if self._status.get(shape) is ShapeState.COMPILED:
                        self._first_run(self._att, shape)

    def settle(self) -> float | None:
        """Between jobs, on the engine thread: run one compiled shape that the engine has not
        run yet (its CUDA graphs are recorded then, not in a user's job) and list it. Returns
        when to call again: 0 when another may be waiting, ``IDLE_POLL_S`` while shapes are
        still being compiled or the compile thread holds the lock, None when nothing is left
        to do."""
        att = self._att
        if not self.on or att is None or self._closing:
            return None
        shape = self._first_run_due()
        if shape is None:
            with self._cv:
                waiting = any(st not in _DONE for st in self._status.values())
            # shapes on their way, or a first run kept back while LoRA adapters are in
            return IDLE_POLL_S if waiting and self.background else None
        if not self._lock.acquire(blocking=False):
            return IDLE_POLL_S
        try:
            if att is self._att and att.epoch == self._epoch:
                self._first_run(att, shape)
        finally:
            self._lock.release()
        return 0.0

    def detach(self) -> None:
        """The model is being swapped out (engine thread): back to eager modules; compiled
        state is dropped (a shape being compiled is waited for)."""
        if not self.on or self._att is None:
            return
        if not self._lock.acquire(blocking=False):
            log.info("switching models waits for the compile of the current shape to finish")
            self._lock.acquire()
        try:
            att, self._att = self._att, None
            for name in ("unet", "decoder"):
                module = att.unet if name == "unet" else att.decoder
                if module is not None:
                    module.__dict__.pop("forward", None)
            self._epoch += 1
            with self._cv:
                self._status.clear()
                self._sizes = []
                self._tasks.clear()
                self._tasks.append((self._epoch, None))  # reset dynamo's caches first
                self._adapters_in = False
                self._cv.notify_all()
            _reset_cudagraph_trees()  # CUDA graph trees are per thread: this one's, now
        finally:
            self._lock.release()
        self._start_thread()

    @contextmanager
    def job(self, width: int, height: int, images: int, *, loras: bool,
            adapters_loaded: bool) -> Iterator[JobPlan]:
        """Around one pipeline call of the engine thread. See the module docstring."""
        att = self._att
        if not self.on or att is None:
            yield _EAGER
            return
        self._note_size(att, width, height)
        changes_unet = loras or adapters_loaded
        if changes_unet:
            if not self._lock.acquire(blocking=False):
                log.info("a job with LoRAs waits for the compile of the current shape")
                self._lock.acquire()
            held, plan = True, JobPlan(unload_adapters=adapters_loaded and not loras,
                                       compiled=not loras)
        else:
            held = not self._want.is_set() and self._lock.acquire(blocking=False)
            plan = JobPlan(compiled=held)
        unet_before = self.calls["compiled unet"]
        try:
            self._tls.mode = "run" if plan.compiled else "eager"
            try:
                yield plan
            finally:
                self._tls.mode = None
            if self.calls["compiled unet"] - unet_before >= FIRST_RUN_STEPS:
                # this job made the shape's first run itself: it is ready to be listed
                self._move(Shape(width, height, images), ShapeState.READY)
        finally:
            if held:
                self._lock.release()
            if plan.unload_adapters:
                with self._cv:
                    self._adapters_in = False
                    self._cv.notify_all()
                self._start_thread()

    def info(self) -> CompileInfo:
        if not self.on:
            return CompileInfo(mode="off", state="off", detail=self.why[:300] or None)
        with self._cv:
            status = dict(self._status)
            sizes = list(self._sizes)
            errors = dict(self._errors)
        shapes = []
        for w, h in sizes:
            mine = {s: st for s, st in status.items() if (s.width, s.height) == (w, h)}
            done = all(st in _DONE for st in mine.values())
            ready = sorted(s.batch for s, st in mine.items() if st is ShapeState.READY)
            if mine and done and 1 in ready:
                shapes.append(CompiledShape(width=w, height=h, batches=ready))
        total = len(status)
        finished = sum(st in _DONE for st in status.values())
        failed = [s for s, st in status.items() if st is ShapeState.FAILED]
        if self._att is None:
            state, detail = "compiling", "waiting for the model to load"
        elif finished < total:
            now = next((s for s, st in status.items() if st is ShapeState.COMPILING), None)
            first = next((s for s, st in status.items() if st is ShapeState.COMPILED), None)
            state = "compiling"
            detail = f"compiling {finished}/{total} shapes" + (
                f" (now {now})" if now else f" (first run of {first})" if first else "")
        elif shapes:
            state = "ready"
            secs = round(time.monotonic() - (self._started_at or time.monotonic()))
            detail = f"{total - len(failed)}/{total} shapes compiled ({secs} s)"
        else:
            state, detail = "failed", f"no shape compiled ({total} tried)"
        if failed:
            first = failed[0]
            detail += f"; {len(failed)} failed, {first}: {errors.get(first, '?')}"
        att = self._att
        if att is not None and att.decoder_off:
            detail += f"; VAE decoder eager ({att.decoder_off})"
        detail = f"{self.why}; {detail}" if self.why.startswith("auto") else detail
        if len(detail) > 300:
            detail = detail[:299] + "…"
        return CompileInfo(mode=self.mode, state=state, detail=detail, shapes=shapes)

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._tasks.clear()
            self._cv.notify_all()

    # ----- dispatch ------------------------------------------------------------------------
    def _install(self, att: _Attached, name: str, module: Any, mode: str) -> None:
        import torch

        orig = type(module).forward
        att.fullgraph[name] = True
        att.modes[name] = mode
        att.aot[name] = {}
        att.fns[name] = self._compile_fn(orig, mode, True)
        att.run_only[name] = torch._dynamo.run(att.fns[name])
        att.ready_keys[name] = frozenset()
        clone = name == "unet" and mode == "reduce-overhead"
        tls, calls = self._tls, self.calls

        def forward(*args: Any, **kwargs: Any) -> Any:
            how = getattr(tls, "mode", None)
            if how is None or att.epoch != self._epoch:
                return orig(module, *args, **kwargs)
            if how == "eager":
                calls["eager"] += 1
                return orig(module, *args, **kwargs)
            a, k = _float_timestep(args, kwargs) if name == "unet" else (args, kwargs)
            key = _key(a, k)
            if how == "compile":
                if tls.compiling != name:
                    return orig(module, *args, **kwargs)
                tls.keys[name].add(key)
                out = self._compile_call(att, name, module, key, a, k)
            elif key in att.ready_keys[name]:
                calls["compiled"] += 1
                calls[f"compiled {name}"] += 1
                ahead = att.aot[name].get(key)
                out = (precompiled.call(ahead, module, a, k) if ahead is not None
                       else att.run_only[name](module, *a, **k))
            else:
                calls["eager"] += 1
                return orig(module, *args, **kwargs)
            return _cloned(out) if clone else out

        module.forward = forward

    def _compile_call(self, att: _Attached, name: str, module: Any, key: Any, args: tuple,
                      kwargs: dict) -> Any:
        """One call of the compile thread's warm run: compiled ahead of time where it can be
        (loaded from the shape's file, or compiled now and kept for its file), else traced."""
        ahead = att.aot[name].get(key)
        if ahead is None and self._aot and name not in att.aot_off and att.fullgraph[name] \
                and _savable(key):
            try:
                ahead = precompiled.compile_call(type(module).forward, att.modes[name],
                                                 _backend(), module, args, kwargs)
            except Exception as exc:
                if _is_graph_break(exc):
                    raise  # _warm compiles it with breaks, the traced way
                _aot_off(att, name, exc, "did not compile ahead of time")
            else:
                self.calls[f"aot compiled {name}"] += 1
                att.aot[name][key] = ahead
                att.aot_new.append((name, key, ahead))
        if ahead is not None:
            try:
                return precompiled.call(ahead, module, args, kwargs)
            except Exception as exc:  # noqa: BLE001 - torch's AOT path is experimental
                # compiled or loaded, but does not run: this call, and the module's calls
                # compiled from now on, go the traced way (shapes whose loaded calls already
                # ran keep them)
                att.aot[name].pop(key, None)
                att.aot_new = [e for e in att.aot_new if e[1] != key or e[0] != name]
                _aot_off(att, name, exc, "compiled ahead of time did not run")
        return att.fns[name](module, *args, **kwargs)

    # ----- queue -----------------------------------------------------------------------------
    def _note_size(self, att: _Attached, width: int, height: int) -> None:
        with self._cv:
            if (width, height) in self._sizes or len(self._sizes) >= self.max_sizes:
                return
        self._queue_size(width, height)
        log.info("compile: %dx%d queued (a job of that size runs eagerly meanwhile)", width,
                 height)

    def _queue_size(self, width: int, height: int) -> None:
        with self._cv:
            if (width, height) in self._sizes:
                return
            self._sizes.append((width, height))
            for b in self.batches:
                shape = Shape(width, height, b)
                self._status[shape] = ShapeState.PENDING  # a new entry
                self._tasks.append((self._epoch, shape))
            self._cv.notify_all()
        self._start_thread()

    def _start_thread(self) -> None:
        """Start the compile thread if there is work and none runs. On a CPU it ends when the
        queue is empty: a thread that ran torch ops and lives on idle keeps its own OpenMP
        team, which made the engine thread's jobs three times slower (bench/diag_compile.py).
        On a GPU it waits for more work instead (``_stays``)."""
        with self._cv:
            if not self.background or self._closing or not self._tasks:
                return
            if self._thread is None or not self._thread.is_alive():
                _keep_cuda_guard()
                self._thread = threading.Thread(target=self._work, name="colabswarm-compile",
                                                daemon=True)
                self._thread.start()

    # ----- the compile thread ----------------------------------------------------------------
    def _stays(self) -> bool:
        """Whether the compile thread waits for more work rather than ending: on a GPU, where
        a thread's end tears down its CUDA state (graph tree, memory pool) at a moment that
        may fall in the engine thread's recording of CUDA graphs."""
        att = self._att
        return att is not None and getattr(att.unet.device, "type", "cpu") == "cuda"

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._closing and self._stays() and (
                        not self._tasks or self._adapters_in):
                    self._cv.wait()
                if self._closing or not self._tasks:
                    self._thread = None
                    return
                epoch, shape = self._tasks.popleft()
            # the engine's first run of the shape just compiled goes before the next shape, so
            # shapes are listed as they finish (at most ENGINE_TURN_S: a busy engine makes it
            # at its next job boundary)
            with self._cv:
                self._cv.wait_for(lambda: self._first_run_due() is None, ENGINE_TURN_S)
            self._want.set()
            self._lock.acquire()
            self._want.clear()
            try:
                if shape is None:
                    self._reset()
                    continue
                att = self._att
                if att is None or att.epoch != epoch or epoch != self._epoch:
                    continue  # a model swapped out meanwhile
                if att.has_adapters():
                    # LoRA adapters are in the UNet: compile once a plain job has unloaded them
                    # (that job starts the thread again, or on a GPU wakes it)
                    with self._cv:
                        self._tasks.appendleft((epoch, shape))
                        if not self._stays():
                            self._thread = None
                            return
                        self._adapters_in = True
                    continue
                with _engine_first(self._switch_s):
                    self._compile_shape(att, shape)
            except Exception:  # noqa: BLE001 - the thread must live on; the shape is marked
                log.exception("compile thread: unexpected error")
            finally:
                self._lock.release()

    def _compile_shape(self, att: _Attached, shape: Shape) -> None:
        if att.cache_dir is None:
            att.cache_dir = self._load_cache(att)
        self._move(shape, ShapeState.COMPILING)
        _forget_unsaved_artifacts()  # this shape's file holds what this shape compiles
        t0 = time.perf_counter()
        hits, misses = _cache_counts()
        timers = _compile_timers()
        att.aot_new.clear()
        loaded = self._load_shape(att, shape)
        for name, _, _ in loaded:
            self.calls[f"aot loaded {name}"] += 1
        try:
            keys = self._warm(att, shape)
        except Exception as exc:  # noqa: BLE001 - any failure: that shape stays eager
            from .jobs import public_error

            why = public_error(exc)
            log.warning("compile of %s failed, it runs eagerly: %s", shape, why, exc_info=True)
            self._move(shape, ShapeState.FAILED, why)
            self._free_after_failure()
            return
        seconds = time.perf_counter() - t0
        hits2, misses2 = _cache_counts()
        # loaded calls that ran (one that raised was dropped and traced instead)
        ran = [e for e in loaded if att.aot[e[0]].get(e[1]) is e[2]]
        from_cache = (ran and not att.aot_new) or (hits2 > hits and misses2 == misses)
        log.info("compiled %s in %.1f s%s%s", shape, seconds,
                 " from the cache" if from_cache else "",
                 f" (loaded ahead-of-time compiled: {len(ran)} calls)" if ran
                 else _phase_text(timers, _compile_timers()))
        if att.aot_new:
            self._save_shape(att, shape)
        # written before "ready": a worker stopped then keeps the shape. A shape served by
        # this machine's own inductor cache (hits, no misses) is written too when the folder
        # has no file of it (a new or emptied Drive folder on the same machine)
        if misses2 > misses or (hits2 > hits and not _has_file(att, shape)):
            self._save_cache(att, shape)
        att.set_keys(shape, {name: frozenset(found) for name, found in keys.items()})
        with self._cv:
            self._seconds[shape] = round(seconds, 2)
        self._move(shape, ShapeState.COMPILED)

    def _move(self, shape: Shape, to: ShapeState, why: str = "") -> bool:
        """The one place a shape's state changes, by ``_MOVES``; False (and no change) for a
        move the table does not allow. Wakes whoever waits on the states."""
        with self._cv:
            now = self._status.get(shape)
            if now is None or to not in _MOVES[now]:
                return False
            self._status[shape] = to
            if to is ShapeState.FAILED:
                self._errors[shape] = why[:120]
            self._cv.notify_all()
            return True

    def _first_run_due(self) -> Shape | None:
        """A shape the compile thread is done with and the engine has not run yet, if its first
        run can be made now (none while LoRA adapters are loaded)."""
        att = self._att
        if att is None or self._closing or att.has_adapters():
            return None
        with self._cv:
            return next((s for s, st in self._status.items() if st is ShapeState.COMPILED),
                        None)

    def _first_run(self, att: _Attached, shape: Shape) -> None:
        """The shape's first compiled run on this (the engine's) thread, with the compile lock
        held: ``FIRST_RUN_STEPS`` UNet calls as a job makes them (the decoder has no CUDA
        graphs, so it needs none). Then the shape is listed. Should it fail, the shape is
        dropped (it runs eagerly) and said so."""
        t0 = time.perf_counter()
        before = self.calls["compiled unet"]
        self._tls.mode = "run"
        try:
            self._latents(att, shape, FIRST_RUN_STEPS)
        except Exception as exc:  # noqa: BLE001 - that shape runs eagerly from now on
            from .jobs import public_error

            why = public_error(exc)
            log.warning("the first run of %s failed, it runs eagerly: %s", shape, why,
                        exc_info=True)
            att.set_keys(shape, None)
            self._move(shape, ShapeState.FAILED, why)
            self._free_after_failure()
            return
        finally:
            self._tls.mode = None
        ran = self.calls["compiled unet"] - before
        if ran < FIRST_RUN_STEPS:  # its calls did not match the compiled ones: says so
            log.warning("the first run of %s ran %d of its %d UNet calls compiled", shape, ran,
                        FIRST_RUN_STEPS)
        log.info("first run of %s on the engine thread in %.2f s", shape,
                 time.perf_counter() - t0)
        self._move(shape, ShapeState.READY)

    def _warm(self, att: _Attached, shape: Shape) -> dict[str, set]:
        """Compile one shape with the compile thread's own pipeline object: one call of one
        step compiles it and runs it once (CUDA graphs are the engine thread's to record).
        Returns the input keys the compiled modules saw. The decoder failing leaves it eager
        (from then on, for this model); the UNet failing fails the shape."""
        keys: dict[str, set] = {name: set() for name in att.fns}
        self._tls.keys = keys
        try:
            latents = self._compiling(att, "unet", self._latents, att, shape, 1)
            if "decoder" in att.fns and att.decoder_off is None:
                self._warm_decoder(att, latents, keys)
        except Exception as exc:
            if att.fullgraph.get("unet") and _is_graph_break(exc):
                log.info("the UNet does not compile as one graph here; compiling with breaks")
                self._recompile(att, "unet", fullgraph=False)
                return self._warm(att, shape)
            raise
        return keys

    def _warm_decoder(self, att: _Attached, latents: Any, keys: dict[str, set]) -> None:
        try:
            self._compiling(att, "decoder", self._decode, att, latents)
        except Exception as exc:  # noqa: BLE001 - the decoder then stays eager
            if att.fullgraph.get("decoder") and _is_graph_break(exc):
                self._recompile(att, "decoder", fullgraph=False)
                return self._warm_decoder(att, latents, keys)
            from .jobs import public_error

            att.decoder_off = public_error(exc)[:120]
            keys["decoder"].clear()
            log.warning("the VAE decoder did not compile (%s); it runs eagerly for this model",
                        att.decoder_off, exc_info=True)

    def _recompile(self, att: _Attached, name: str, fullgraph: bool) -> None:
        import torch

        module = att.unet if name == "unet" else att.decoder
        mode = self.mode if name == "unet" else "default"
        att.fullgraph[name] = fullgraph
        att.fns[name] = self._compile_fn(type(module).forward, mode, fullgraph)
        att.run_only[name] = torch._dynamo.run(att.fns[name])

    def _compiling(self, att: _Attached, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) with `name`'s calls going to its compiled function (this thread only)."""
        self._tls.mode, self._tls.compiling = "compile", name
        try:
            return fn(*args)
        finally:
            self._tls.mode = self._tls.compiling = None

    def _latents(self, att: _Attached, shape: Shape, steps: int) -> Any:
        """txt2img latents of this shape (CFG on, so the UNet sees twice the batch, as in a
        job). Prompt embeddings are made up (no tokenizer call from this thread); their shapes
        and dtypes are the pipeline's own."""
        import torch

        pipe, unet = att.private, att.unet
        n = shape.batch
        text_dtype = getattr(getattr(pipe, "text_encoder_2", None) or
                             getattr(pipe, "text_encoder", None), "dtype", unet.dtype)
        seq = int(getattr(getattr(pipe, "tokenizer", None), "model_max_length", 77) or 77)
        seq = seq if 0 < seq <= 512 else 77
        dim = int(unet.config.cross_attention_dim)
        embeds = torch.zeros(n, seq, dim, dtype=text_dtype, device=unet.device)
        kw: dict[str, Any] = dict(prompt_embeds=embeds, negative_prompt_embeds=embeds.clone())
        enc2 = getattr(pipe, "text_encoder_2", None)
        if enc2 is not None:
            pooled = torch.zeros(n, int(enc2.config.projection_dim), dtype=enc2.dtype,
                                 device=unet.device)
            kw.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=pooled.clone())
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(n)]
        with torch.inference_mode():
            latents = pipe(**kw, num_inference_steps=steps, guidance_scale=7.0,
                           width=shape.width, height=shape.height, generator=gens,
                           output_type="latent").images
            if unet.device.type == "cuda":
                torch.cuda.synchronize(unet.device)
        return latents

    def _decode(self, att: _Attached, latents: Any) -> None:
        """The VAE decode of those latents, as the pipeline calls it."""
        import torch

        vae = att.private.vae
        with torch.inference_mode():
            vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)
            if latents.device.type == "cuda":
                torch.cuda.synchronize(latents.device)

    def _reset(self) -> None:
        """Forget compiled code (after a model swap): dynamo's caches and the CUDA graphs this
        thread recorded."""
        import torch

        torch._dynamo.reset()
        _reset_cudagraph_trees()

    def _free_after_failure(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ----- cache -----------------------------------------------------------------------------
    def _setup_caches(self) -> None:
        """Inductor's caches in colabswarm's cache folder (unless the owner set one); the
        compile cache folder holds the portable artifact files."""
        from .tiny import cache_root

        if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
            local = cache_root() / "torchinductor"
            if _mega_cache() is None and self.cache_dir is not None:
                local = self.cache_dir / "inductor"  # no portable files: the folder itself
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(local)
        cache_settings()

    def _load_cache(self, att: _Attached) -> Path | None:
        """Read this model's artifact files (compile thread, before its first shape)."""
        if _mega_cache() is None or self.cache_dir is None:
            return Path()
        folder = self.cache_dir / cache_key(att.model, self.mode, att.pipe)
        t0 = time.perf_counter()
        names = _listing(folder)  # once: a Drive folder lists slowly
        att.cache_known = frozenset(n for n in names if n.endswith(".bin"))
        att.aot_known = frozenset(n for n in names if n.endswith(precompiled.SUFFIX))
        loaded, found = read_artifacts(folder)
        if found:
            log.info("compile cache: loaded %d of %d files from %s in %.1f s", loaded, found,
                     folder, time.perf_counter() - t0)
        return folder

    def _save_cache(self, att: _Attached, shape: Shape) -> None:
        """What compiling `shape` added to torch's caches, as a new file of the model's cache
        folder, unless another worker sharing the folder wrote that shape since it was read
        (both compiled it at once: one copy is enough, and duplicates would push useful files
        out of the newest ``_MAX_CACHE_FILES``). A file that was there when this worker loaded
        the folder and still missed is no reason not to write: it did not serve."""
        folder = att.cache_dir
        if _mega_cache() is None or not folder or folder == Path():
            return
        if _written_meanwhile(folder, shape, ".bin", att.cache_known):
            # this shape is in that file; what it recorded is dropped before the next shape is
            # compiled, and bytes of an earlier failed write stay for the next file
            return
        try:
            path = write_artifacts(folder, self._file_name(shape, ".bin"))
        except Exception:  # noqa: BLE001 - the worker runs on without it
            log.warning("compile cache: could not write to %s", folder, exc_info=True)
            return
        if path is not None:
            log.info("compile cache: wrote %s (%.1f MiB)", path, path.stat().st_size / 2**20)

    def _file_name(self, shape: Shape, suffix: str) -> str:
        """A new file's name in the cache folder: the shape, this run, the save's number."""
        self._saves += 1
        return f"{_shape_prefix(shape)}{self._run_id}-{self._saves:03d}{suffix}"

    def _forwards(self, att: _Attached) -> dict[str, Callable[..., Any]]:
        out = {"unet": type(att.unet).forward}
        if att.decoder is not None:
            out["decoder"] = type(att.decoder).forward
        return out

    def _load_shape(self, att: _Attached, shape: Shape) -> list[precompiled.Entry]:
        """The shape's ahead-of-time compiled calls from its files in the cache folder (the
        newest few), installed for the warm run that follows; [] where there are none."""
        folder = att.cache_dir
        if not self._aot or not folder or folder == Path():
            return []
        prefix = _shape_prefix(shape)
        # the folder was listed once, when it was read (aot_known): no listing per shape of a
        # Drive folder; names hold the run's start time, so they sort oldest first
        names = sorted(n for n in att.aot_known if n.startswith(prefix))[-_MAX_SHAPE_FILES:]
        if not names:
            return []
        forwards = self._forwards(att)
        loaded: list[precompiled.Entry] = []
        for path in (folder / n for n in names):
            try:
                if path.stat().st_size > _MAX_CACHE_FILE:
                    log.warning("compile cache: %s is too large; skipped", path)
                    continue
                entries = precompiled.loads(path.read_bytes(), forwards, att.modes)
            except (OSError, precompiled.Unavailable) as exc:
                log.warning("compile cache: %s not loaded (%s); compiling instead", path, exc)
                continue
            for name, key, fn in entries:
                if name in att.aot and name not in att.aot_off:
                    att.aot[name][key] = fn
                    loaded.append((name, key, fn))
        return loaded

    def _save_shape(self, att: _Attached, shape: Shape) -> None:
        """The calls this shape compiled ahead of time, as a new file of the cache folder;
        none when another worker sharing the folder wrote this shape's file since this one
        read it (as ``_save_cache``: one copy is enough)."""
        folder = att.cache_dir
        new, att.aot_new = list(att.aot_new), []
        if not folder or folder == Path():
            return
        if _written_meanwhile(folder, shape, precompiled.SUFFIX, att.aot_known):
            return
        try:
            data = precompiled.dumps(new, self._forwards(att))
            name = self._file_name(shape, precompiled.SUFFIX)
            _write_whole(folder, name, data)
        except (OSError, precompiled.Unavailable) as exc:
            log.warning("compile cache: %s not saved ahead-of-time compiled (%s)", shape, exc)
            return
        att.aot_known = att.aot_known | {name}
        log.info("compile cache: wrote %s (%.1f MiB)", folder / name, len(data) / 2**20)


def _aot_off(att: _Attached, name: str, exc: BaseException, what: str) -> None:
    """From now on `name` compiles the traced way, and the log says why."""
    from .jobs import public_error

    att.aot_off[name] = public_error(exc)[:120]
    log.info("the %s %s (%s); it compiles the traced way", name, what, att.aot_off[name],
             exc_info=True)


def _savable(key: Any) -> bool:
    """Whether a call's key is the same in another process (no object identities in it)."""
    if isinstance(key, tuple):
        if len(key) == 3 and key[0] == "O":
            return False
        return all(_savable(k) for k in key)
    return True


def _shape_prefix(shape: Shape) -> str:
    """The start of a cache file's name for `shape` (then the run id and save number)."""
    return f"{shape.width}x{shape.height}-b{shape.batch}-"


def _listing(folder: Path) -> frozenset[str]:
    """The names in `folder`; none where it is missing or cannot be listed."""
    try:
        return frozenset(p.name for p in folder.iterdir()) if folder.is_dir() else frozenset()
    except OSError:
        return frozenset()


def _written_meanwhile(folder: Path, shape: Shape, suffix: str, known: frozenset[str]) -> bool:
    """Whether a file of `shape` with `suffix` is in `folder` that this worker did not know of
    (another worker sharing the folder wrote it since this one read it); logs which."""
    try:
        meanwhile = sorted(p.name for p in folder.glob(_shape_prefix(shape) + "*" + suffix)
                           if p.name not in known)
    except OSError:
        return False
    if meanwhile:
        log.info("compile cache: %s was written meanwhile by another worker (%s); not written "
                 "again", shape, meanwhile[0])
    return bool(meanwhile)


def _write_whole(folder: Path, name: str, data: bytes) -> Path:
    """folder/name written whole or not at all (a temporary file, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    path, tmp = folder / name, folder / (name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _has_file(att: _Attached, shape: Shape) -> bool:
    """Whether the cache folder held a file of `shape` when this worker loaded it."""
    prefix = _shape_prefix(shape)
    return any(name.startswith(prefix) for name in att.cache_known)


def write_artifacts(folder: Path, name: str) -> Path | None:
    """What torch's compile caches recorded since the last call, as the new file folder/name
    (written whole or not at all). None when there is nothing to write or this torch has no
    portable cache.

    One file per call, never one file rewritten: torch (2.13 here, 2.11 on the device) appends
    every save to one buffer and returns all of it, but reads a file back as one entry per kind
    of artifact, the last appended (a ``dict`` over the entries). A run file rewritten after
    each compiled shape therefore gave back only the last shape: a restarted SD 1.5 worker found
    batch 8 in the cache and compiled batch 1 again (docs/BENCHMARKS.md). After writing, the
    buffer is emptied so that the next file holds only what is new; torch has no public call
    for that, so where its private buffer is not found each file is the whole buffer: bigger,
    but still read back right, since every file of the folder is loaded."""
    mega = _mega_cache()
    if mega is None:
        return None
    saved = mega[0]()
    if not saved:
        return None
    path = _write_whole(folder, name, saved[0])
    _empty_artifact_buffer()  # only once written: a failed write leaves it for the next file
    return path


def read_artifacts(folder: Path) -> tuple[int, int]:
    """Load the artifact files of `folder` (the newest ``_MAX_CACHE_FILES``) into torch's
    caches: (loaded, found). A file that is too large or does not load costs a compile, nothing
    more."""
    mega = _mega_cache()
    if mega is None or not folder.is_dir():
        return 0, 0
    files = sorted(folder.glob("*.bin"), key=lambda p: p.stat().st_mtime)[-_MAX_CACHE_FILES:]
    loaded = 0
    for path in files:
        try:
            if path.stat().st_size > _MAX_CACHE_FILE:
                log.warning("compile cache: %s is too large; skipped", path)
                continue
            mega[1](path.read_bytes())
            loaded += 1
        except Exception:  # noqa: BLE001 - a bad file costs a compile, nothing more
            log.warning("compile cache: could not load %s; compiling instead", path,
                        exc_info=True)
    return loaded, len(files)


def _empty_artifact_buffer() -> None:
    """Start torch's artifact buffer afresh after a save (see ``write_artifacts``)."""
    _clear_artifact_manager("_serializer")


def _forget_unsaved_artifacts() -> None:
    """Drop what torch recorded for its portable cache since the last save, before a shape is
    compiled. A cache hit records its artifacts again: a restarted worker's first new shape
    wrote the shapes it had loaded from the folder into its file too (SD 1.5 on the device:
    139 MiB for batch 2 after batch 1 was a hit, 74 MiB for batch 4), and a shape another
    worker had written meanwhile (not saved here) went into the next file. Artifacts already
    seen stay known to torch, so a hit is not recorded twice; bytes of an earlier save whose
    write failed (torch's serialized buffer) are kept for the next file."""
    _clear_artifact_manager("_new_cache_artifacts")


def _clear_artifact_manager(part: str) -> None:
    """Clear one of the private collections of torch's ``CacheArtifactManager`` (torch has no
    public call for either); nothing where this torch lacks it."""
    try:
        from torch.compiler._cache import CacheArtifactManager
    except ImportError:
        return
    held = getattr(CacheArtifactManager, part, None)
    if held is not None and callable(getattr(held, "clear", None)):
        held.clear()


def _reset_cudagraph_trees() -> None:
    """Drop the CUDA graphs recorded by the calling thread (torch keeps one tree per thread)."""
    try:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees
    except ImportError:
        return
    reset_cudagraph_trees()


def _quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(...) with diffusers' warnings silenced (a pipeline built from parts warns about
    optional parts it lacks)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        dlog.set_verbosity(level)


def _is_graph_break(exc: BaseException) -> bool:
    try:
        from torch._dynamo.exc import Unsupported
    except ImportError:
        return False
    return isinstance(exc, Unsupported)
