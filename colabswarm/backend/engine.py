"""Diffusers pipelines on one device: load, txt2img, img2img, upscale, interrupt, free memory.

The engine is synchronous and single-threaded on purpose: one GPU runs one pipeline call at a
time, and the server's job thread owns it. Several images of one job run as one batched call
with one generator per image, so the image for seed s is the same picture alone or inside a
batch: exactly the same at the same batch size, up to kernel rounding across batch sizes
(docs/ARCHITECTURE.md, "Same seed, same image").
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..crops import crop_edge
from ..errors import InvalidRequest, JobInterrupted, ModelNotAvailable
from ..protocol import JobRequest
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


@dataclass
class Engine:
    """One device's pipelines. Only the owner's configured models can be loaded."""

    models: list[str] = field(default_factory=lambda: ["tiny"])
    device: str | None = None
    allow_downloads: bool = False
    device_map: str | None = None
    upscalers_dir: str | None = None
    warmup: bool = True

    def __post_init__(self) -> None:
        self._sources: dict[str, ModelSource] = {}
        for spec in self.models:
            src = resolve_model(spec)
            self._sources[src.name] = src
        if not self._sources:
            raise InvalidRequest("A worker needs at least one model.")
        self.default_model = next(iter(self._sources))
        self.device = _pick_device(self.device)
        self._loaded: _Loaded | None = None
        self._lock = threading.RLock()
        self._upscalers: dict[str, Any] = {}
        # upscaled tile sources by content: every tile job of one upscale sends the same small
        # source, and the big image is made once per worker, not once per job
        self._upscaled: OrderedDict[tuple, Image.Image] = OrderedDict()
        self.step_seconds_per_mpix: float | None = None

    # ----- what this engine offers -------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self._sources)

    @property
    def loaded_model(self) -> str | None:
        return self._loaded.name if self._loaded else None

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
        import torch

        info: dict[str, Any] = {"device": self.device, "gpu_name": None}
        if self.device.startswith("cuda") and torch.cuda.is_available():
            idx = torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(idx)
            info.update(
                gpu_name=torch.cuda.get_device_name(idx),
                gpu_memory_total=int(total),
                gpu_memory_free=int(free),
            )
        return info

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
            self._loaded = _Loaded(src.name, txt2img, img2img)
            self.step_seconds_per_mpix = None
            if self.warmup:
                self._warm_up(txt2img)
            self.upscaler_names()  # check the owner's upscale models now, not in a request
            log.info("loaded %s (%s) in %.1fs on %s", src.name, src.kind,
                     time.perf_counter() - t0, self.device)
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

    def free(self) -> None:
        """Give cached GPU memory back (after a model swap or on request)."""
        import torch

        self._upscaled.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ----- running -----------------------------------------------------------------------
    def run(
        self,
        req: JobRequest,
        init_images: list[Image.Image] | None = None,
        on_step: ProgressFn | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Image.Image]:
        """Run one job; raises Interrupted if should_stop() turns true between steps."""
        n = len(req.seeds)
        inits = list(init_images or [])
        if req.kind != "txt2img":
            if len(inits) not in (1, n):
                raise InvalidRequest(f"{req.kind} needs 1 or {n} init images, got {len(inits)}.")
            inits = inits * n if len(inits) == 1 else inits
        if req.kind == "upscale":
            return [self.upscale(im, req.upscaler or "lanczos", req.scale) for im in inits]
        import torch

        self.load(req.model)
        assert self._loaded is not None
        gens = [torch.Generator("cpu").manual_seed(s) for s in req.seeds]
        common: dict[str, Any] = dict(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or None,
            num_inference_steps=req.steps,
            guidance_scale=req.cfg,
            num_images_per_prompt=n,
            generator=gens,
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
                return [im.copy() for im in inits]
            pipe = self._loaded.img2img
            total = int(req.steps * req.strength)
            common.update(image=inits, strength=req.strength)
        else:
            pipe = self._loaded.txt2img
            total = req.steps
            common.update(width=req.width, height=req.height)

        def _callback(p: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict:
            if on_step:
                on_step(step + 1, total)
            if should_stop and should_stop():
                raise Interrupted()
            return kwargs

        if should_stop and should_stop():
            raise Interrupted()
        if on_step:
            on_step(0, total)
        t0 = time.perf_counter()
        with self._lock, torch.inference_mode():
            images = pipe(**common, callback_on_step_end=_callback).images
        self._note_speed(time.perf_counter() - t0, total * n * req.width * req.height / 1e6)
        return list(images)

    def _note_speed(self, seconds: float, step_mpix: float) -> None:
        if step_mpix <= 0:
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
