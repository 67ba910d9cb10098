"""Cutting a box out of an image, with pixels past the right/bottom edge repeating the edge.

One rule shared by the controller's tiler (``swarm/tiles.py``) and the worker, which cuts the
tiles of an upscale itself from the source it upscaled: both must give the same pixels, or a
tile refined on one machine would not match the plan made on the other.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["ceil8", "crop_edge", "fits_edge_rule"]


def ceil8(n: int) -> int:
    """n rounded up to a multiple of 8 (diffusers' sizes, and how far tiles may pass an edge)."""
    return -(-n // 8) * 8


def fits_edge_rule(box: tuple[int, int, int, int], width: int, height: int) -> bool:
    """True if ``box`` lies in the image grown to the next multiple of 8 (how far tiles may
    reach past an edge)."""
    x0, y0, x1, y1 = box
    return 0 <= x0 < x1 <= ceil8(width) and 0 <= y0 < y1 <= ceil8(height)


def crop_edge(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """``image.crop(box)`` in RGB, except that pixels past the edge repeat the edge (Pillow would
    fill them with black, which the model would then paint into the tile's context)."""
    x0, y0, x1, y1 = box
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if x1 <= rgb.width and y1 <= rgb.height:
        return rgb.crop(box)
    arr = np.asarray(rgb)
    pad = ((0, max(y1 - rgb.height, 0)), (0, max(x1 - rgb.width, 0)), (0, 0))
    return Image.fromarray(np.ascontiguousarray(np.pad(arr, pad, mode="edge")[y0:y1, x0:x1]))
