"""Diffusers pipelines on one device: load, txt2img, img2img, upscale, interrupt, free memory;
per job a sampler, LoRAs and clip skip.

The engine is single-threaded on purpose: one GPU runs one pipeline call at a time, and the
server's job thread owns it. ``launch`` returns once a job's GPU work is queued; its images
reach the host through ``inflight.InFlight`` while the thread queues the next job, so the GPU
never waits for Python between jobs (``run`` is ``launch(...).wait()``).

Several images of one job run as one batched call with one generator per image, so the image
for seed s is the same picture alone or inside a batch: exactly the same at the same batch
size, up to kernel rounding across batch sizes (docs/ARCHITECTURE.md, "Same seed, same
image").

Nothing of one job stays on the pipeline for the next: each job runs with its own copy of its
sampler's scheduler (the model's own one is put back after), and LoRAs are switched per job on
a small LRU of loaded adapters; a job without LoRAs runs with every adapter disabled, which is
the pipeline's computation from before any LoRA was loaded.

With ``compile`` on, the UNet and VAE decoder are compiled shape by shape in the background
(``compiled.py``); the engine's calls run compiled for the shapes that are ready and eagerly
otherwise, and LoRA jobs always eagerly.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..crops import crop_edge
from ..errors import InvalidRequest, JobInterrupted, ModelNotAvailable
from ..protocol import JobRequest, LoraRef
from ..samplers import MAX_CLIP_SKIP, diffusers_clip_skip
from .compiled import (
    DEFAULT_BATCHES,
    Compiler,
    check_batches,
    check_mode,
    check_sizes,
    choose_mode,
    default_cache_dir,
)
from .inflight import InFlight, Pacer, on_cuda, start_event, to_device
from .loras import LoraFile, find_loras
from .schedulers import SchedulerBank, available_samplers
from .textcache import DEFAULT_CACHE_BYTES, MAX_CACHE_MB, TextCache
from .tiny import TINY_MODELS, tiny_model_dir

__all__ = ["Engine", "Interrupted", "ModelSource", "resolve_model"]

log = logging.getLogger("colabswarm.engine")

_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
ProgressFn = Callable[[int, int], None]


class Interrupted(JobInterrupted):
    """Raised inside the denoising loop to stop between two steps (kind ``interrupted``)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a named model comes from: 'tiny', 'folder', 'single_file' or 'hub'."""

    name: str
    kind: str
    location: str


def resolve_model(spec: str) -> ModelSource:
    """Turn what a worker's owner typed into a model source, refusing pickle files."""
    spec = spec.strip()
    if spec in TINY_MODELS:
        return ModelSource(spec, "tiny", spec)
    path = Path(os.path.expanduser(spec))
    lowered = spec.lower()
    if lowered.endswith(_PICKLE_SUFFIXES):
        raise InvalidRequest(
            f"Refusing {spec!r}: pickle checkpoints (.ckpt/.pt/.pth/.bin) can run arbitrary code "
            "when loaded. Convert it to .safetensors, or use a diffusers folder or hub id."
        )
    if lowered.endswith(".safetensors"):
        if not path.is_file():
            raise InvalidRequest(f"No such checkpoint file: {spec!r}.")
        return ModelSource(path.stem, "single_file", str(path))
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise InvalidRequest(
                f"{spec!r} is a folder but not a diffusers pipeline (no model_index.json)."
            )
        return ModelSource(path.name, "folder", str(path))
    if spec.count("/") == 1 and all(spec.split("/")):
        return ModelSource(spec, "hub", spec)
    raise InvalidRequest(
        f"Cannot find model {spec!r}: give 'tiny', a hub id such as "
        "'stable-diffusion-v1-5/stable-diffusion-v1-5', a diffusers folder or a .safetensors file."
    )


def _pick_device(device: str | None) -> str:
    if device:
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _is_sdxl_checkpoint(path: str) -> bool:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return any(k.startswith("conditioner.embedders.1") for k in f.keys())


def _dtype_kwarg() -> str:
    """diffusers 0.42 renamed torch_dtype to dtype; older releases (Colab's) know only the first."""
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (0, 42) else "torch_dtype"


@dataclass
class _Loaded:
    name: str
    txt2img: Any
    img2img: Any
    schedulers: SchedulerBank
    sdxl: bool
    text_layers: int  # layers of the shallowest text encoder
    # LoRA content hash -> adapter name, least recently used first
    adapters: OrderedDict[str, str] = field(default_factory=OrderedDict)
    # the text encoders' outputs for recent prompts (textcache.py); goes with the model
    text_cache: TextCache = field(default_factory=TextCache)


def _text_layers(pipe: Any) -> int:
    encoders = (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
    layers = [int(enc.config.num_hidden_layers) for enc in encoders if enc is not None]
    return min(layers) if layers else MAX_CLIP_SKIP


@contextmanager
def _text_model_alias(pipe: Any) -> Iterator[None]:
    """diffusers 0.42's SD pipelines reach the final layer norm for ``clip_skip`` through
    ``text_encoder.text_model``, which transformers 5 folded into CLIPTextModel itself: for the
    length of one call, the text encoder answers to that name too (an attribute, not a
    submodule, so weights and module names are untouched)."""
    enc = getattr(pipe, "text_encoder", None)
    alias = (enc is not None and not hasattr(enc, "text_model")
             and hasattr(enc, "final_layer_norm"))
    if alias:
        object.__setattr__(enc, "text_model", enc)
    try:
        yield
    finally:
        if alias:
            enc.__dict__.pop("text_model", None)


@contextmanager
def _quiet_lora_loading() -> Iterator[None]:
    """diffusers, transformers and peft narrate every adapter load (a 'LOAD REPORT' listing
    the base weights as MISSING, 'no LoRA keys for the text encoder', 'multiple adapters'):
    all expected here, and alarming in an owner's log."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d_level, t_level = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        dlog.set_verbosity(d_level)
        tlog.set_verbosity(t_level)


class _CastNotices(logging.Filter):
    """SDXL's stock VAE asks to be upcast (``force_upcast``): diffusers casts it to float32
    and back around every decode and img2img encode, and each cast logs a warning from
    ``ModelMixin.to`` ("modules ... should be kept in float32: []") that is expected there and
    says nothing to a worker's owner, two to four times a job. Dropped only while this thread
    runs a job (``_job_casts_quiet``); the same warning from anyone else's ``to()`` in the
    process (the worker notebook's kernel is the owner's too) still shows. Decided by where the
    record comes from (logger and function), not by its text."""

    _in_job = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(self._in_job, "on", False) and record.funcName == "to"
                    and record.levelno == logging.WARNING)


_CAST_LOGGER = "diffusers.models.modeling_utils"
_cast_notices = _CastNotices()


@contextmanager
def _job_casts_quiet() -> Iterator[None]:
    """The VAE's upcast notices (``_CastNotices``) dropped for the length of one job."""
    logger = logging.getLogger(_CAST_LOGGER)
    if _cast_notices not in logger.filters:
        logger.addFilter(_cast_notices)
    _CastNotices._in_job.on = True
    try:
        yield
    finally:
        _CastNotices._in_job.on = False


def _time_ids_sent_ahead(pipe: Any) -> None:
    """SDXL pipelines make their size conditioning (``_get_add_time_ids``: original size,
    crop, target size) on the host for every job and send it with a plain copy, which waits
    for all the GPU's queued work: the engine's thread would stop there until the previous job
    is done instead of queueing this one behind it. From here on the pipeline's own function
    makes them as before and they go to its device from pinned memory without waiting
    (``inflight.to_device``): the same values, and the pipeline's ``.to(device)`` finds them
    there. No-op for pipelines without it (SD 1.x) and off CUDA."""
    own = getattr(pipe, "_get_add_time_ids", None)
    if own is None or "_get_add_time_ids" in vars(pipe):
        return

    def sent(tensor: Any) -> Any:  # to_device: a plain .to() off CUDA, as the pipeline's
        return to_device(tensor, pipe._execution_device) if tensor.device.type == "cpu" \
            else tensor

    def made_and_sent(*args: Any, **kwargs: Any) -> Any:
        ids = own(*args, **kwargs)  # img2img's returns (ids, negative ids)
        return tuple(sent(t) for t in ids) if isinstance(ids, tuple) else sent(ids)

    pipe._get_add_time_ids = made_and_sent


def _module_device(module: Any) -> Any:
    """The device of a module's first parameter (where its work is queued)."""
    import torch

    for param in module.parameters():
        return param.device
    return torch.device("cpu")


@contextmanager
def _on_device(device: Any) -> Iterator[None]:
    """``device`` as torch's current CUDA device for the block (a worker on cuda:1, or a
    pipeline spread over GPUs: its steps' events go where its UNet runs)."""
    if not on_cuda(device):
        yield
        return
    import torch

    with torch.cuda.device(device):
        yield


@dataclass
class Engine:
    """One device's pipelines. Only the owner's configured models can be loaded."""

    models: list[str] = field(default_factory=lambda: ["tiny"])
    device: str | None = None
    allow_downloads: bool = False
    device_map: str | None = None
    upscalers_dir: str | None = None
    warmup: bool = True
    loras: list[str] | str | None = None
    lora_cache: int = 4
    compile: str = "off"  # off | auto | reduce-overhead | default (compiled.py)
    compile_batches: tuple[int, ...] = DEFAULT_BATCHES
    compile_sizes: tuple[tuple[int, int], ...] = ()  # compiled at start (none: the native)
    compile_cache: str | None = None  # the compile cache folder (None: colabswarm's own)
    compile_fn: Any = field(default=None, repr=False)  # test seam: instead of torch.compile
    # bytes of text-encoder outputs kept for repeated prompts (textcache.py); 0 turns it off
    text_cache_bytes: int = DEFAULT_CACHE_BYTES

    def __post_init__(self) -> None:
        if self.lora_cache < 1:
            raise InvalidRequest("lora_cache must be at least 1 (adapters kept loaded).")
        if not 0 <= self.text_cache_bytes <= MAX_CACHE_MB * 2**20:
            raise InvalidRequest(f"text_cache_bytes must be 0 (off) to {MAX_CACHE_MB} MiB, not "
                                 f"{self.text_cache_bytes}.")
        self.compile = check_mode(self.compile)
        self.compile_batches = check_batches(self.compile_batches)
        self.compile_sizes = check_sizes(self.compile_sizes)
        # found and hashed now: a bad file stops the worker at start, not at a stranger's job
        self._lora_files: dict[str, LoraFile] = find_loras(self.loras)
        # (model, LoRA hash) pairs that failed to load: refused up front from then on
        self._unfit: dict[tuple[str, str], str] = {}
        self._samplers = available_samplers()
        self._sources: dict[str, ModelSource] = {}
        for spec in self.models:
            src = resolve_model(spec)
            self._sources[src.name] = src
        if not self._sources:
            raise InvalidRequest("A worker needs at least one model.")
        self.default_model = next(iter(self._sources))
        self.device = _pick_device(self.device)
        mode, why = choose_mode(self.compile, self.device, self.device_map)
        self._compiler = Compiler(
            mode, why, batches=self.compile_batches, sizes=self.compile_sizes,
            compile_fn=self.compile_fn,
            cache_dir=self.compile_cache or (default_cache_dir() if mode != "off" else None),
        )
        self.load_seconds: dict[str, float] = {}  # measured seconds to load each model
        self._loaded: _Loaded | None = None
        self._lock = threading.RLock()
        self._upscalers: dict[str, Any] = {}
        # upscaled tile sources by content: every tile job of one upscale sends the same small
        # source, and the big image is made once per worker, not once per job
        self._upscaled: OrderedDict[tuple, Image.Image] = OrderedDict()
        self.step_seconds_per_mpix: float | None = None
        # the GPU's name and memory, read on the engine's thread (load, after each job), never
        # by /v1/info's thread: a CUDA call from another thread while the engine records CUDA
        # graphs can break the recording (docs/ARCHITECTURE.md, "The compiled fast path")
        self._gpu_seen: dict[str, Any] = {}
        self._free_pending = False  # /v1/free came during a job: free after it
        self._read_gpu()  # no engine thread yet: the GPU's name shows before a model loads

    # ----- what this engine offers -------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self._sources)

    @property
    def loaded_model(self) -> str | None:
        return self._loaded.name if self._loaded else None

    def sampler_names(self) -> list[str]:
        """The A1111 sampler names this worker runs."""
        return list(self._samplers)

    @property
    def lora_files(self) -> dict[str, LoraFile]:
        """The owner's LoRAs by name (each with its content hash)."""
        return dict(self._lora_files)

    def clip_skip_max(self, model: str | None = None) -> int:
        """The largest clip skip a model takes: one per layer of its text encoder(s) and one
        more for the token embeddings (12 at most; 12 where it cannot be known unloaded)."""
        loaded = self._loaded
        name = model or self.default_model
        if loaded is not None and loaded.name == name:
            return min(MAX_CLIP_SKIP, loaded.text_layers + 1)
        src = self._sources.get(name)
        folder = None
        if src is not None and src.kind == "tiny":  # its path only: never built on a request
            folder = tiny_model_dir(src.location, build=False)
        elif src is not None and src.kind == "folder":
            folder = Path(src.location)
        layers = []
        for enc in ("text_encoder", "text_encoder_2"):
            try:
                cfg = json.loads(((folder or Path("/nonexistent")) / enc / "config.json")
                                 .read_text())
                layers.append(int(cfg["num_hidden_layers"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return min(MAX_CLIP_SKIP, min(layers) + 1) if layers else MAX_CLIP_SKIP

    def upscaler_names(self) -> list[str]:
        from .upscalers import available_upscalers

        return available_upscalers(self.upscalers_dir)

    def upscaler_scales(self) -> dict[str, int]:
        from .upscalers import upscaler_scales

        return upscaler_scales(self.upscalers_dir)

    def upscaler_problem(self, name: str) -> str | None:
        """Why a model file of that name in the owner's folder is not offered, if one is."""
        from .upscalers import model_files

        return next((m.problem for m in model_files(self.upscalers_dir) if m.name == name), None)

    def device_info(self) -> dict[str, Any]:
        """The device, and the GPU's name and memory as last read by the engine's thread (any
        thread may ask; no CUDA call is made here)."""
        return {"device": self.device, "gpu_name": None, **self._gpu_seen}

    def _read_gpu(self) -> None:
        """Read the GPU's name and free memory (with the engine's lock held, or before any
        job can run: never while a job may be recording CUDA graphs)."""
        if not self.device.startswith("cuda"):
            return
        import torch

        if not torch.cuda.is_available():
            return
        idx = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(idx)
        self._gpu_seen = {"gpu_name": torch.cuda.get_device_name(idx),
                          "gpu_memory_total": int(total), "gpu_memory_free": int(free)}

    # ----- loading -----------------------------------------------------------------------
    def _source_for(self, name: str | None) -> ModelSource:
        if name is None:
            return self._sources[self.default_model]
        if name in self._sources:
            return self._sources[name]
        if self.allow_downloads and name.count("/") == 1:
            # listed in model_names only once it has loaded (load() adds it)
            return ModelSource(name, "hub", name)
        raise ModelNotAvailable(
            f"This worker does not serve model {name!r}; it serves {self.model_names}. "
            "Its owner can add models when starting it."
        )

    def load(self, name: str | None = None) -> str:
        """Load a model (swapping out the current one) and return its name."""
        src = self._source_for(name)
        with self._lock:
            if self._loaded and self._loaded.name == src.name:
                return src.name
            self._compiler.detach()
            self._loaded = None
            self.free()
            t0 = time.perf_counter()
            txt2img = self._load_pipeline(src)
            if src.name not in self._sources:  # a requested hub model: listed once it works
                self._sources = {**self._sources, src.name: src}
            from diffusers import AutoPipelineForImage2Image

            img2img = AutoPipelineForImage2Image.from_pipe(txt2img)
            for p in (txt2img, img2img):
                p.set_progress_bar_config(disable=True)
                _time_ids_sent_ahead(p)
            self._loaded = _Loaded(
                src.name, txt2img, img2img, SchedulerBank(txt2img.scheduler.config),
                sdxl=getattr(txt2img, "text_encoder_2", None) is not None,
                text_layers=_text_layers(txt2img),
                text_cache=TextCache(self.text_cache_bytes),
            )
            self.step_seconds_per_mpix = None
            if self.warmup:
                self._warm_up(txt2img)
            self.upscaler_names()  # check the owner's upscale models now, not in a request
            self.load_seconds[src.name] = round(time.perf_counter() - t0, 3)
            log.info("loaded %s (%s) in %.1fs on %s", src.name, src.kind,
                     time.perf_counter() - t0, self.device)
            loaded = self._loaded
            self._read_gpu()
            self._compiler.attach(txt2img, src.name, lambda: bool(loaded.adapters))
            return src.name

    def _load_pipeline(self, src: ModelSource) -> Any:
        import torch
        from diffusers import (
            AutoPipelineForText2Image,
            StableDiffusionPipeline,
            StableDiffusionXLPipeline,
        )
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        kwargs: dict[str, Any] = {_dtype_kwarg(): dtype}
        if self.device_map:
            kwargs["device_map"] = self.device_map
        if src.kind == "tiny":
            pipe = AutoPipelineForText2Image.from_pretrained(tiny_model_dir(src.location), **kwargs)
        elif src.kind == "folder":
            pipe = AutoPipelineForText2Image.from_pretrained(
                src.location, use_safetensors=True, **kwargs
            )
        elif src.kind == "single_file":
            cls = (
                StableDiffusionXLPipeline
                if _is_sdxl_checkpoint(src.location)
                else StableDiffusionPipeline
            )
            pipe = cls.from_single_file(src.location, **kwargs)
        else:  # hub: safetensors weights only, never pickle, never a local path
            pipe = AutoPipelineForText2Image.from_pretrained(
                self._download(src.location), use_safetensors=True, **kwargs
            )
        if hasattr(pipe, "safety_checker"):
            pipe.safety_checker = None
        if not self.device_map:
            pipe = pipe.to(self.device)
        return pipe

    @staticmethod
    def _download(repo_id: str) -> str:
        """A hub pipeline's files in the local cache. ``download`` takes its argument as a hub
        id only, so a name that is also a folder here is never loaded from that folder (which
        ``from_pretrained(name)`` would do). Every failure gives the same message, whatever the
        file system holds; the worker's log has the cause."""
        from diffusers import DiffusionPipeline

        try:
            return str(DiffusionPipeline.download(repo_id, use_safetensors=True))
        except Exception:
            log.warning("download of %r from the hub failed", repo_id, exc_info=True)
            raise ModelNotAvailable(
                f"Could not download model {repo_id!r} from the Hugging Face hub: it is not a "
                "public pipeline with safetensors weights there, or this worker cannot reach "
                "the hub. Check the id, or ask the worker's owner to add the model."
            ) from None

    def _warm_up(self, pipe: Any) -> None:
        """Two short calls at the model's native size: the first pays one-off costs (kernel
        selection, allocator), the second tells the controller this GPU's speed before its
        first job, so the first batches are already sized right."""
        import torch

        side = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
        side = max(64, min(side, 1024)) // 8 * 8
        for steps in (2, 6):
            gen = torch.Generator("cpu").manual_seed(0)
            t0 = time.perf_counter()
            with self._lock, torch.inference_mode():
                pipe(prompt="", num_inference_steps=steps, width=side, height=side,
                     generator=[gen], guidance_scale=7.0)
            seconds = time.perf_counter() - t0
        self._note_speed(seconds, steps * side * side / 1e6)
        log.info("warm-up: %.3f s per step at %dx%d", seconds / steps, side, side)

    def free(self) -> bool:
        """Give cached GPU memory back (after a model swap or on request). Never during a job
        (it may be recording CUDA graphs, or reading the upscaled images): with one in flight,
        the engine frees right after it and this returns False at once."""
        if not self._lock.acquire(blocking=False):
            self._free_pending = True
            return False
        try:
            self._free_now()
        finally:
            self._lock.release()
        return True

    def _free_now(self) -> None:
        """free() with the engine's lock held."""
        import torch

        self._free_pending = False
        self._upscaled.clear()
        if self._loaded is not None:  # the cached encodings are device memory too
            self._loaded.text_cache.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            self._read_gpu()

    # ----- running -----------------------------------------------------------------------
    def run(
        self,
        req: JobRequest,
        init_images: list[Image.Image] | None = None,
        on_step: ProgressFn | None = None,
        should_stop: Callable[[], bool] | None = None,
        *,
        scope: str = "owner",
    ) -> list[Image.Image]:
        """Run one job and wait for its images: ``launch(...).wait()``."""
        return self.launch(req, init_images, on_step, should_stop, scope=scope).wait()

    def launch(
        self,
        req: JobRequest,
        init_images: list[Image.Image] | None = None,
        on_step: ProgressFn | None = None,
        should_stop: Callable[[], bool] | None = None,
        *,
        scope: str = "owner",
    ) -> InFlight:
        """Run one job up to its last queued GPU work; its images arrive through the returned
        ``InFlight`` (inflight.py) while the caller goes on to the next job. Raises
        Interrupted if should_stop() turns true between steps. The engine's lock is held
        while the job's work is queued (a free() asked for meanwhile happens after it).
        ``scope`` is the job's token (``guests.Who.scope``): cached prompt encodings are that
        token's own (textcache.py)."""
        with self._turn():
            return self._launch(req, init_images, on_step, should_stop, scope)

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """The engine's lock for a piece of its GPU work (a job, a first run); a free() asked
        for meanwhile happens right after it."""
        with self._lock:
            try:
                yield
            finally:
                if self._free_pending:
                    self._free_now()

    def _launch(self, req: JobRequest, init_images: list[Image.Image] | None,
                on_step: ProgressFn | None, should_stop: Callable[[], bool] | None,
                scope: str = "owner") -> InFlight:
        n = len(req.seeds)
        inits = list(init_images or [])
        if req.kind != "txt2img":
            if len(inits) not in (1, n):
                raise InvalidRequest(f"{req.kind} needs 1 or {n} init images, got {len(inits)}.")
            inits = inits * n if len(inits) == 1 else inits
        if req.kind == "upscale":
            return InFlight.ready(
                [self.upscale(im, req.upscaler or "lanczos", req.scale) for im in inits])
        import torch

        self.load(req.model)
        loaded = self._loaded
        assert loaded is not None
        if req.clip_skip > min(MAX_CLIP_SKIP, loaded.text_layers + 1):
            raise InvalidRequest(
                f"clip skip {req.clip_skip} is more than model {loaded.name!r} has layers for "
                f"(at most {min(MAX_CLIP_SKIP, loaded.text_layers + 1)})."
            )
        gens = [torch.Generator("cpu").manual_seed(s) for s in req.seeds]
        # several prompts in one call: one per image (and then one negative prompt each)
        many = bool(req.prompts)
        common: dict[str, Any] = dict(
            prompt=list(req.prompts) if many else req.prompt,
            negative_prompt=([req.negative_prompt] * n if many else req.negative_prompt)
            if req.negative_prompt else None,
            num_inference_steps=req.steps,
            guidance_scale=req.cfg,
            num_images_per_prompt=1 if many else n,
            generator=gens,
            clip_skip=diffusers_clip_skip(req.clip_skip, loaded.sdxl),
        )
        if req.kind == "img2img":
            size = (req.width, req.height)
            if req.crops:
                big = self.upscaled(inits[0], req.upscaler or "lanczos", req.scale)
                inits = [crop_edge(big, box) for box in req.crops]
            inits = [im if im.size == size else im.resize(size, Image.Resampling.LANCZOS)
                     for im in inits]
            if req.strength == 0:
                if on_step:
                    on_step(0, 0)
                return InFlight.ready([im.copy() for im in inits])
            pipe = loaded.img2img
            total = int(req.steps * req.strength)
            common.update(image=inits, strength=req.strength)
        else:
            pipe = loaded.txt2img
            total = req.steps
            common.update(width=req.width, height=req.height)
        # where the pipeline puts its inputs, and where its steps run (the same GPU but for a
        # pipeline spread over several)
        device, unet_device = pipe._execution_device, _module_device(pipe.unet)
        # made as inference tensors, as the pipeline's own would be (a compiled graph's guards
        # tell the two apart)
        with torch.inference_mode():
            if req.kind == "txt2img":
                common["latents"] = self._noise(pipe, n, req.width, req.height, gens, device)
            scheduler = loaded.schedulers.for_job(req.sampler, req.seeds, steps=req.steps,
                                                  device=device)
        # second-order samplers call back twice per step: progress counts pipeline iterations
        order = int(getattr(scheduler, "order", 1))
        total = max(total * order - (order - 1), 0)
        calls = 0
        step_s = (self.step_seconds_per_mpix * n * req.width * req.height / 1e6
                  if self.step_seconds_per_mpix else None)
        pacer = Pacer.for_device(unet_device, step_s)
        reported = -1

        def _callback(p: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict:
            nonlocal calls, reported
            calls += 1
            # on a GPU: the steps it has finished (the thread runs a bounded lead ahead)
            done = pacer.stepped(step) if pacer is not None else step + 1
            if on_step and done != reported:
                reported = done
                on_step(done, max(int(getattr(p, "num_timesteps", total) or total), done))
            if should_stop and should_stop():
                raise Interrupted()
            return kwargs

        if should_stop and should_stop():
            raise Interrupted()
        if on_step:
            on_step(0, total)
        t0 = time.perf_counter()
        plan = self._compiler.job(req.width, req.height, n, loras=bool(req.loras),
                                  adapters_loaded=bool(loaded.adapters))
        with plan as p, self._lock, self._job_pipeline(loaded, pipe, scheduler, req.loras,
                                                       p.unload_adapters), \
                _on_device(unet_device):
            # the events (the start, the pacer's) are on the UNet's GPU, the current one here
            start = start_event(unet_device)
            # a LoRA job's adapters change the text encoders: it neither reads nor writes
            with torch.inference_mode(), _text_model_alias(pipe), _job_casts_quiet(), \
                    loaded.text_cache.serving(pipe, scope, enabled=not req.loras):
                out = pipe(**common, output_type="pt", callback_on_step_end=_callback).images
                step_mpix = calls * n * req.width * req.height / 1e6
                flight = InFlight.start_copy(
                    out, start_event=start, start_device=unet_device, t0=t0,
                    on_done=lambda seconds: self._note_speed(seconds, step_mpix, loaded.name))
            self._read_gpu()
        return flight

    @staticmethod
    def _noise(pipe: Any, n: int, width: int, height: int, gens: list[Any], device: Any) -> Any:
        """A txt2img job's starting latents, drawn as the pipeline's ``prepare_latents``
        draws them (the same shape, dtype and generators, on the CPU) and sent to the device
        from pinned memory without waiting for the GPU (the pipeline's own copy would)."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        enc = getattr(pipe, "text_encoder_2", None) or getattr(pipe, "text_encoder", None)
        dtype = enc.dtype if enc is not None else pipe.unet.dtype
        scale = pipe.vae_scale_factor
        shape = (n, pipe.unet.config.in_channels, int(height) // scale, int(width) // scale)
        return to_device(
            randn_tensor(shape, generator=gens, device=torch.device("cpu"), dtype=dtype), device)

    # ----- per-job sampler and LoRAs -----------------------------------------------------
    @contextmanager
    def _job_pipeline(self, loaded: _Loaded, pipe: Any, scheduler: Any,
                      loras: list[LoraRef], unload: bool = False) -> Iterator[None]:
        """The pipeline with this job's scheduler and LoRAs; its own scheduler is back after.
        ``unload``: remove every LoRA adapter first (a compiled model's plain job)."""
        if unload and loaded.adapters:
            with _quiet_lora_loading():
                loaded.txt2img.unload_lora_weights()
            loaded.adapters.clear()
        self._set_loras(loaded, loras)
        own = pipe.scheduler
        pipe.scheduler = scheduler
        try:
            yield
        finally:
            pipe.scheduler = own

    def lora_for(self, ref: LoraRef, model: str | None = None) -> LoraFile:
        """The file a job's LoRA names, if its hash matches and it is not known to fail on
        ``model`` (None: the default model); ModelNotAvailable otherwise."""
        found = self._lora_files.get(ref.name)
        if found is None:
            offered = ", ".join(sorted(self._lora_files)[:20]) or "none"
            raise ModelNotAvailable(
                f"This worker has no LoRA {ref.name!r} (it offers: {offered}). Its owner adds "
                "LoRAs when starting it (--lora FILE or --loras-dir FOLDER)."
            )
        if not found.matches(ref.hash):
            raise ModelNotAvailable(
                f"This worker's LoRA {ref.name!r} is a different file (hash {found.hash[:12]}, "
                f"the job wants {ref.hash[:12]}): the job runs where that file is."
            )
        unfit = self._unfit.get((model or self.default_model, found.hash))
        if unfit is not None:
            raise ModelNotAvailable(unfit)
        return found

    def _set_loras(self, loaded: _Loaded, refs: list[LoraRef]) -> None:
        pipe = loaded.txt2img  # img2img shares the UNet and text encoders (from_pipe)
        if not refs:
            if loaded.adapters:
                pipe.disable_lora()
            return
        files = [self.lora_for(ref, loaded.name) for ref in refs]
        keep = {f.hash for f in files}
        names = [self._adapter(loaded, f, keep) for f in files]
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=[float(ref.weight) for ref in refs])

    def _adapter(self, loaded: _Loaded, lora: LoraFile, keep: set[str]) -> str:
        """The adapter name of a LoRA on the loaded model, loading it (and unloading the least
        recently used ones past ``lora_cache``) if needed."""
        pipe = loaded.txt2img
        if lora.hash in loaded.adapters:
            loaded.adapters.move_to_end(lora.hash)
            return loaded.adapters[lora.hash]
        for old in [h for h in loaded.adapters if h not in keep]:
            if len(loaded.adapters) < self.lora_cache:
                break
            pipe.delete_adapters(loaded.adapters.pop(old))
        adapter = f"lora_{lora.hash[:16]}"
        t0 = time.perf_counter()
        try:
            with _quiet_lora_loading():
                pipe.load_lora_weights(str(lora.path), adapter_name=adapter)
        except Exception as exc:
            try:  # a half-loaded adapter must not stay behind
                if adapter in {a for names in pipe.get_list_adapters().values() for a in names}:
                    pipe.delete_adapters(adapter)
            except Exception:  # noqa: BLE001 - the load error below is the one to report
                log.exception("could not remove the half-loaded LoRA %s", lora.name)
            why = (f"LoRA {lora.name!r} does not fit model {loaded.name!r} "
                   f"({type(exc).__name__}: {str(exc)[:300]}). Is it made for this model family "
                   "(SD 1.x, SDXL)?")
            self._unfit[(loaded.name, lora.hash)] = why
            raise ModelNotAvailable(why) from None
        loaded.adapters[lora.hash] = adapter
        log.info("loaded LoRA %s in %.2fs", lora.name, time.perf_counter() - t0)
        return adapter

    def idle_work(self) -> float | None:
        """Between jobs (the engine thread): the compiled path's first run of a shape the
        compile thread finished, if one waits (``Compiler.settle``). Returns when to ask
        again, None when nothing is left."""
        with self._turn():
            return self._compiler.settle()

    def text_cache_stats(self) -> dict[str, int] | None:
        """Hits, misses, entries and bytes of the loaded model's text cache (None: no model)."""
        loaded = self._loaded
        return loaded.text_cache.stats() if loaded is not None else None

    def compile_info(self) -> Any:
        """What the compiled path has (protocol.CompileInfo), for /v1/info."""
        return self._compiler.info()

    def close(self) -> None:
        """Stop the compile thread (the worker is stopping)."""
        self._compiler.close()

    def _note_speed(self, seconds: float, step_mpix: float, model: str | None = None) -> None:
        """Blend one job's seconds per step-megapixel into the estimate; a job of a model no
        longer loaded (its images landed after a switch) does not count."""
        if step_mpix <= 0 or (model is not None and model != self.loaded_model):
            return
        sample = seconds / step_mpix
        prev = self.step_seconds_per_mpix
        self.step_seconds_per_mpix = sample if prev is None else 0.7 * prev + 0.3 * sample

    def upscaled(self, image: Image.Image, upscaler: str, scale: int) -> Image.Image:
        """``upscale`` with a small cache keyed by the pixels (two sources: one upscale running
        while the next one starts)."""
        if scale == 1:
            return image.convert("RGB")
        digest = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
        key = (digest, image.size, image.mode, upscaler, scale)
        hit = self._upscaled.get(key)
        if hit is None:
            hit = self.upscale(image, upscaler, scale).convert("RGB")
            self._upscaled[key] = hit
            while len(self._upscaled) > 2:
                self._upscaled.popitem(last=False)
        self._upscaled.move_to_end(key)
        return hit

    def upscale(self, image: Image.Image, upscaler: str, scale: int) -> Image.Image:
        from .upscalers import run_upscaler

        return run_upscaler(
            image, upscaler, scale, self.device, self.upscalers_dir, self._upscalers
        )
