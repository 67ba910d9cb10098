"""Distributed tiled upscaling on top of the scheduler.

Plan a grid of overlapping tiles over the upscaled size (tiles.py), refine each tile by img2img
at low denoise on whichever backend is free (ordered, slots, batching of equal-size tiles,
requeue on failure, as any generation), and blend the tiles back with feathered weights as they
arrive. Where it can, every worker upscales the small source itself and cuts its own tiles
(``JobRequest.crops``); an upscale model that not every worker has runs once on a worker that
has it, and the controller cuts and sends the tiles so that every worker can refine them.

It reaches the swarm only through `TileHost`, a small public interface the controller's Swarm
implements (run items and wait, the workers' infos, a log line): this module imports nothing
from the controller.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from ..backend.png import encode_png
from ..errors import InvalidRequest
from ..protocol import Info, JobRequest, make_request
from .outputs import GeneratedImage, save_image
from .tiles import Blender, TilePlan, cut_tiles, plan_summary, plan_tiles, tile_seed

__all__ = ["TileHost", "UpscaleResult", "as_image", "check_upscale_params", "run_upscale"]


class TileHost(Protocol):
    """What the tiled upscaler needs from a swarm (colabswarm.Swarm is one)."""

    output_dir: Path | None

    async def arun_items(self, kind: str, template: JobRequest, seeds: list[int],
                         params: dict[str, Any], *,
                         init_pngs: list[bytes | None] | None = None,
                         crops: list[tuple[int, int, int, int]] | None = None,
                         on_image: Callable[[GeneratedImage], Any] | None = None) -> Any:
        """Run one image per seed across the swarm; the result has `.images` in seed order."""

    def worker_infos(self) -> list[Info]:
        """The last /v1/info of every enabled worker that answered."""

    def note(self, level: str, message: str) -> None:
        """A line for the swarm's log."""

_CHUNK = 8  # tiles whose PNGs are written before they are queued


@dataclass
class UpscaleResult:
    image: Image.Image
    tiles: int
    backends: list[str]
    seconds: float
    params: dict[str, Any]
    path: Path | None = None
    tile_backends: dict[int, str] = field(default_factory=dict)

    def _repr_png_(self) -> bytes:
        return _png(self.image)


def _png(image: Image.Image) -> bytes:
    return encode_png(image.convert("RGB"))


def as_image(image: Any) -> Image.Image:
    if isinstance(image, GeneratedImage):
        return image.image.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    raise InvalidRequest(
        f"An image here is a PIL image, a GeneratedImage or a file path, not "
        f"{type(image).__name__}."
    )


def check_upscale_params(scale: int, denoise: float, steps: int) -> None:
    if not isinstance(scale, int) or not 1 <= scale <= 8:
        raise InvalidRequest(f"scale must be a whole number from 1 to 8 (got {scale!r}).")
    if not 0.0 <= denoise <= 1.0:
        raise InvalidRequest(f"denoise must be between 0 and 1 (got {denoise}).")
    if denoise > 0 and int(steps * denoise) < 1:
        raise InvalidRequest(
            f"steps*denoise must be at least 1 (got {steps}*{denoise}); raise steps to "
            f"{int(1 / denoise) + 1} or more, or use denoise 0 to only upscale."
        )


async def run_upscale(
    swarm: TileHost,
    image: Any,
    *,
    scale: int = 2,
    upscaler: str = "lanczos",
    tile: int = 512,
    overlap: int = 64,
    padding: int = 32,
    denoise: float = 0.3,
    prompt: str = "",
    negative_prompt: str = "",
    seed: int | None = None,
    steps: int = 20,
    cfg: float = 7.0,
    model: str | None = None,
    on_tile: Callable[[int, int], Any] | None = None,
    save: bool = True,
) -> UpscaleResult:
    """The whole pipeline; runs on the swarm's loop (heavy pixel work goes to a thread)."""
    t0 = time.monotonic()
    source = as_image(image)
    check_upscale_params(scale, denoise, steps)
    seed = random.randrange(0, 2**32) if seed is None else seed
    target = (source.width * scale, source.height * scale)
    plan = await asyncio.to_thread(plan_tiles, target[0], target[1], tile, overlap, padding)
    params: dict[str, Any] = dict(
        kind="upscale", prompt=prompt, negative_prompt=negative_prompt, steps=steps, cfg=cfg,
        model=model, strength=denoise, width=target[0], height=target[1],
        upscale=f"{_upscaler_note(swarm, upscaler, scale)}, {plan_summary(plan)}",
    )
    blender = Blender(plan)
    total = len(plan.tiles)
    owners: dict[int, str] = {}
    # blend each tile as it arrives, on one thread of its own, while the GPUs work on the rest
    blending = ThreadPoolExecutor(max_workers=1, thread_name_prefix="colabswarm-blend")
    pending: list[Future] = []

    def tile_done(index: int, g: GeneratedImage) -> None:
        owners[index] = g.backend
        pending.append(blending.submit(blender.add, index, g.image))
        if on_tile is not None:
            on_tile(len(owners), total)

    def queue(members: list[int], pngs: list[bytes], worker_cuts: bool) -> asyncio.Future:
        """Tiles of one crop size as the img2img items of one run: each with its own PNG, or
        (worker_cuts) all with the source PNG and a box the worker cuts after upscaling it."""
        x0, y0, x1, y1 = plan.tiles[members[0]].crop
        cut = dict(upscaler=upscaler, scale=scale) if worker_cuts else {}
        tpl = make_request(prompt=prompt, negative_prompt=negative_prompt, width=x1 - x0,
                           height=y1 - y0, steps=steps, cfg=cfg, model=model, kind="img2img",
                           strength=denoise, **cut)
        return asyncio.ensure_future(swarm.arun_items(
            "upscale", tpl, [tile_seed(seed, i) for i in members], params,
            init_pngs=list(pngs), on_image=lambda g: tile_done(members[g.index], g),
            crops=[plan.tiles[i].crop for i in members] if worker_cuts else None))

    runs: list[asyncio.Future] = []
    try:
        if _workers_cut(swarm, upscaler):
            runs = await _worker_cut(source, plan, queue)
        else:
            runs = await _controller_cut(swarm, source, plan, scale, upscaler, seed, params,
                                         queue, runs)
        await asyncio.gather(*runs)
        await asyncio.to_thread(lambda: [f.result() for f in pending])
        out = await asyncio.to_thread(blender.result)
    finally:
        for r in runs:  # one group of tiles failed: the others' items leave the queue too
            r.cancel()
        blending.shutdown(wait=False, cancel_futures=True)
    result = UpscaleResult(out, total, sorted(set(owners.values())), time.monotonic() - t0,
                           params, tile_backends=owners)
    if save and swarm.output_dir is not None:
        g = GeneratedImage(out, seed, ",".join(result.backends), 0, result.seconds, params)
        result.path = await asyncio.to_thread(save_image, g, swarm.output_dir)
    return result


def _upscaler_note(swarm: TileHost, upscaler: str, scale: int) -> str:
    """The upscale step as the image's parameters tell it. A model of another factor than the
    one asked for (a 4x model for 2x) runs at its own on the worker, which resizes the result
    with Lanczos: the parameters say so."""
    native = sorted({i.upscaler_scales[upscaler] for i in swarm.worker_infos()
                     if upscaler in i.upscaler_scales})
    if not native or native == [scale]:
        return f"{upscaler} x{scale}"
    factors = "/".join(f"{n}x" for n in native)
    ran = f"x{native[0]}" if len(native) == 1 else "its own scale"
    swarm.note("info", f"{upscaler} is a {factors} model: the workers run it at {ran} and "
                       f"resize its result to x{scale} with Lanczos")
    return f"{upscaler} x{scale} (a {factors} model: ran at {ran} then resized to x{scale} " \
           "with Lanczos)"


def _workers_cut(swarm: TileHost, upscaler: str) -> bool:
    """Whether the workers upscale the source and cut the tiles themselves.

    Lanczos: yes, unless every worker that has answered is from before tile jobs (then the
    controller cuts, as those workers expect). An upscale model: only when every worker that
    has answered has it and cuts tiles, so no worker is left out of the refining; otherwise it
    runs once on a worker that has it and the controller cuts and sends the tiles."""
    known = swarm.worker_infos()
    cutters = [i for i in known if "tiles" in i.capabilities]
    if known and not cutters:
        swarm.note("info", "no worker cuts tiles itself (older colabswarm); the controller "
                           "cuts them and sends each one")
        return False
    if upscaler == "lanczos":
        return True
    return bool(known) and len(cutters) == len(known) and all(
        upscaler in i.upscalers for i in known)


def _by_size(plan: TilePlan, indices: Iterable[int]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i in indices:
        x0, y0, x1, y1 = plan.tiles[i].crop
        groups.setdefault((x1 - x0, y1 - y0), []).append(i)
    return groups


async def _worker_cut(source: Image.Image, plan: TilePlan,
                      queue: Callable[..., asyncio.Future]) -> list[asyncio.Future]:
    """Each worker upscales the small source once and cuts its own tiles: one small upload per
    job instead of a crop per tile, no big image sent around, and no serial upscale, cut and
    tile encoding on the controller before the GPUs can start."""
    src_png = await asyncio.to_thread(_png, source)
    return [queue(members, [src_png] * len(members), worker_cuts=True)
            for members in _by_size(plan, range(len(plan.tiles))).values()]


async def _controller_cut(swarm: TileHost, source: Image.Image, plan: TilePlan, scale: int,
                          upscaler: str, seed: int, params: dict[str, Any],
                          queue: Callable[..., asyncio.Future],
                          runs: list[asyncio.Future]) -> list[asyncio.Future]:
    """An upscale model may live on one worker only: run it there once, then cut the tiles
    here and send each one, so every worker can refine them. (Lanczos, for workers that do not
    cut tiles themselves, runs here.)"""
    if upscaler == "lanczos":
        big = await asyncio.to_thread(source.resize, (plan.width, plan.height),
                                      Image.Resampling.LANCZOS)
    else:
        job = JobRequest(kind="upscale", upscaler=upscaler, scale=scale, seeds=[0])
        done = await swarm.arun_items("upscale-model", job, [seed], params,
                                      init_pngs=[await asyncio.to_thread(_png, source)])
        big = done.images[0].image.convert("RGB")
    crops = await asyncio.to_thread(cut_tiles, big, plan)
    # queue tiles a chunk at a time while the next chunk's PNGs are written
    for k in range(0, len(crops), _CHUNK):
        chunk = range(k, min(k + _CHUNK, len(crops)))
        pngs = await asyncio.to_thread(lambda chunk=chunk: {i: _png(crops[i]) for i in chunk})
        runs += [queue(members, [pngs[i] for i in members], worker_cuts=False)
                 for members in _by_size(plan, chunk).values()]
    return runs
