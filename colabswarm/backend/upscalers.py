"""Upscalers a worker runs before tiles are refined: Lanczos, a tiny test net, and the upscale
models in its owner's folder (ESRGAN, Real-ESRGAN compact, SwinIR, ... through spandrel).

Owns: which files of the owner's folder are offered (by name, never by path, each checked once
by loading it on the CPU, so a file that cannot be used is never advertised); reading weights
without unpickling anything (``.safetensors``, or ``.pth`` through torch's weights-only loader);
importing spandrel where torchvision is missing or broken; and running a model over an image in
tiles of its own with feathered overlaps, so its memory does not grow with the image.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import math
import os
import pickle
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InvalidRequest, ModelNotAvailable

__all__ = [
    "MAX_MODEL_PIXELS",
    "MODEL_OVERLAP",
    "MODEL_TILE",
    "SPANDREL_INSTALL",
    "ModelFile",
    "available_upscalers",
    "blend_weights",
    "import_spandrel",
    "model_files",
    "run_tiled",
    "run_upscaler",
    "tile_spans",
    "upscaler_scales",
]

log = logging.getLogger("colabswarm.upscalers")

_BUILTIN = ("lanczos", "tiny-upscaler")
_MODEL_SUFFIXES = (".safetensors", ".pth")
_MAX_NAME = 200  # JobRequest.upscaler's max_length
MODEL_TILE = 512      # input pixels per side of one pass through a model (ComfyUI's default too)
MODEL_OVERLAP = 32    # input pixels two neighbouring passes share
MIN_MODEL_TILE = 64   # out of GPU memory, the tile is halved down to this
MAX_MODEL_PIXELS = 8192 * 8192  # a model's own output (before a resize), in pixels
SPANDREL_INSTALL = (
    'pip install --no-deps "spandrel==0.4.2" einops (on a machine with a torchvision that '
    'matches its torch, such as Colab: pip install "colabswarm[worker,upscale]")'
)


# ----- spandrel, with or without torchvision ---------------------------------------------------
class _Missing:
    """Stands for a torchvision name while spandrel imports: any attribute is another
    placeholder, a call raises. Only architectures colabswarm never runs touch them."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _Missing:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ModelNotAvailable(
            f"This model needs torchvision ({self._name}), which this worker does not have; "
            "colabswarm runs upscale models without it. Use an upscaling model (ESRGAN, "
            "Real-ESRGAN, SwinIR, ...), or install the torchvision build that matches torch."
        )


class _PlaceholderModule(ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self.__name__}.{attr}")


class _TorchvisionPlaceholders(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``torchvision`` and its submodules as placeholders, for one import of spandrel."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> ModuleType:
        module = _PlaceholderModule(spec.name)
        module.__path__ = []  # a package, so that submodules import
        return module

    def exec_module(self, module: ModuleType) -> None:
        return None


_import_lock = threading.Lock()


def _drop_modules(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def _torchvision_works() -> bool:
    import importlib.util

    try:
        if importlib.util.find_spec("torchvision") is None:
            return False
        import torchvision.transforms.functional  # noqa: F401
        return True
    except Exception as exc:  # a CUDA build beside a CPU torch raises RuntimeError here
        log.info("torchvision is installed but does not import (%s: %s); spandrel's upscale "
                 "models run without it", type(exc).__name__, exc)
        _drop_modules("torchvision")
        return False


def import_spandrel() -> ModuleType:
    """spandrel, imported whether or not torchvision works.

    spandrel's registry imports every architecture at once, and two of them (LaMa inpainting
    and RestoreFormer face restoration, which colabswarm refuses: they are not upscalers)
    import ``torchvision.transforms.functional`` at module level. PyPI has CUDA builds of
    torchvision only, which fail to import beside a CPU torch, so where torchvision is missing
    or broken the import of spandrel sees placeholders for it that raise if ever called; they
    are removed from ``sys.modules`` right after. Where torchvision works, it is used."""
    with _import_lock:
        loaded = sys.modules.get("spandrel")
        if loaded is not None:
            return loaded
        import importlib.util

        if importlib.util.find_spec("spandrel") is None:
            raise ModelNotAvailable(
                f"Upscale models need the 'spandrel' package on the worker: {SPANDREL_INSTALL}"
                "; then restart the worker."
            )
        finder = None if _torchvision_works() else _TorchvisionPlaceholders()
        if finder is not None:
            sys.meta_path.insert(0, finder)
        try:
            import spandrel
        except Exception as exc:  # e.g. einops missing, or a spandrel that needs more
            _drop_modules("spandrel")
            raise ModelNotAvailable(
                f"spandrel is installed but does not import ({type(exc).__name__}: {exc}); "
                f"reinstall it: {SPANDREL_INSTALL}; then restart the worker."
            ) from exc
        finally:
            if finder is not None:
                sys.meta_path.remove(finder)
                _drop_modules("torchvision")
        return spandrel


# ----- the owner's folder ----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFile:
    """One model file of the owner's folder, as checked: offered when ``problem`` is None."""

    name: str
    path: Path
    architecture: str | None = None  # spandrel's id: ESRGAN, Compact, SwinIR, ...
    scale: int | None = None         # its own factor (4 for a 4x model)
    problem: str | None = None       # why it is not offered


_checked: dict[tuple[str, int, int], ModelFile] = {}  # (path, size, mtime_ns) -> verdict
_checked_lock = threading.Lock()


def _read_state(path: Path) -> dict[str, Any]:
    """The file's tensors, never unpickling an object: safetensors, or torch's weights-only
    unpickler for .pth (tensors, dicts, lists and numbers only)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelNotAvailable(
                f"{path.name} is not a readable .safetensors file ({type(exc).__name__}: {exc})."
            ) from None
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelNotAvailable(
            f"{path.name} holds pickled Python objects besides weights, and a pickle can run "
            "code when it is loaded, so this worker refuses it (it reads .pth files "
            "weights-only). Use the model's .safetensors release, or convert the file on a "
            "machine you trust and put the .safetensors file in the folder."
        ) from None
    except Exception as exc:
        raise ModelNotAvailable(
            f"{path.name} could not be read as weights ({type(exc).__name__}: {exc})."
        ) from None
    if not isinstance(state, dict):
        raise ModelNotAvailable(f"{path.name} holds no state dict (a {type(state).__name__}).")
    return state


def _load_descriptor(path: Path) -> Any:
    """spandrel's descriptor of the file's model, on the CPU, or why it cannot be used."""
    spandrel = import_spandrel()
    state = _read_state(path)
    try:
        with warnings.catch_warnings():  # SwinIR's torch.meshgrid call, on every load
            warnings.filterwarnings("ignore", "torch.meshgrid", UserWarning)
            model = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise ModelNotAvailable(
            f"{path.name}: spandrel {spandrel.__version__} knows no architecture with these "
            "weights; check the file is an upscale model (ESRGAN, Real-ESRGAN, SwinIR, ...)."
        ) from None
    except Exception as exc:
        raise ModelNotAvailable(
            f"{path.name} looks like a model spandrel knows but does not load "
            f"({type(exc).__name__}: {exc})."
        ) from None
    arch = model.architecture.id
    if not isinstance(model, spandrel.ImageModelDescriptor) or model.purpose not in (
            "SR", "Restoration"):
        raise ModelNotAvailable(
            f"{path.name} is a {arch} model for {model.purpose}, not an upscaler; only "
            "super-resolution and restoration models are offered."
        )
    if (model.input_channels, model.output_channels) != (3, 3):
        raise ModelNotAvailable(
            f"{path.name} maps {model.input_channels} channels to {model.output_channels}; "
            "an upscaler here must take and give RGB (3 channels)."
        )
    return model


def _check(name: str, path: Path, key: tuple[str, int, int]) -> ModelFile:
    with _checked_lock:  # one check at a time: /v1/info and a job may list the folder at once
        hit = _checked.get(key)
        if hit is not None:
            return hit
        try:
            model = _load_descriptor(path)
            verdict = ModelFile(name, path, model.architecture.id, int(model.scale))
            del model
            log.info("upscaler %s: %s %dx (%s)", name, verdict.architecture, verdict.scale,
                     path.name)
        except Exception as exc:  # never let one bad file stop the worker
            problem = str(exc) if isinstance(exc, ModelNotAvailable) else (
                f"{path.name} could not be checked ({type(exc).__name__}: {exc}).")
            verdict = ModelFile(name, path, problem=problem)
            log.warning("upscaler %s is not offered: %s", name, problem)
        _checked[key] = verdict
        return verdict


def _name_problem(name: str) -> str | None:
    if name in _BUILTIN:
        return f"{name!r} is a built-in upscaler's name; rename the file."
    if not name or len(name) > _MAX_NAME or not name.isprintable():
        return f"a name must be 1-{_MAX_NAME} printable characters; rename the file."
    return None


def model_files(folder: str | None) -> list[ModelFile]:
    """Every .safetensors and .pth file of the folder, checked (each once per size and
    modification time: it is loaded on the CPU the first time, which can take a second)."""
    if not folder or not os.path.isdir(folder):
        return []
    entries = sorted(os.listdir(folder), key=lambda e: (Path(e).stem,
                                                        not e.lower().endswith(".safetensors")))
    out: list[ModelFile] = []
    seen: dict[str, str] = {}
    for entry in entries:
        path = Path(folder) / entry
        if not entry.lower().endswith(_MODEL_SUFFIXES) or not path.is_file():
            continue
        name = path.stem
        problem = _name_problem(name)
        if problem is None and name in seen:
            problem = f"{seen[name]} has the same name and is offered instead."
        seen.setdefault(name, entry)
        if problem is not None:
            out.append(ModelFile(name, path, problem=f"{entry}: {problem}"))
            continue
        st = path.stat()
        out.append(_check(name, path, (str(path.resolve()), st.st_size, st.st_mtime_ns)))
    return out


def available_upscalers(folder: str | None) -> list[str]:
    """Names a request may use: the built-ins, then every model of the folder that loads."""
    return list(_BUILTIN) + [m.name for m in model_files(folder) if m.problem is None]


def upscaler_scales(folder: str | None) -> dict[str, int]:
    """Each offered model's own factor (a 4x model upscales by 4 in one pass)."""
    return {m.name: int(m.scale) for m in model_files(folder)
            if m.problem is None and m.scale is not None}


# ----- running a model in tiles of its own -----------------------------------------------------
def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Windows of ``tile`` along one axis of ``length``, spread evenly, neighbours sharing at
    least ``overlap`` (capped at half a tile); one window when the axis fits in a tile."""
    if length <= tile:
        return [(0, length)]
    overlap = max(0, min(overlap, tile // 2))
    n = math.ceil((length - tile) / (tile - overlap)) + 1
    return [(s, s + tile) for s in (round(i * (length - tile) / (n - 1)) for i in range(n))]


def blend_weights(spans: list[tuple[int, int]], length: int, scale: int,
                  overlap: int) -> list[np.ndarray]:
    """Per window, weights over its output pixels that sum to 1 across windows at every pixel.

    Within a quarter of the overlap of a window's inner edge its weight is 0 (those pixels saw
    the window's edge, not the image), then it ramps linearly to 1 across the next half. A
    model that looks at most overlap/4 input pixels around each pixel therefore gives the same
    result tiled as whole (up to float rounding); others blend without seams. The overlap used
    is at most what neighbouring windows really share."""
    shared = [a[1] - b[0] for a, b in zip(spans, spans[1:], strict=False)]
    overlap = max(0, min([overlap, *shared]))
    margin = (overlap // 4) * scale
    ramp = max(1, overlap * scale - 2 * margin)
    raw = []
    for s, e in spans:
        d = np.arange((e - s) * scale, dtype=np.float64) + 0.5
        w = np.ones_like(d)
        if s > 0:
            w *= np.clip((d - margin) / ramp, 0.0, 1.0)
        if e < length:
            w *= np.clip((d[::-1] - margin) / ramp, 0.0, 1.0)
        raw.append(w)
    total = np.zeros(length * scale)
    for (s, _e), w in zip(spans, raw, strict=True):
        total[s * scale:s * scale + len(w)] += w
    if not (total > 0).all():
        raise ValueError(f"tiles {spans} leave pixels uncovered (overlap {overlap})")
    return [(w / total[s * scale:s * scale + len(w)]).astype(np.float32)
            for (s, _e), w in zip(spans, raw, strict=True)]


def run_tiled(net: Callable[[Any], Any], x: Any, scale: int, tile: int, overlap: int,
              device: str = "cpu", dtype: Any = None) -> Any:
    """``net`` (a 1x3xhxw [0,1] tensor in, 1x3x(h*scale)x(w*scale) out) over ``x`` in windows of
    ``tile`` input pixels sharing ``overlap``, blended on the CPU in float32. An image that fits
    in one window goes through in one pass, exactly as the model alone would give it."""
    import torch

    _, _, h, w = x.shape
    ys, xs = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    wys, wxs = blend_weights(ys, h, scale, overlap), blend_weights(xs, w, scale, overlap)
    with torch.inference_mode():
        if len(ys) == len(xs) == 1:
            return net(x.to(device, dtype)).float().cpu()
        out = torch.zeros((1, 3, h * scale, w * scale), dtype=torch.float32)
        for (y0, y1), wy in zip(ys, wys, strict=True):
            for (x0, x1), wx in zip(xs, wxs, strict=True):
                part = net(x[..., y0:y1, x0:x1].to(device, dtype)).float().cpu()
                weight = torch.from_numpy(np.outer(wy, wx))
                out[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] += part * weight
        return out


@dataclass
class _Loaded:
    call: Callable[[Any], Any]
    scale: int
    dtype: Any


def _tiny_upscaler(scale: int, device: str) -> _Loaded:
    """A random-weight conv + pixel-shuffle net: the shape of an ESRGAN, for offline tests."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(16, 3 * scale * scale, 3, padding=1),
            nn.PixelShuffle(scale),
        )
    net = net.to(device).eval()

    def call(t: Any) -> Any:
        with torch.inference_mode():
            return net(t).clamp(0, 1)

    return _Loaded(call, scale, torch.float32)


def _load_model(path: Path, device: str) -> _Loaded:
    import torch

    model = _load_descriptor(path)
    half = device.startswith("cuda") and model.supports_half
    model = model.to(device)
    if half:
        model = model.half()
    return _Loaded(model.eval(), int(model.scale), torch.float16 if half else torch.float32)


def _to_tensor(image: Image.Image) -> Any:
    import torch

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def _to_image(t: Any) -> Image.Image:
    arr = t.squeeze(0).permute(1, 2, 0).clamp(0, 1).mul(255).round().byte().cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def run_upscaler(
    image: Image.Image,
    name: str,
    scale: int,
    device: str,
    folder: str | None,
    cache: dict[str, Any],
    *,
    tile: int = MODEL_TILE,
    overlap: int = MODEL_OVERLAP,
) -> Image.Image:
    """Upscale by a whole factor. A model runs once at its own factor, in tiles of ``tile``
    input pixels; when that is not ``scale`` (a 4x model asked for 2x) Lanczos resizes its
    result to the size asked for. ``cache`` keeps the one model last used."""
    image = image.convert("RGB")
    target = (image.width * scale, image.height * scale)
    if name == "lanczos":
        return image.resize(target, Image.Resampling.LANCZOS)
    import torch

    if name == "tiny-upscaler":
        key: Any = f"{name}@{scale}"
        loader: Callable[[], _Loaded] = lambda: _tiny_upscaler(scale, device)  # noqa: E731
    else:
        files = {m.name: m for m in model_files(folder)}
        found = files.get(name)
        if found is None or found.problem is not None:
            why = f" {found.problem}" if found is not None else ""
            raise ModelNotAvailable(
                f"Upscaler {name!r} is not offered by this worker.{why} It offers "
                f"{available_upscalers(folder)}."
            )
        st = found.path.stat()
        key = (name, st.st_size, st.st_mtime_ns)
        loader = lambda: _load_model(found.path, device)  # noqa: E731
    loaded = cache.get(key)
    if loaded is None:
        cache.clear()  # keep one upscale model resident at a time
        loaded = loader()
        cache[key] = loaded
    big = image.width * image.height * loaded.scale ** 2
    if big > MAX_MODEL_PIXELS:
        raise InvalidRequest(
            f"{name} is a {loaded.scale}x model: {image.width}x{image.height} would become "
            f"{image.width * loaded.scale}x{image.height * loaded.scale} before the resize to "
            f"x{scale}, over this worker's {MAX_MODEL_PIXELS} pixels. Use a smaller image, "
            "a model of a smaller factor, or lanczos."
        )
    x = _to_tensor(image)
    while True:
        try:
            out = _to_image(run_tiled(loaded.call, x, loaded.scale, tile, overlap, device,
                                      loaded.dtype))
            break
        except torch.cuda.OutOfMemoryError:
            if tile // 2 < MIN_MODEL_TILE:
                raise
            tile //= 2
            torch.cuda.empty_cache()
            log.warning("upscaler %s ran out of GPU memory; trying tiles of %d px", name, tile)
    if out.size != target:
        out = out.resize(target, Image.Resampling.LANCZOS)
    return out
