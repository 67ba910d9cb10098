"""X/Y grids, pure: which cells an axis pair makes, and the labelled grid image.

An axis is (what, values). What may be: "prompt" (A1111's prompt search/replace: the first
value is the text to find in the prompt, each value replaces it in turn, the first one leaving
the prompt as it is), "negative_prompt" (the same, in the negative prompt), "seed", "sampler",
"cfg", "steps", "clip_skip", "model", or "lora:<name>" (that LoRA's weight). A cell is the
generation's parameters with one value of each axis applied; the controller runs every cell
across the swarm like any image and this module lays the results out with their labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..errors import InvalidRequest
from ..prompts import format_weight

__all__ = ["AXES", "Axis", "apply_axis", "compose_grid", "parse_axis"]

AXES = ("prompt", "negative_prompt", "seed", "sampler", "cfg", "steps", "clip_skip", "model",
        "lora:<name>")
_NUMERIC = {"seed": int, "cfg": float, "steps": int, "clip_skip": int}
_MAX_VALUES = 64
_MAX_CELLS = 1024


@dataclass(frozen=True)
class Axis:
    what: str
    values: tuple[Any, ...]

    @property
    def title(self) -> str:
        if self.what.startswith("lora:"):
            return f"LoRA {self.what[5:]} weight"
        return {"prompt": "Prompt S/R", "negative_prompt": "Negative S/R", "cfg": "CFG scale",
                "clip_skip": "Clip skip"}.get(self.what, self.what.capitalize())

    def label(self, value: Any) -> str:
        if isinstance(value, float):
            return format_weight(value)
        return str(value)


def parse_axis(axis: Any, name: str) -> Axis | None:
    """An axis from what a caller gave: None, or a (what, values) pair."""
    if axis is None:
        return None
    if not (isinstance(axis, tuple | list) and len(axis) == 2):
        raise InvalidRequest(f"{name} must be a pair (what, values), e.g. ('cfg', [5, 7, 9]); "
                             f"what is one of {', '.join(AXES)}.")
    what, values = axis
    if not isinstance(what, str) or not (what in AXES or what.startswith("lora:")):
        raise InvalidRequest(f"{name}: unknown axis {what!r}; use one of {', '.join(AXES)}.")
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise InvalidRequest(f"{name}: give a non-empty list of values for {what!r}.")
    if len(values) > _MAX_VALUES:
        raise InvalidRequest(f"{name}: at most {_MAX_VALUES} values per axis.")
    cast = float if what.startswith("lora:") else _NUMERIC.get(what)
    out = []
    for v in values:
        if cast is not None:
            try:
                v = cast(v)
            except (TypeError, ValueError):
                raise InvalidRequest(f"{name}: {v!r} is not a valid {what}.") from None
            if isinstance(v, float) and not math.isfinite(v):
                raise InvalidRequest(f"{name}: {what} must be finite.")
        elif not isinstance(v, str):
            raise InvalidRequest(f"{name}: {what} values are text, not {type(v).__name__}.")
        out.append(v)
    if what in ("prompt", "negative_prompt") and len(out) < 2:
        raise InvalidRequest(f"{name}: prompt search/replace needs the text to find and at "
                             "least one replacement.")
    return Axis(what, tuple(out))


def apply_axis(axis: Axis | None, index: int, kw: dict[str, Any]) -> dict[str, Any]:
    """The generation keywords with the axis's index-th value applied (a copy)."""
    if axis is None:
        return kw
    kw = dict(kw)
    value = axis.values[index]
    if axis.what in ("prompt", "negative_prompt"):
        key = axis.what
        text = kw.get(key) or ""
        find = axis.values[0]
        if find not in text:
            where = key.replace("_", " ")
            raise InvalidRequest(f"Prompt search/replace: {find!r} is not in the {where} "
                                 f"{text[:80]!r}.")
        kw[key] = text.replace(find, value)
    elif axis.what.startswith("lora:"):
        kw["loras"] = {**(kw.get("loras") or {}), axis.what[5:]: value}
    else:
        kw[axis.what] = value
    return kw


def cell_count(x: Axis | None, y: Axis | None) -> int:
    n = (len(x.values) if x else 1) * (len(y.values) if y else 1)
    if n > _MAX_CELLS:
        raise InvalidRequest(f"A grid of {n} cells is over {_MAX_CELLS}; use fewer values.")
    return n


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    return lines[:4] or [""]


def compose_grid(cells: Sequence[Sequence[Image.Image]], x: Axis | None, y: Axis | None
                 ) -> Image.Image:
    """The grid image: cells[row][col], the x axis's values over the columns, the y axis's
    down the left side, each axis titled."""
    rows, cols = len(cells), len(cells[0])
    w, h = cells[0][0].size
    size = max(12, min(w, h) // 16)
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = size + size // 3
    top = (5 * line_h + 8) if x else 0
    left = max(w // 2, 120) if y else 0
    grid = Image.new("RGB", (left + cols * w, top + rows * h), "white")
    draw = ImageDraw.Draw(grid)
    if x:
        draw.text((left + 4, 2), x.title, fill="black", font=font)
        for c in range(cols):
            lines = _wrap(probe, x.label(x.values[c]), font, w - 8)
            for k, text in enumerate(lines):
                tw = draw.textlength(text, font=font)
                draw.text((left + c * w + (w - tw) / 2, 4 + line_h * (k + 1)), text,
                          fill="black", font=font)
    if y:
        draw.text((4, max(top - line_h, 2) if x else 2), y.title, fill="black", font=font)
        for r in range(rows):
            lines = _wrap(probe, y.label(y.values[r]), font, left - 8)
            y0 = top + r * h + (h - len(lines) * line_h) / 2
            for k, text in enumerate(lines):
                draw.text((4, y0 + k * line_h), text, fill="black", font=font)
    for r in range(rows):
        for c in range(cols):
            grid.paste(cells[r][c].convert("RGB"), (left + c * w, top + r * h))
    return grid
