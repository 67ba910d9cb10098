"""The worker's PNG writer: any RGB image comes back pixel for pixel through Pillow."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from colabswarm.backend.png import encode_png


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 97), h=st.integers(1, 97), seed=st.integers(0, 2**32 - 1),
       level=st.sampled_from([0, 1, 6]))
def test_roundtrip_is_lossless(w: int, h: int, seed: int, level: int) -> None:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    data = encode_png(Image.fromarray(a, "RGB"), level)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (w, h)
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        assert np.array_equal(np.asarray(im), a)


def test_other_modes_fall_back_to_pillow() -> None:
    img = Image.new("RGBA", (16, 8), (1, 2, 3, 4))
    with Image.open(io.BytesIO(encode_png(img))) as im:
        assert im.mode == "RGBA" and im.getpixel((3, 3)) == (1, 2, 3, 4)
