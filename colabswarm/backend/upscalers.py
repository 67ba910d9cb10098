"""Upscalers a worker runs before tiles are refined: Lanczos, a tiny test net, ESRGAN-family.

Model files come only from the folder the worker's owner names; a request can pick one by name,
never by path, and pickle files are never unpickled (``.pth`` goes through a weights-only load).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InvalidRequest

__all__ = ["available_upscalers", "run_upscaler"]

_BUILTIN = ("lanczos", "tiny-upscaler")
_MODEL_SUFFIXES = (".safetensors", ".pth")


def available_upscalers(folder: str | None) -> list[str]:
    names = list(_BUILTIN)
    if folder and os.path.isdir(folder):
        for entry in sorted(os.listdir(folder)):
            if entry.lower().endswith(_MODEL_SUFFIXES):
                names.append(Path(entry).stem)
    return names


def _tiny_upscaler(scale: int, device: str) -> Any:
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
    return net.to(device).eval()


def _load_model_file(path: Path, device: str) -> Any:
    try:
        import spandrel
    except ImportError:
        raise InvalidRequest(
            "Upscale models need the 'spandrel' package on the worker: pip install spandrel."
        ) from None
    if path.suffix.lower() == ".pth":
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        model = spandrel.ModelLoader().load_from_state_dict(state)
    else:
        model = spandrel.ModelLoader().load_from_file(str(path))
    return model.to(device).eval()


def _to_tensor(image: Image.Image, device: str) -> Any:
    import numpy as np
    import torch

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).to(device)


def _to_image(t: Any) -> Image.Image:
    import numpy as np

    arr = t.squeeze(0).permute(1, 2, 0).clamp(0, 1).mul(255).round().byte().cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def run_upscaler(
    image: Image.Image,
    name: str,
    scale: int,
    device: str,
    folder: str | None,
    cache: dict[str, Any],
) -> Image.Image:
    """Upscale by an integer factor; a model of another native factor is finished by Lanczos."""
    image = image.convert("RGB")
    target = (image.width * scale, image.height * scale)
    if name == "lanczos":
        return image.resize(target, Image.Resampling.LANCZOS)
    import torch

    key = f"{name}@{scale}" if name == "tiny-upscaler" else name
    net = cache.get(key)
    if net is None:
        if name == "tiny-upscaler":
            net = _tiny_upscaler(scale, device)
        else:
            if name not in available_upscalers(folder):
                raise InvalidRequest(
                    f"Unknown upscaler {name!r}; this worker has {available_upscalers(folder)}."
                )
            assert folder is not None
            path = next(
                Path(folder) / f for f in os.listdir(folder) if Path(f).stem == name
            )
            net = _load_model_file(path, device)
        cache.clear()  # keep one upscale model resident at a time
        cache[key] = net
    with torch.inference_mode():
        out = _to_image(net(_to_tensor(image, device)))
    if out.size != target:
        out = out.resize(target, Image.Resampling.LANCZOS)
    return out
