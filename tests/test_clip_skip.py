"""Clip skip with A1111's meaning: 1 = the text encoder's last layer, 2 = the one before it
(then the final layer norm, as A1111 does); SDXL already uses the penultimate layer, so 1 and 2
are its own layer there and 3 goes one further."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from pydantic import ValidationError

from colabswarm.backend.client import WorkerClient
from colabswarm.errors import InvalidRequest
from colabswarm.protocol import JobRequest
from colabswarm.samplers import MAX_CLIP_SKIP, diffusers_clip_skip
from tests.conftest import WorkerProcess
from tests.imagecheck import assert_different, assert_identical


def test_the_mapping_to_diffusers():
    assert [diffusers_clip_skip(n, sdxl=False) for n in (1, 2, 3, 12)] == [None, 1, 2, 11]
    assert [diffusers_clip_skip(n, sdxl=True) for n in (1, 2, 3, 12)] == [None, None, 1, 10]
    for bad in (0, -1, MAX_CLIP_SKIP + 1):
        with pytest.raises(InvalidRequest):
            diffusers_clip_skip(bad, sdxl=False)
    for bad in (0, 13):
        with pytest.raises(ValidationError):
            JobRequest(clip_skip=bad)


def test_clip_skip_2_is_a1111s_penultimate_layer_with_the_final_norm():
    """What the pipeline feeds the UNet for clip skip 2 is, computed by hand as A1111 does
    (hidden_states[-2], then final_layer_norm)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from colabswarm.backend.engine import _text_model_alias
    from colabswarm.backend.tiny import tiny_model_dir

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir("tiny"))
    enc = pipe.text_encoder
    ids = pipe.tokenizer("a red fox", padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.inference_mode():
        hidden = enc(ids, output_hidden_states=True).hidden_states
        norm = getattr(enc, "text_model", enc).final_layer_norm
        by_hand = {n: norm(hidden[-n]) for n in (2, 3)}
        last = enc(ids)[0]
        for n, want in [(1, last), *by_hand.items()]:
            with _text_model_alias(pipe):
                got, _ = pipe.encode_prompt("a red fox", "cpu", 1, False,
                                            clip_skip=diffusers_clip_skip(n, sdxl=False))
            assert torch.equal(got, want), f"clip skip {n}"
    assert not hasattr(enc, "text_model") or "text_model" in dict(enc.named_children()), (
        "the alias is gone after the call")


@pytest.fixture(scope="module")
def clip_worker():
    proc = WorkerProcess("--model", "tiny", "--model", "tiny-xl", name="clip",
                         env={"OMP_NUM_THREADS": "1"})
    try:
        yield proc.start()
    finally:
        proc.kill()


def test_clip_skip_on_sd_and_sdxl_workers(clip_worker):
    def req(model: str, clip_skip: int, seeds=(5,)) -> JobRequest:
        # strong guidance: the tiny SDXL's layers differ little, its pooled embedding not at all
        return JobRequest(prompt="a red fox", width=64, height=64, steps=3, seeds=list(seeds),
                          model=model, clip_skip=clip_skip, cfg=30.0)

    async def main() -> None:
        async with WorkerClient(clip_worker.share) as c:
            async def one(r: JobRequest) -> list[np.ndarray]:
                return [np.asarray(im, dtype=np.int16) for im in await c.run(r)]

            sd = {n: (await one(req("tiny", n)))[0] for n in (1, 2, 3)}
            assert_different(sd[1], sd[2], "SD clip skip 1 and 2")
            assert_different(sd[2], sd[3], "SD clip skip 2 and 3")
            assert_identical((await one(req("tiny", 1)))[0], sd[1], "SD clip skip 1 again")
            xl = {n: (await one(req("tiny-xl", n)))[0] for n in (1, 2, 3)}
            assert_identical(xl[1], xl[2], "SDXL clip skip 1 and 2 (its own layer)")
            assert_different(xl[2], xl[3], "SDXL clip skip 2 and 3")
            batch = await one(req("tiny", 2, seeds=(3, 5)))
            assert_different(batch[0], batch[1], "two seeds with clip skip 2")
            # the tiny text encoders have 2 layers: 3 is the deepest skip (the embeddings)
            with pytest.raises(InvalidRequest, match="clip skip 4"):
                await c.submit(req("tiny", 4))

    asyncio.run(main())
