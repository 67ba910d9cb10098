"""Tile planning and seam-free blending for distributed tiled upscaling.

The upscaled image is cut into a grid of equal, overlapping tiles; each tile is sent (with extra
context around it) to whichever worker is free for a low-denoise img2img pass, and the refined
tiles are blended back with weights that fade linearly across every overlap. Everything here is
pure (numpy + PIL, no I/O), so the geometry can be tested without a GPU.

Geometry, per axis (x and y are planned independently, tiles are numbered row-major):

* An axis no longer than ``tile`` gets one tile covering it all (so a small image is one tile).
* A longer axis gets the fewest tiles of exactly ``tile`` px whose overlaps are all at least
  ``overlap``; they are spread evenly from the first to the last pixel, so there is no sliver
  tile at the edge and the actual overlaps may be larger than asked for.
* ``Tile.box`` is the part of the output a tile contributes to; ``Tile.crop`` is what is cut from
  the source and sent to the worker: the box grown by ``padding`` on every side (context, so the
  model sees what lies beyond the tile); at an image edge the window slides inward rather than
  shrinking, so every crop of an image has the same size and tiles batch on a GPU.

Multiple-of-8 policy: diffusers needs crop sides that are multiples of 8, but images need not be.
A crop's side is rounded up to a multiple of 8 and kept inside the image. Only when that is
impossible, because the crop already spans the whole side
of an image whose size is not a multiple of 8 (always true for images smaller than 8 px), does
the crop run past the right or bottom edge, by fewer than 8 px. ``cut_tiles`` fills those pixels
by repeating the edge pixels, and ``blend_tiles`` ignores them (weights are zero outside the box).
So crops always lie within the image rounded up to a multiple of 8.

Blending: along an axis, the weight of tile ``i`` rises linearly from ~0 to ~1 across its overlap
with tile ``i - 1`` and falls across its overlap with tile ``i + 1`` (pixel centres, so it is never
exactly 0 or 1 inside an overlap); the weights of all tiles along an axis are normalised to sum
to 1, and a tile's 2D weight is the product of its x and y weights, so the 2D weights also sum to
1 at every pixel. A constant shift in one tile therefore fades over the whole overlap instead of
showing as a seam. The weights are fixed point (each axis in 1/4096ths whose sum is exactly
4096), and tiles are summed in 32-bit integers: tiles returned unchanged give back the input
exactly, and the order in which tiles arrive from the GPUs cannot change a single pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

from colabswarm.crops import ceil8, crop_edge
from colabswarm.errors import InvalidRequest

__all__ = [
    "Blender",
    "Tile",
    "TilePlan",
    "blend_tiles",
    "cut_tiles",
    "plan_summary",
    "plan_tiles",
    "tile_seed",
]

_MIN_TILE = 64
_BITS = 12
_ONE = 1 << _BITS  # fixed-point unit per axis: 255 * _ONE**2 still fits a uint32 sum


@dataclass(frozen=True)
class Tile:
    """One tile: where its result goes (``box``) and what is sent to the worker (``crop``).

    Both are ``(x0, y0, x1, y1)`` with exclusive ends. ``crop`` contains ``box``, has sides that
    are multiples of 8, and may reach past the right/bottom edge by < 8 px (see module docs).
    """

    index: int
    box: tuple[int, int, int, int]
    crop: tuple[int, int, int, int]


@dataclass(frozen=True)
class TilePlan:
    """The grid for one image: the parameters it was made with and its tiles, row-major."""

    width: int
    height: int
    tile: int
    overlap: int
    padding: int
    tiles: tuple[Tile, ...]

    @cached_property
    def columns(self) -> tuple[tuple[int, int], ...]:
        """The distinct x spans of the boxes, left to right."""
        return tuple(sorted({(t.box[0], t.box[2]) for t in self.tiles}))

    @cached_property
    def rows(self) -> tuple[tuple[int, int], ...]:
        """The distinct y spans of the boxes, top to bottom."""
        return tuple(sorted({(t.box[1], t.box[3]) for t in self.tiles}))

    @cached_property
    def _x_weights(self) -> np.ndarray:
        return _fixed_point(_axis_weights(self.columns, self.width))

    @cached_property
    def _y_weights(self) -> np.ndarray:
        return _fixed_point(_axis_weights(self.rows, self.height))

    def _grid_pos(self, i: int) -> tuple[int, int]:
        """(row, column) of tile ``i``; tiles are numbered row-major."""
        if not 0 <= i < len(self.tiles):
            raise IndexError(f"tile index {i} out of range (plan has {len(self.tiles)} tiles)")
        return divmod(i, len(self.columns))

    def weights(self, i: int) -> np.ndarray:
        """Blend weights of tile ``i`` over its crop (crop height x crop width, float64).

        Zero outside the tile's box (padding is context only), 1 where no other tile overlaps,
        linear ramps across overlaps; summed over all tiles they are 1 at every image pixel.
        """
        r, c = self._grid_pos(i)
        x0, y0, x1, y1 = self.tiles[i].crop
        w = np.outer(self._y_weights[r, y0:y1], self._x_weights[c, x0:x1])
        return w / float(_ONE * _ONE)


def _axis_weights(spans: Sequence[tuple[int, int]], length: int) -> np.ndarray:
    """Per-tile 1D weights along one axis, shape (tiles, length rounded up to 8).

    Telescoping ramps: with F_k rising 0 -> 1 across overlap k (between tiles k and k+1), tile i
    gets F_{i-1} - F_i. That is a partition of unity, zero outside the tile's span, and never
    negative because both ends of the overlaps move right monotonically. Normalising by the sum
    only removes float rounding.
    """
    padded = ceil8(length)
    centres = np.arange(padded, dtype=np.float64) + 0.5
    n = len(spans)
    # rising[k] = F_{k-1}: F_{-1} = 1 everywhere, F_{n-1} = 0 everywhere
    rising = np.zeros((n + 1, padded))
    rising[0] = 1.0
    for k in range(n - 1):
        a, b = spans[k + 1][0], spans[k][1]  # overlap between tile k and k+1
        if b > a:
            rising[k + 1] = np.clip((centres - a) / (b - a), 0.0, 1.0)
        else:  # tiles just touch: hard edge, there is nothing to fade across
            rising[k + 1] = centres >= a
    w = rising[:-1] - rising[1:]
    w[:, length:] = 0.0  # the part of a crop past the image edge never counts
    total = w.sum(axis=0)
    np.divide(w, total, out=w, where=total > 0)
    return w


def _fixed_point(w: np.ndarray) -> np.ndarray:
    """Weights in 1/_ONE units whose sum over tiles is exactly _ONE wherever it was 1: round the
    running sum, not each weight (the differences of a rounded non-decreasing sum are never
    negative)."""
    cum = np.rint(np.cumsum(w, axis=0) * _ONE)
    return np.diff(cum, axis=0, prepend=0).astype(np.uint32)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidRequest(f"{name} must be a whole number of pixels (got {value!r})")
    return int(value)


def _validate(width: int, height: int, tile: int, overlap: int, padding: int) -> None:
    """Reject parameters that cannot give a sane grid, saying what to use instead."""
    for name, value in (("width", width), ("height", height)):
        if value < 1:
            raise InvalidRequest(f"image {name} must be at least 1 px (got {value})")
    if tile % 8:
        near = [v for v in (tile // 8 * 8, tile // 8 * 8 + 8) if v >= _MIN_TILE] or [_MIN_TILE]
        hint = " or ".join(map(str, near))
        raise InvalidRequest(f"tile must be a multiple of 8 (got {tile}); try {hint}")
    if tile < _MIN_TILE:
        raise InvalidRequest(
            f"tile must be at least {_MIN_TILE} px (got {tile}); try 512 (SD 1.5) or 1024 (SDXL)"
        )
    if overlap < 0:
        raise InvalidRequest(f"overlap must be 0 or more (got {overlap}); try {tile // 8}")
    if 2 * overlap >= tile:
        raise InvalidRequest(
            f"overlap must be less than half the tile ({tile} px), got {overlap}; "
            f"try {tile // 8} (a larger overlap would need more tiles than it saves seams)"
        )
    if padding < 0:
        raise InvalidRequest(f"padding must be 0 or more (got {padding}); try 32")


def _axis_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Fewest full-size tiles with overlaps >= ``overlap``, spread evenly over ``length``.

    With n tiles the exact step is (length - tile) / (n - 1) <= tile - overlap; starts are that
    step rounded to whole pixels, so each real step is at most ceil(step) <= tile - overlap.
    """
    if length <= tile:
        return [(0, length)]
    n = -(-(length - overlap) // (tile - overlap))
    room, gaps = length - tile, n - 1
    starts = [(2 * i * room + gaps) // (2 * gaps) for i in range(n)]  # round half up, exact
    return [(s, s + tile) for s in starts]


def _crop_span(start: int, end: int, padding: int, length: int) -> tuple[int, int]:
    """``[start, end)`` grown by padding to a multiple of 8, the same size for every full tile:
    at an edge the window slides inward instead of shrinking, so all crops of an image share
    one size and refine together in batches (an edge tile simply gets its context from one
    side)."""
    size = ceil8(min(end - start + 2 * padding, length))
    if size > length:  # the crop spans the whole side: run past the far edge (edge-replicated)
        return 0, size
    c0 = start - (size - (end - start)) // 2
    c0 = min(max(c0, 0), length - size)
    return c0, c0 + size


def plan_tiles(
    width: int, height: int, tile: int = 512, overlap: int = 64, padding: int = 32
) -> TilePlan:
    """Plan the tile grid for a ``width`` x ``height`` image (see the module docs for the rules).

    Raises InvalidRequest (a ValueError) when the parameters cannot work, with a suggestion.
    """
    width, height = _check_int("width", width), _check_int("height", height)
    tile, overlap = _check_int("tile", tile), _check_int("overlap", overlap)
    padding = _check_int("padding", padding)
    _validate(width, height, tile, overlap, padding)
    xs = [(s, e, *_crop_span(s, e, padding, width)) for s, e in _axis_spans(width, tile, overlap)]
    ys = [(s, e, *_crop_span(s, e, padding, height)) for s, e in _axis_spans(height, tile, overlap)]
    tiles = tuple(
        Tile(
            index=r * len(xs) + c,
            box=(bx0, by0, bx1, by1),
            crop=(cx0, cy0, cx1, cy1),
        )
        for r, (by0, by1, cy0, cy1) in enumerate(ys)
        for c, (bx0, bx1, cx0, cx1) in enumerate(xs)
    )
    return TilePlan(width, height, tile, overlap, padding, tiles)


def cut_tiles(image: Image.Image, plan: TilePlan) -> list[Image.Image]:
    """The crops to send to workers, RGB, in tile order; past-the-edge pixels repeat the edge."""
    if image.size != (plan.width, plan.height):
        raise InvalidRequest(
            f"image is {image.width}x{image.height} but the plan is for "
            f"{plan.width}x{plan.height}; plan the tiles for this image first"
        )
    rgb = image.convert("RGB")
    return [crop_edge(rgb, t.crop) for t in plan.tiles]


class Blender:
    """Blends refined tiles one by one as they arrive, so the blend overlaps the GPUs' work
    instead of following it; ``result()`` once every tile is in."""

    def __init__(self, plan: TilePlan) -> None:
        self.plan = plan
        # integers: the sum is the same whatever order the tiles arrive in, so a seed gives the
        # same picture whichever GPU was first
        self._acc = np.zeros((plan.height, plan.width, 3), dtype=np.uint32)
        self._seen: set[int] = set()

    def add(self, index: int, img: Image.Image) -> None:
        t = self.plan.tiles[index]
        if index in self._seen:
            raise InvalidRequest(f"tile {index} was blended twice")
        cx0, cy0, cx1, cy1 = t.crop
        if img.size != (cx1 - cx0, cy1 - cy0):
            raise InvalidRequest(
                f"tile {t.index} came back {img.width}x{img.height} but was sent as "
                f"{cx1 - cx0}x{cy1 - cy0}; the refiner must keep each tile's size"
            )
        bx0, by0, bx1, by1 = t.box
        r, c = self.plan._grid_pos(t.index)
        w = np.outer(self.plan._y_weights[r, by0:by1], self.plan._x_weights[c, bx0:bx1])
        px = np.asarray(img.convert("RGB"))[by0 - cy0 : by1 - cy0, bx0 - cx0 : bx1 - cx0]
        self._acc[by0:by1, bx0:bx1] += px * w[:, :, None]  # uint8 * uint32: no overflow
        self._seen.add(index)

    def result(self) -> Image.Image:
        missing = len(self.plan.tiles) - len(self._seen)
        if missing:
            raise InvalidRequest(f"{missing} tiles are still missing; blend every tile first")
        half = np.uint32(1 << (2 * _BITS - 1))  # round to nearest; the largest sum is 255 * _ONE**2
        out = (self._acc + half) >> np.uint32(2 * _BITS)
        return Image.fromarray(out.astype(np.uint8), "RGB")


def blend_tiles(plan: TilePlan, tiles: Sequence[Image.Image]) -> Image.Image:
    """Put refined crops (same sizes as ``cut_tiles`` made them) back together, seam-free."""
    if len(tiles) != len(plan.tiles):
        raise InvalidRequest(
            f"got {len(tiles)} tiles but the plan has {len(plan.tiles)}; "
            "pass one refined image per tile, in the order cut_tiles returned them"
        )
    blender = Blender(plan)
    for t, img in zip(plan.tiles, tiles, strict=True):
        blender.add(t.index, img)
    return blender.result()


def tile_seed(base_seed: int, index: int) -> int:
    """Seed for tile ``index``: ``base_seed + index``.

    Deterministic so a rerun (or a retry on another worker) refines each tile the same way, and
    distinct per tile so tiles don't all get the same noise pattern (which can show as repeats).
    """
    if index < 0:
        raise InvalidRequest(f"tile index must be 0 or more (got {index})")
    return int(base_seed) + int(index)


def plan_summary(plan: TilePlan) -> str:
    """One line for logs and progress bars, e.g. '3x3 tiles of 512 px, 64 px overlap'."""
    size = f"{plan.width}x{plan.height}"
    if len(plan.tiles) == 1:
        return f"1 tile ({size} fits in one {plan.tile} px tile)"
    return (
        f"{len(plan.columns)}x{len(plan.rows)} tiles of {plan.tile} px over {size}, "
        f"{plan.overlap} px overlap, {plan.padding} px padding"
    )
