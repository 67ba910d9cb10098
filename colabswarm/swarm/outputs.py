"""Saving images with their parameters, A1111-style, so other tools can read them back."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

__all__ = ["GeneratedImage", "parameters_text", "read_parameters", "save_image"]


@dataclass
class GeneratedImage:
    """One finished image: the picture, its seed, who made it and how long it took."""

    image: Image.Image
    seed: int
    backend: str
    index: int
    seconds: float
    params: dict[str, Any]
    path: Path | None = None

    def _repr_png_(self) -> bytes:  # notebooks display it directly
        import io

        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()


def parameters_text(params: dict[str, Any], seed: int, backend: str | None = None) -> str:
    """The 'parameters' text chunk in the layout A1111, ComfyUI readers and civitai parse."""
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = [
        ("Steps", params.get("steps")),
        ("Sampler", "Euler"),
        ("CFG scale", params.get("cfg")),
        ("Seed", seed),
        ("Size", f"{params.get('width')}x{params.get('height')}"),
        ("Model", params.get("model") or "default"),
    ]
    if params.get("kind") in ("img2img", "upscale"):
        fields.append(("Denoising strength", params.get("strength")))
    if params.get("upscale"):
        fields.append(("Upscale", params["upscale"]))
    if backend:
        fields.append(("Backend", backend))
    fields.append(("Generator", "colabswarm"))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit] or "image"


def save_image(img: GeneratedImage, folder: str | Path) -> Path:
    """Write a PNG with its parameters chunk; never overwrites an earlier file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = "upscale-" if img.params.get("kind") == "upscale" else ""
    stem = f"{img.seed}-{kind}{_slug(str(img.params.get('prompt', '')))}"
    path = folder / f"{stem}.png"
    n = 1
    while path.exists():
        path = folder / f"{stem}-{n}.png"
        n += 1
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(img.params, img.seed, img.backend))
    img.image.save(path, format="PNG", pnginfo=info)
    img.path = path
    return path


def read_parameters(path: str | Path) -> str | None:
    with Image.open(path) as im:
        return im.info.get("parameters")
