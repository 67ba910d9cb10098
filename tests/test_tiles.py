"""Tile planning and blending: geometry invariants, exact identity round trip, no visible seams."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from colabswarm.errors import InvalidRequest
from colabswarm.swarm.tiles import (
    Tile,
    TilePlan,
    blend_tiles,
    cut_tiles,
    plan_summary,
    plan_tiles,
    tile_seed,
)

FAST = settings(max_examples=100, deadline=None)


def _ceil8(n: int) -> int:
    return -(-n // 8) * 8


@st.composite
def plans(draw: st.DrawFn, max_side: int = 1200) -> TilePlan:
    """Random but valid plan parameters, including images smaller than 8 px."""
    width = draw(st.integers(1, max_side))
    height = draw(st.integers(1, max_side))
    tile = draw(st.integers(8, 64)) * 8
    overlap = draw(st.integers(0, tile // 2 - 1))
    padding = draw(st.integers(0, 128))
    return plan_tiles(width, height, tile=tile, overlap=overlap, padding=padding)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _axis_spans(plan: TilePlan, axis: int) -> list[tuple[int, int]]:
    return sorted({(t.box[axis], t.box[axis + 2]) for t in plan.tiles})


# --- geometry -------------------------------------------------------------------------------


@FAST
@given(plans())
def test_boxes_cover_every_pixel_and_crops_are_multiples_of_8(plan: TilePlan) -> None:
    covered = np.zeros((plan.height, plan.width), dtype=np.int32)
    for i, t in enumerate(plan.tiles):
        assert t.index == i
        bx0, by0, bx1, by1 = t.box
        cx0, cy0, cx1, cy1 = t.crop
        assert 0 <= bx0 < bx1 <= plan.width and 0 <= by0 < by1 <= plan.height
        # crop contains the box, lies within the image rounded up to 8, sides multiples of 8
        assert 0 <= cx0 <= bx0 and bx1 <= cx1 <= _ceil8(plan.width)
        assert 0 <= cy0 <= by0 and by1 <= cy1 <= _ceil8(plan.height)
        assert (cx1 - cx0) % 8 == 0 and (cy1 - cy0) % 8 == 0
        # running past the edge happens only when there was no other way
        if cx1 > plan.width:
            assert cx0 == 0 and plan.width % 8
        if cy1 > plan.height:
            assert cy0 == 0 and plan.height % 8
        # padding is honoured wherever the image allows it
        assert cx0 <= max(0, bx0 - plan.padding) and cx1 >= min(plan.width, bx1 + plan.padding)
        assert cy0 <= max(0, by0 - plan.padding) and cy1 >= min(plan.height, by1 + plan.padding)
        covered[by0:by1, bx0:bx1] += 1
    assert covered.min() >= 1


@FAST
@given(plans())
def test_tiles_are_evenly_spread_with_at_least_the_overlap_and_no_sliver(plan: TilePlan) -> None:
    for axis, length in ((0, plan.width), (1, plan.height)):
        spans = _axis_spans(plan, axis)
        if length <= plan.tile:
            assert spans == [(0, length)]
            continue
        assert all(e - s == plan.tile for s, e in spans)  # no sliver: every tile is full size
        assert spans[0][0] == 0 and spans[-1][1] == length
        steps = [b[0] - a[0] for a, b in zip(spans, spans[1:], strict=False)]
        assert all(plan.tile - step >= plan.overlap for step in steps)
        assert max(steps) - min(steps) <= 1  # even spacing
        # and the fewest tiles that can do it: one fewer could not reach the far edge
        n = len(spans)
        assert (n - 1) * plan.tile - (n - 2) * plan.overlap < length


@FAST
@given(st.integers(1, 512), st.integers(1, 512), st.integers(8, 64))
def test_an_image_that_fits_is_one_tile(width: int, height: int, tile8: int) -> None:
    tile = max(tile8 * 8, width, height)
    tile = _ceil8(tile)
    plan = plan_tiles(width, height, tile=tile, overlap=0, padding=16)
    assert len(plan.tiles) == 1
    assert plan.tiles[0].box == (0, 0, width, height)
    assert plan.tiles[0].crop == (0, 0, _ceil8(width), _ceil8(height))
    assert np.all(plan.weights(0)[:height, :width] == 1.0)


def test_known_grid() -> None:
    plan = plan_tiles(2048, 2048, tile=512, overlap=64, padding=32)
    assert len(plan.tiles) == 25
    assert _axis_spans(plan, 0) == [(0, 512), (384, 896), (768, 1280), (1152, 1664), (1536, 2048)]
    assert plan.tiles[0].crop == (0, 0, 576, 576), "an edge crop slides inward, same size"
    assert plan.tiles[6].crop == (352, 352, 928, 928)
    assert plan.tiles[24].crop == (1472, 1472, 2048, 2048)
    assert len({(x1 - x0, y1 - y0) for x0, y0, x1, y1 in (t.crop for t in plan.tiles)}) == 1, \
        "one crop size: every tile can share a batch"
    assert plan_summary(plan) == "5x5 tiles of 512 px over 2048x2048, 64 px overlap, 32 px padding"


def test_odd_sizes_stay_inside_the_image_when_they_can() -> None:
    plan = plan_tiles(1003, 777, tile=512, overlap=64, padding=31)
    for t in plan.tiles:
        x0, y0, x1, y1 = t.crop
        assert (x1 - x0) % 8 == 0 and (y1 - y0) % 8 == 0
        assert x1 <= 1003 and y1 <= 777


def test_tiny_image_is_padded_to_8() -> None:
    plan = plan_tiles(5, 3)
    assert plan.tiles == (Tile(0, (0, 0, 5, 3), (0, 0, 8, 8)),)
    img = _noise(5, 3)
    (crop,) = cut_tiles(img, plan)
    assert crop.size == (8, 8) and crop.mode == "RGB"
    arr = np.asarray(crop)
    assert np.array_equal(arr[:3, 5:], np.repeat(arr[:3, 4:5], 3, axis=1))  # edge replicated
    assert np.array_equal(arr[3:], np.repeat(arr[2:3], 5, axis=0))
    assert np.array_equal(np.asarray(blend_tiles(plan, [crop])), np.asarray(img))


# --- weights --------------------------------------------------------------------------------


@FAST
@given(plans())
def test_weights_sum_to_one_and_vanish_outside_the_box(plan: TilePlan) -> None:
    total = np.zeros((_ceil8(plan.height), _ceil8(plan.width)))
    count = np.zeros_like(total, dtype=np.int32)
    for i, t in enumerate(plan.tiles):
        w = plan.weights(i)
        cx0, cy0, cx1, cy1 = t.crop
        bx0, by0, bx1, by1 = t.box
        assert w.dtype == np.float64 and w.shape == (cy1 - cy0, cx1 - cx0)
        assert w.min() >= 0.0 and w.max() <= 1.0
        inside = np.zeros(w.shape, dtype=bool)
        inside[by0 - cy0 : by1 - cy0, bx0 - cx0 : bx1 - cx0] = True
        assert np.all(w[~inside] == 0.0)
        assert np.all(w[inside] > 0.0)  # every box pixel contributes something
        total[cy0:cy1, cx0:cx1] += w
        count[by0:by1, bx0:bx1] += 1
    image = np.s_[: plan.height, : plan.width]
    np.testing.assert_allclose(total[image], 1.0, rtol=0, atol=1e-12)
    assert np.all(total[plan.height :] == 0) and np.all(total[:, plan.width :] == 0)
    # where only one tile covers a pixel, that tile has it all
    alone = count[image] == 1
    for i, t in enumerate(plan.tiles):
        bx0, by0, bx1, by1 = t.box
        w = plan.weights(i)
        cx0, cy0 = t.crop[:2]
        sub = w[by0 - cy0 : by1 - cy0, bx0 - cx0 : bx1 - cx0]
        assert np.all(sub[alone[by0:by1, bx0:bx1]] == 1.0)


def test_weights_ramp_linearly_across_an_overlap() -> None:
    plan = plan_tiles(960, 100, tile=512, overlap=64, padding=0)
    (a0, a1), (b0, b1) = _axis_spans(plan, 0)
    w0, w1 = plan.weights(0)[0], plan.weights(1)[0]
    band = np.arange(b0, a1)
    np.testing.assert_allclose(w1[band - b0], (band - b0 + 0.5) / (a1 - b0))
    np.testing.assert_allclose(w0[band] + w1[band - b0], 1.0)
    assert np.all(np.diff(w0[band]) < 0) and np.all(np.diff(w1[band - b0]) > 0)


# --- round trip and seams ----------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(plans(max_side=700), st.integers(0, 2**32 - 1))
def test_identity_refiner_reconstructs_exactly(plan: TilePlan, seed: int) -> None:
    img = _noise(plan.width, plan.height, seed)
    crops = cut_tiles(img, plan)
    assert [c.size for c in crops] == [
        (t.crop[2] - t.crop[0], t.crop[3] - t.crop[1]) for t in plan.tiles
    ]
    out = blend_tiles(plan, crops)
    assert out.mode == "RGB" and out.size == img.size
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_identity_exact_for_extreme_values() -> None:
    plan = plan_tiles(300, 300, tile=64, overlap=31, padding=5)
    for value in (0, 1, 254, 255):
        img = Image.new("RGB", (300, 300), (value, 255 - value, value))
        assert np.array_equal(np.asarray(blend_tiles(plan, cut_tiles(img, plan))), np.asarray(img))


def test_cut_converts_to_rgb() -> None:
    plan = plan_tiles(100, 70, tile=64, overlap=8)
    for mode in ("L", "RGBA", "P"):
        crops = cut_tiles(Image.new(mode, (100, 70)), plan)
        assert all(c.mode == "RGB" for c in crops)


def _shift(crop: Image.Image, amount: int) -> Image.Image:
    return Image.fromarray((np.asarray(crop).astype(np.int16) + amount).astype(np.uint8), "RGB")


def _max_jump(img: Image.Image) -> int:
    a = np.asarray(img).astype(np.int16)
    jumps = [np.abs(np.diff(a, axis=axis)) for axis in (0, 1) if a.shape[axis] > 1]
    return int(max((j.max() for j in jumps), default=0))


def _min_overlap(plan: TilePlan) -> int:
    gaps = [
        a[1] - b[0]
        for axis in (0, 1)
        for a, b in zip(_axis_spans(plan, axis), _axis_spans(plan, axis)[1:], strict=False)
    ]
    return min(gaps)


def _ramps_meet(plan: TilePlan) -> bool:
    """True when some pixel lies in three tiles along an axis (two ramps at once)."""
    for axis in (0, 1):
        spans = _axis_spans(plan, axis)
        if any(c[0] < a[1] for a, c in zip(spans, spans[2:], strict=False)):
            return True
    return False


@FAST
@given(plans(max_side=900), st.data())
def test_a_per_tile_constant_fades_instead_of_showing_a_seam(
    plan: TilePlan, data: st.DataObject
) -> None:
    """A refiner that shifts each tile's brightness must not leave a visible step at seams.

    On a flat image the only changes come from the blend; adjacent pixels may differ by at most
    the spread of the shifts divided by the overlap width (twice that where three tiles overlap
    along an axis), plus 1 for rounding. A hard paste would jump by the whole difference.
    """
    if len(plan.tiles) == 1:
        return
    shifts = data.draw(
        st.lists(st.integers(0, 60), min_size=len(plan.tiles), max_size=len(plan.tiles))
    )
    img = Image.new("RGB", (plan.width, plan.height), (100, 100, 100))
    out = blend_tiles(
        plan, [_shift(c, s) for c, s in zip(cut_tiles(img, plan), shifts, strict=True)]
    )
    arr = np.asarray(out).astype(int)
    assert arr.min() >= 100 + min(shifts) - 1 and arr.max() <= 100 + max(shifts) + 1
    overlap = _min_overlap(plan)
    spread = max(shifts) - min(shifts)
    factor = 2 if _ramps_meet(plan) else 1
    if overlap == 0:
        return  # tiles that merely touch have nothing to fade across
    assert _max_jump(out) <= spread * factor / overlap + 1


def test_seam_is_invisible_on_a_typical_grid() -> None:
    side = 3 * 512 - 2 * 64  # three tiles a side, overlapping by exactly 64
    plan = plan_tiles(side, side, tile=512, overlap=64, padding=32)
    assert len(plan.tiles) == 9 and _min_overlap(plan) == 64 and not _ramps_meet(plan)
    img = Image.new("RGB", (side, side), (120, 120, 120))
    shifts = [0, 40, 0, 40, 0, 40, 0, 40, 0]  # a checkerboard: worst case for seams
    out = blend_tiles(
        plan, [_shift(c, s) for c, s in zip(cut_tiles(img, plan), shifts, strict=True)]
    )
    assert _max_jump(out) <= 40 / 64 + 1  # i.e. at most 1 level per pixel: nothing to see
    # whereas pasting the boxes without blending steps by the full 40
    hard = np.zeros((side, side, 3), dtype=np.int16)
    for t, s in zip(plan.tiles, shifts, strict=True):
        x0, y0, x1, y1 = t.box
        hard[y0:y1, x0:x1] = 120 + s
    assert _max_jump(Image.fromarray(hard.astype(np.uint8))) == 40


# --- errors and helpers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile": 500}, "tile must be a multiple of 8 (got 500); try 496 or 504"),
        ({"tile": 60}, "try 64"),
        ({"tile": 56}, "tile must be at least 64 px (got 56)"),
        ({"overlap": -1}, "overlap must be 0 or more (got -1)"),
        ({"overlap": 256}, "overlap must be less than half the tile (512 px), got 256; try 64"),
        ({"padding": -4}, "padding must be 0 or more (got -4)"),
        ({"tile": 512.0}, "tile must be a whole number of pixels (got 512.0)"),
        ({"tile": True}, "tile must be a whole number of pixels"),
    ],
)
def test_bad_parameters_say_what_to_do(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        plan_tiles(1024, 1024, **kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("width", "height"), [(0, 10), (10, 0), (-5, 10)])
def test_empty_image_is_refused(width: int, height: int) -> None:
    with pytest.raises(InvalidRequest, match="must be at least 1 px"):
        plan_tiles(width, height)


def test_cut_and_blend_check_their_inputs() -> None:
    plan = plan_tiles(600, 600, tile=512, overlap=64)
    with pytest.raises(InvalidRequest, match="image is 500x600 but the plan is for 600x600"):
        cut_tiles(Image.new("RGB", (500, 600)), plan)
    crops = cut_tiles(Image.new("RGB", (600, 600)), plan)
    with pytest.raises(InvalidRequest, match="got 3 tiles but the plan has 4"):
        blend_tiles(plan, crops[:3])
    crops[2] = crops[2].resize((crops[2].width * 2, crops[2].height * 2))
    with pytest.raises(InvalidRequest, match="tile 2 came back .* the refiner must keep"):
        blend_tiles(plan, crops)
    with pytest.raises(IndexError):
        plan.weights(4)


def test_tile_seed_is_base_plus_index() -> None:
    assert [tile_seed(1000, i) for i in range(3)] == [1000, 1001, 1002]
    assert tile_seed(1000, 2) == tile_seed(1000, 2)
    with pytest.raises(ValueError):
        tile_seed(1000, -1)


def test_plan_summary_single_tile() -> None:
    assert plan_summary(plan_tiles(300, 200)) == "1 tile (300x200 fits in one 512 px tile)"
    assert plan_summary(plan_tiles(1024, 600, tile=512, overlap=64)).startswith("3x2 tiles of 512")


def test_blending_order_does_not_change_a_single_pixel() -> None:
    """Tiles come back from GPUs in any order; the picture must not depend on it."""
    from colabswarm.swarm.tiles import Blender

    rng = np.random.default_rng(4)
    plan = plan_tiles(300, 220, tile=96, overlap=24, padding=8)
    tiles = [Image.fromarray(rng.integers(0, 256, (c[3] - c[1], c[2] - c[0], 3), np.uint8))
             for c in (t.crop for t in plan.tiles)]
    ref = np.asarray(blend_tiles(plan, tiles))
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(tiles))
        b = Blender(plan)
        for i in order:
            b.add(int(i), tiles[i])
        assert np.array_equal(np.asarray(b.result()), ref)
