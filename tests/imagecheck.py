"""How tests compare images: exactly where the pixels are exact, within a stated tolerance where
CPU/GPU kernels may round differently.

A seed gives exactly the same image at the same batch size on the same worker. Alone vs inside
a batch, or on another worker (another processor), batched kernels may round differently: on a
2-core AMD EPYC the tiny model's images differed by at most 1/255 in about 6 of 100,000 values
(docs/ARCHITECTURE.md, "Same seed, same image"). The tolerance below keeps a margin for other
processors, yet fails at once when a batch mixes seeds up (those images differ by ~100/255).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PIXEL_TOLERANCE = 2        # largest difference of one value, out of 255
SHARE_TOLERANCE = 0.01     # share of values that may differ at all


def _arr(im: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


def image_diff(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> tuple[int, float]:
    """(largest difference of one value, share of values that differ)."""
    x, y = _arr(a), _arr(b)
    assert x.shape == y.shape, f"sizes differ: {x.shape} vs {y.shape}"
    d = np.abs(x - y)
    return int(d.max()), float((d > 0).mean())


def assert_identical(a, b, what: str = "images") -> None:
    biggest, share = image_diff(a, b)
    assert biggest == 0, f"{what} must be identical: differ by up to {biggest}/255 in {share:.2%}"


def assert_same_picture(a, b, what: str = "images") -> None:
    """Equal up to kernel rounding (alone vs batched, one worker vs another)."""
    biggest, share = image_diff(a, b)
    assert biggest <= PIXEL_TOLERANCE and share <= SHARE_TOLERANCE, (
        f"{what} must be the same picture up to rounding (<= {PIXEL_TOLERANCE}/255 in <= "
        f"{SHARE_TOLERANCE:.0%} of values): differ by up to {biggest}/255 in {share:.2%}")


def assert_different(a, b, what: str = "images") -> None:
    """Clearly different pictures, not a rounding difference."""
    x, y = _arr(a), _arr(b)
    assert x.shape != y.shape or float(np.abs(x - y).mean()) > 4 * PIXEL_TOLERANCE, (
        f"{what} must differ clearly")


def assert_not_same_picture(a, b, what: str = "images") -> None:
    """More than a rounding difference (a LoRA's or a setting's effect, however small)."""
    biggest, share = image_diff(a, b)
    assert biggest > PIXEL_TOLERANCE or share > SHARE_TOLERANCE, (
        f"{what} must differ by more than rounding: up to {biggest}/255 in {share:.2%}")
