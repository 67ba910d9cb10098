"""Distributed tiled upscaling with real tiny-model worker processes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from colabswarm.errors import InvalidRequest
from colabswarm.swarm import Swarm, read_parameters
from colabswarm.swarm.outputs import parse_parameters
from tests.imagecheck import assert_same_picture


@pytest.fixture(scope="module")
def workers():
    from tests.conftest import WorkerProcess, start_all

    procs = [WorkerProcess(name=f"u{i}", env={"OMP_NUM_THREADS": "1"}) for i in range(3)]
    yield start_all(procs)
    for p in procs:
        p.kill()


def _source(size: int = 128) -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8))


def _diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def test_4x_with_denoise_0_equals_the_plain_upscale_and_uses_every_worker(tmp_path, workers):
    s = Swarm(output_dir=tmp_path, trace=True)
    try:
        for p in workers:
            s.add(p.share)
        progress: list[tuple[int, int]] = []
        src = _source()
        r = s.upscale(src, scale=4, tile=128, overlap=32, denoise=0.0, steps=4, seed=11,
                      on_tile=lambda d, t: progress.append((d, t)))
        assert r.image.size == (512, 512)
        assert _diff(r.image, src.resize((512, 512), Image.Resampling.LANCZOS)) <= 1
        assert r.tiles == 25 and progress[-1] == (25, 25)
        assert [d for d, _ in progress] == list(range(1, 26)), "progress counts tiles"
        assert set(r.backends) == {"u0", "u1", "u2"}, "tiles ran on every worker"
        assert max(n for _, n, *_ in s.trace) > 1, "equal-size tiles were batched"
        # A1111 quotes a value with commas: read it back by A1111's rules
        assert parse_parameters(read_parameters(r.path))["Upscale"].startswith("lanczos x4, ")
    finally:
        s.close()


def test_refined_upscale_is_deterministic_and_changes_pixels(tmp_path, workers):
    s = Swarm(output_dir=None)
    try:
        for p in workers:
            s.add(p.share)
        src = _source(64)
        a = s.upscale(src, scale=2, tile=64, overlap=16, denoise=0.5, steps=4, seed=5)
        b = s.upscale(src, scale=2, tile=64, overlap=16, denoise=0.5, steps=4, seed=5)
        plain = src.resize((128, 128), Image.Resampling.LANCZOS)
        assert _diff(a.image, plain) > 10, "denoise > 0 refines the tiles"
        # per-tile seeds make it reproducible; which tiles share a batch may differ between
        # runs, and a CPU's batched convolutions can then differ in the last bit (<= 1/255)
        assert _diff(a.image, b.image) <= 1, "per-tile seeds make it reproducible"
        m = s.upscale(src, scale=2, upscaler="tiny-upscaler", tile=64, overlap=16,
                      denoise=0.0, steps=4, seed=5)
        assert m.image.size == (128, 128) and _diff(m.image, plain) > 0
        # every worker has the model, so each one upscaled the source and cut its tiles: the
        # result is still the model applied to the whole image
        from colabswarm.backend.upscalers import run_upscaler

        assert _diff(m.image, run_upscaler(src, "tiny-upscaler", 2, "cpu", None, {})) <= 1
    finally:
        s.close()


def test_who_cuts_the_tiles():
    """Workers cut when they all can (and, for a model, all have it); else the controller."""
    from types import SimpleNamespace

    from colabswarm.protocol import Info, Limits
    from colabswarm.swarm.upscale import _workers_cut

    def swarm(*specs):  # a TileHost with workers of these capabilities and upscalers
        infos = [Info(name="w", version="0", device="cpu", models=["tiny"], capabilities=caps,
                      upscalers=ups, limits=Limits(), queue_depth=0, running=0, jobs_served=0)
                 for caps, ups in specs]
        return SimpleNamespace(worker_infos=lambda: infos, note=lambda *a: None)

    new, old = ["txt2img", "img2img", "upscale", "tiles"], ["txt2img", "img2img", "upscale"]
    both = ["lanczos", "esrgan"]
    assert _workers_cut(swarm((new, both), (new, both)), "lanczos")
    assert _workers_cut(swarm((new, both), (new, both)), "esrgan")
    assert not _workers_cut(swarm((new, both), (new, ["lanczos"])), "esrgan"), "one lacks it"
    assert not _workers_cut(swarm((new, both), (old, both)), "esrgan"), "one cannot cut"
    assert _workers_cut(swarm((new, both), (old, both)), "lanczos"), "the new one cuts"
    assert not _workers_cut(swarm((old, both), (old, both)), "lanczos"), "nobody can cut"
    assert _workers_cut(swarm(), "lanczos") and not _workers_cut(swarm(), "esrgan")


def test_kill_9_mid_upscale_still_gives_a_complete_image(spawn):
    procs = [spawn(name=f"k{i}", env={"OMP_NUM_THREADS": "1"}) for i in range(3)]
    # copies off: a copy running elsewhere could deliver the victim's tiles with no requeue,
    # and this test must see the killed backend's own tiles come back from the others
    s = Swarm(output_dir=None, health_every=0.5, copies=False)
    try:
        for p in procs:
            s.add(p.share)
        src = _source()
        killed: list[str] = []

        def on_tile(done: int, total: int) -> None:
            if done < 3 or killed:
                return
            # a worker still denoising its tiles (not one whose results are already here)
            busy = [f for f in s.flights() if f["total_steps"] == 0 or f["step"] < f["total_steps"]]
            if busy:
                killed.append(busy[0]["backend"])
                next(p for p in procs if p.name == killed[0]).kill()

        kw = dict(scale=2, tile=64, overlap=16, denoise=0.5, steps=4, seed=1, save=False)
        ref = s.upscale(src, **kw)
        r = s.upscale(src, on_tile=on_tile, **kw)
        assert killed
        # per-tile seeds: the same picture whoever made which tile, up to the rounding of
        # batched kernels (the tiles' batches differ between the two runs)
        assert r.image.size == (256, 256)
        assert_same_picture(r.image, ref.image, "the upscale with a worker killed and without")
        assert any("back to the front" in m for _, _, m in s.logs), "tiles were requeued"
        assert next(b for b in s.backends if b["name"] == killed[0])["status"] == "errored"
    finally:
        s.close()


def test_two_upscales_at_once_keep_their_own_tiles(workers):
    """Tiles of two sources with the same settings could batch together; a job carries one
    source, so each upscale must still come back made of its own pixels."""
    s = Swarm(output_dir=None, trace=True)
    try:
        for p in workers:
            s.add(p.share)
        a, b = _source(64), Image.fromarray(255 - np.asarray(_source(64)))
        fa = s.submit_upscale(a, scale=2, tile=64, overlap=16, denoise=0.0, steps=4, seed=1)
        fb = s.submit_upscale(b, scale=2, tile=64, overlap=16, denoise=0.0, steps=4, seed=1)
        ra, rb = fa.result(timeout=120), fb.result(timeout=120)
        assert _diff(ra.image, a.resize((128, 128), Image.Resampling.LANCZOS)) <= 1
        assert _diff(rb.image, b.resize((128, 128), Image.Resampling.LANCZOS)) <= 1
        assert max(n for _, n, *_ in s.trace) > 1, "tiles were still batched"
    finally:
        s.close()


def test_bad_upscale_parameters_are_refused_up_front(workers):
    s = Swarm(output_dir=None)
    try:
        with pytest.raises(InvalidRequest, match="scale"):
            s.submit_upscale(_source(), scale=3.5)
        with pytest.raises(InvalidRequest, match="steps"):
            s.submit_upscale(_source(), scale=2, denoise=0.1, steps=5)
        with pytest.raises(InvalidRequest, match="multiple of 8"):
            s.upscale(_source(), scale=2, tile=100)
    finally:
        s.close()
