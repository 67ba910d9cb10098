"""Saving images with their parameters, A1111-style, so other tools can read them back.

The ``parameters`` text chunk is laid out as A1111 writes it (``processing.create_infotext``):
the prompt, with a ``<lora:name:weight>`` tag per LoRA; ``Negative prompt: ...``; then one line
of ``Key: value`` fields in A1111's order (Steps, Sampler, CFG scale, Seed, Size, Model,
Denoising strength, Clip skip, Lora hashes, then colabswarm's own), a value in JSON quotes when
it holds a comma, a colon or a line break. ``parse_parameters`` reads it back by A1111's own
rules (``parse_generation_parameters``), so what A1111, civitai and other readers see is what
the tests read.
"""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from ..backend.png import with_text
from ..errors import InvalidRequest, WorkerMisbehaved
from ..prompts import parse_lora_tags, prompt_with_loras
from ..samplers import DEFAULT_SAMPLER, canonical_sampler

__all__ = [
    "GeneratedImage",
    "loras_from_parameters",
    "parameters_text",
    "parse_parameters",
    "read_parameters",
    "save_image",
]

log = logging.getLogger("colabswarm.outputs")
_SHORT_HASH = 12  # A1111 writes the first 12 hex digits of a LoRA's hash


class GeneratedImage:
    """One finished image: the picture, its seed, who made it and how long it took.

    An image that came from a worker as a checked PNG (`png`) is decoded on first use of
    `.image`: the controller spends no CPU on pixels nobody looks at, and saving writes the
    worker's bytes with the parameters added instead of decoding and encoding them again."""

    __slots__ = ("_image", "backend", "index", "params", "path", "png", "seconds", "seed")

    def __init__(self, image: Image.Image | None, seed: int, backend: str, index: int,
                 seconds: float, params: dict[str, Any], path: Path | None = None,
                 png: bytes | None = None) -> None:
        if image is None and png is None:
            raise ValueError("a GeneratedImage needs its image or its PNG bytes")
        self._image = image
        self.png = png
        self.seed, self.backend, self.index = seed, backend, index
        self.seconds, self.params, self.path = seconds, params, path

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            assert self.png is not None
            try:
                image = Image.open(io.BytesIO(self.png))
                image.load()
            except Exception as exc:  # the chunks were whole, the pixel stream was not
                raise WorkerMisbehaved(
                    f"The image of seed {self.seed} from {self.backend} cannot be decoded "
                    f"({type(exc).__name__}): that worker sent a broken PNG.") from None
            self._image = image
        return self._image

    @image.setter
    def image(self, value: Image.Image) -> None:
        self._image, self.png = value, None

    def __repr__(self) -> str:
        return (f"GeneratedImage(seed={self.seed}, backend={self.backend!r}, "
                f"index={self.index})")

    def _repr_png_(self) -> bytes:  # notebooks display it directly
        if self.png is not None:
            return self.png
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()


def _lora_entries(loras: Any) -> list[tuple[str, float, str | None]]:
    """(name, weight, hash) from a job's loras: LoraRef objects, their dicts, or a
    {name: weight} mapping (no hashes)."""
    if not loras:
        return []
    if isinstance(loras, dict):
        return [(str(n), float(w), None) for n, w in loras.items()]
    out = []
    for lo in loras:
        get = lo.get if isinstance(lo, dict) else lambda k, _lo=lo: getattr(_lo, k, None)
        out.append((str(get("name")), float(get("weight") or 0.0), get("hash")))
    return out


def _number(value: Any) -> Any:
    """7.0 -> 7, 0.30000000000000004 stays: numbers as A1111's infotexts show them."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _quote(value: Any) -> str:
    """A value as A1111 writes it: in JSON quotes when it holds ',', ':' or a line break."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def parameters_text(params: dict[str, Any], seed: int, backend: str | None = None) -> str:
    """The 'parameters' text chunk in the layout A1111, ComfyUI readers and civitai parse."""
    loras = _lora_entries(params.get("loras"))
    prompt = str(params.get("prompt", ""))
    try:
        prompt = prompt_with_loras(prompt, {name: w for name, w, _ in loras})
    except InvalidRequest as exc:  # never lose an image over its caption
        log.warning("writing the prompt as given: %s", exc)
    lines = [prompt]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    sampler = params.get("sampler") or DEFAULT_SAMPLER
    try:
        sampler = canonical_sampler(sampler)
    except InvalidRequest:
        pass
    clip_skip = params.get("clip_skip") or 1
    hashes = ", ".join(f"{name}: {h[:_SHORT_HASH]}" for name, _, h in loras if h)
    fields = [
        ("Steps", params.get("steps")),
        ("Sampler", sampler),
        ("CFG scale", _number(params.get("cfg"))),
        ("Seed", seed),
        ("Size", f"{params.get('width')}x{params.get('height')}"),
        ("Model", params.get("model") or "default"),
    ]
    if params.get("kind") in ("img2img", "upscale"):
        fields.append(("Denoising strength", _number(params.get("strength"))))
    fields.append(("Clip skip", clip_skip if clip_skip > 1 else None))
    fields.append(("Lora hashes", hashes or None))
    if params.get("upscale"):
        fields.append(("Upscale", params["upscale"]))
    if params.get("grid") and isinstance(params["grid"], str):
        fields.append(("Script", "X/Y plot"))
        fields.append(("Grid", params["grid"]))
    if backend:
        fields.append(("Backend", backend))
    fields.append(("Generator", "colabswarm"))
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields if v is not None))
    return "\n".join(lines)


# A1111's infotext grammar: a key (a word character, then words, spaces, '-' or '/'), ':',
# then a JSON-quoted string or anything up to the next comma
_FIELD = re.compile(r'\s*(\w[\w /-]+):\s*("(?:[^"\\]|\\.)+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_parameters(text: str) -> dict[str, str]:
    """Read a 'parameters' text by A1111's rules (``parse_generation_parameters``): "Prompt"
    and "Negative prompt" from the lines before the last, each ``Key: value`` of the last line
    (when it holds at least 3) as text, quoted values unquoted, "Size" also as "Size-1" and
    "Size-2"; no "Clip skip" reads as "1", as in A1111."""
    *lines, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:"):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _FIELD.findall(last):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        size = _SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    out.setdefault("Clip skip", "1")
    return out


def loras_from_parameters(fields: dict[str, str]) -> list[tuple[str, float, str | None]]:
    """(name, weight, short hash or None) of each LoRA in parsed parameters: the prompt's
    ``<lora:name:w>`` tags, with hashes from "Lora hashes"."""
    _, tags = parse_lora_tags(fields.get("Prompt", ""))
    hashes: dict[str, str] = {}
    for item in fields.get("Lora hashes", "").split(","):
        name, sep, h = item.rpartition(":")
        if sep and name.strip():
            hashes[name.strip()] = h.strip()
    return [(name, w, hashes.get(name)) for name, w in tags.items()]


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit] or "image"


def save_image(img: GeneratedImage, folder: str | Path, label: str | None = None) -> Path:
    """Write a PNG with its parameters chunk; never overwrites an earlier file. The name is
    <seed>-[label-|upscale-]<prompt>.png."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = "upscale-" if img.params.get("kind") == "upscale" else ""
    if label:
        kind = f"{_slug(label, 20)}-"
    stem = f"{img.seed}-{kind}{_slug(str(img.params.get('prompt', '')))}"
    path = folder / f"{stem}.png"
    n = 1
    while path.exists():
        path = folder / f"{stem}-{n}.png"
        n += 1
    text = parameters_text(img.params, img.seed, img.backend)
    if img.png is not None:  # the worker's own bytes, with the parameters added
        path.write_bytes(with_text(img.png, "parameters", text))
    else:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        img.image.save(path, format="PNG", pnginfo=info)
    img.path = path
    return path


def read_parameters(path: str | Path) -> str | None:
    """The raw 'parameters' text of a PNG (``parse_parameters`` reads it into fields)."""
    with Image.open(path) as im:
        return im.info.get("parameters")
