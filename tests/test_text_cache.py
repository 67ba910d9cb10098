"""A repeated prompt is not encoded again, and every image stays what it was: the engine with
its text cache against one without, job for job, on the real tiny SD and SDXL pipelines.

The LoRA tests (tests/test_loras.py) run a worker with the cache on: a LoRA job right after
the same prompt without one, its text-encoder half taking effect and the plain job after it
coming back identical are checked there too."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from colabswarm.backend.engine import Engine
from colabswarm.backend.loras import addnet_hash
from colabswarm.backend.textcache import TextCache
from colabswarm.backend.tiny import build_tiny_lora
from colabswarm.errors import InvalidRequest
from colabswarm.protocol import JobRequest, LoraRef
from tests.imagecheck import assert_identical


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> tuple[str, LoraRef]:
    path = build_tiny_lora(tmp_path_factory.mktemp("tc") / "fox.safetensors", "tiny", 7)
    return str(path), LoraRef(name="fox", hash=addnet_hash(path))


@pytest.fixture(scope="module")
def engines(lora):
    """The same two models with the cache (default size) and without it."""
    return (Engine(models=["tiny", "tiny-xl"], loras=[lora[0]]),
            Engine(models=["tiny", "tiny-xl"], loras=[lora[0]], text_cache_bytes=0))


def _job(**kw) -> JobRequest:
    return JobRequest(**{**dict(prompt="a red fox", width=64, height=64, steps=3, cfg=7.0,
                                seeds=[5]), **kw})


@pytest.fixture
def encoder_calls(monkeypatch):
    """How often each text-encoder class really ran (the cache's own counts are not trusted)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    calls = {"n": 0}
    for cls in (CLIPTextModel, CLIPTextModelWithProjection):
        real = cls.forward

        def counting(self, *args, _real=real, **kw):
            calls["n"] += 1
            return _real(self, *args, **kw)

        monkeypatch.setattr(cls, "forward", counting)
    return calls


def test_repeated_prompts_skip_the_encoders_and_the_images_stay_the_same(engines, lora,
                                                                         encoder_calls):
    cached, plain = engines
    fox = lora[1]
    # (job, does the cached engine run its encoders for it?)
    steps = [
        (_job(), True),
        (_job(seeds=[6, 7]), False),  # same prompt, other seeds and batch: no encoding
        (_job(negative_prompt="blurry"), True),  # another negative prompt: encoded
        (_job(clip_skip=2), True),  # SD's clip skip asks for the hidden states: encoded
        (_job(clip_skip=2, seeds=[9]), False),
        (_job(loras=[fox]), True),  # a LoRA changes the encoder: never from the cache
        (_job(loras=[fox]), True),  # ... nor into it
        (_job(), False),  # the plain prompt again, after the LoRA jobs
        (_job(prompts=["a cat", "a dog"], seeds=[1, 2]), True),  # a prompt list
        (_job(prompts=["a cat", "a dog"], seeds=[3, 4]), False),
        (_job(kind="img2img", strength=0.5), False),  # img2img shares the text encoder
        (_job(model="tiny-xl"), True),  # another model: its own encoders
        # clip skip is part of the call: encoded once, then answered at any batch size
        (_job(model="tiny-xl", clip_skip=3), True),
        (_job(model="tiny-xl", clip_skip=3, seeds=[9, 10, 11]), False),
        (_job(), True),  # back on SD 1.5: its cache went with the model
    ]
    init = None
    for req, encodes in steps:
        inits = None
        if req.kind == "img2img":
            inits = [init]
        before = encoder_calls["n"]
        got = cached.run(req, inits)
        ran = encoder_calls["n"] - before
        want = plain.run(req, inits)
        what = f"{req.model or 'tiny'} {req.prompt!r} {req.prompts} neg={req.negative_prompt!r} "
        what += f"clip_skip={req.clip_skip} loras={len(req.loras)} {req.kind}"
        assert (ran > 0) == encodes, f"{what}: the encoders ran {ran} times"
        assert len(got) == len(want) == len(req.seeds)
        for g, w in zip(got, want, strict=True):
            assert_identical(np.asarray(g, np.int16), np.asarray(w, np.int16),
                             f"{what}: with the cache and without")
        init = init or got[0]
    stats = cached.text_cache_stats()
    assert stats is not None and stats["entries"] == 1 and 0 < stats["bytes"] <= stats["max_bytes"]
    # freeing memory (asked by the owner, or after an out-of-memory error) empties it too
    cached.free()
    assert cached.text_cache_stats()["entries"] == 0
    n = encoder_calls["n"]
    cached.run(_job())
    assert encoder_calls["n"] > n, "after a free the prompt is encoded again"


def _tiny_pipe():
    from diffusers import StableDiffusionPipeline

    from colabswarm.backend.tiny import tiny_model_dir

    return StableDiffusionPipeline.from_pretrained(tiny_model_dir("tiny"))


def _encode(pipe, prompt: str, n: int = 1):
    return pipe.encode_prompt(prompt, "cpu", n, True, None)


def test_answers_are_copies_bounded_in_bytes_and_only_for_the_job_thread(encoder_calls):
    import torch

    pipe = _tiny_pipe()
    with torch.inference_mode():
        fresh = [t.clone() for t in _encode(pipe, "a red fox")]
        one = TextCache()
        with one.serving(pipe, "owner"):
            n = encoder_calls["n"]
            for _ in range(3):  # a pipeline that changes what it got, encoded or remembered
                for t in _encode(pipe, "a red fox"):
                    t.add_(1.0)
            assert encoder_calls["n"] == n + 2, "a repeat is answered (one call: two passes)"
            again = _encode(pipe, "a red fox")
            assert all(torch.equal(a, f) for a, f in zip(again, fresh, strict=True)), \
                "no answer changes another"
            # three images per prompt: the one-image answer repeated, as the pipeline does it
            three = _encode(pipe, "a red fox", 3)
            assert encoder_calls["n"] == n + 2
            assert all(torch.equal(t, f.repeat(1, 3, 1).view(3, *f.shape[1:]))
                       for t, f in zip(three, fresh, strict=True))
            # another thread (the compiler's) is never answered from the cache
            box = []
            worker = threading.Thread(target=lambda: box.append(_encode(pipe, "a red fox")))
            worker.start()
            worker.join()
            assert encoder_calls["n"] == n + 4 and torch.equal(box[0][0], fresh[0])
        assert "encode_prompt" not in pipe.__dict__, "the pipeline is itself again after"
        with pytest.raises(RuntimeError), one.serving(pipe, "owner"):
            _encode(pipe, "a red fox")
            raise RuntimeError("a job that failed or was interrupted")
        assert "encode_prompt" not in pipe.__dict__, "the pipeline is itself again after a failure"
        n = encoder_calls["n"]
        _encode(pipe, "a red fox")
        assert encoder_calls["n"] == n + 2, "no cache outside serving"

        # room for two prompts: the least recently used one goes first
        size = one.stats()["bytes"]
        small = TextCache(max_bytes=2 * size + size // 2)
        with small.serving(pipe, "owner"):
            for text in ("a red fox", "a cat", "a red fox", "a dog"):  # cat goes when dog comes
                _encode(pipe, text)
            n = encoder_calls["n"]
            _encode(pipe, "a red fox")
            assert encoder_calls["n"] == n, "the recently used prompt stayed"
            _encode(pipe, "a cat")
            assert encoder_calls["n"] == n + 2, "the least recently used prompt went"
        stats = small.stats()
        assert stats["entries"] == 2 and stats["bytes"] <= stats["max_bytes"]
        # an answer bigger than the whole cache is not kept; size 0 keeps nothing
        for tiny in (TextCache(max_bytes=size // 2), TextCache(max_bytes=0)):
            with tiny.serving(pipe, "owner"):
                n = encoder_calls["n"]
                _encode(pipe, "a red fox")
                _encode(pipe, "a red fox")
                assert encoder_calls["n"] == n + 4 and tiny.stats()["entries"] == 0


def test_a_negative_size_is_refused():
    for bad in (-1, 2**60):
        with pytest.raises(InvalidRequest, match="text_cache_bytes"):
            Engine(models=["tiny"], text_cache_bytes=bad)


def test_one_tokens_prompts_never_answer_anothers(encoder_calls):
    """A guest's job with the owner's prompt is encoded again (a faster job would tell the guest
    that prompt was used lately); each token's own repeats are answered."""
    import time

    import httpx

    from colabswarm.backend.serve import start_worker

    handle = start_worker(name="text-cache", engine=Engine(models=["tiny"]))
    try:
        guest = handle.add_guest("gina").split("#token=")[1]

        def run(token: str) -> int:
            before = encoder_calls["n"]
            with httpx.Client(base_url=handle.local_url, timeout=60,
                              headers={"Authorization": f"Bearer {token}"}) as http:
                r = http.post("/v1/jobs", json={"prompt": "a red fox", "width": 64,
                                                "height": 64, "steps": 2})
                assert r.status_code == 202, r.text
                deadline = time.monotonic() + 60
                while (state := http.get(f"/v1/jobs/{r.json()['id']}").json()["state"]) in (
                        "queued", "running") and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert state == "done"
            return encoder_calls["n"] - before

        assert run(handle.token) > 0, "the owner's first job encodes"
        assert run(handle.token) == 0, "the owner's repeat is answered"
        assert run(guest) > 0, "the guest's job with the owner's prompt encodes again"
        assert run(guest) == 0, "the guest's own repeat is answered"
        # revoked and added again under the same name: another token, nothing inherited
        assert handle.revoke("gina")
        guest = handle.add_guest("gina").split("#token=")[1]
        assert run(guest) > 0, "a new token of an old name encodes again"
    finally:
        handle.stop()


def test_what_the_key_or_the_copy_cannot_hold_goes_to_the_encoder_each_time():
    """An argument the key cannot hold (here ready embeddings: a tensor, never read back to
    make a key) or an answer the cache cannot copy (here a list) is never kept: each call runs.
    """
    import torch

    class Pipe:
        def __init__(self) -> None:
            self.calls = 0

        def encode_prompt(self, prompt, num_images_per_prompt=1, embeds=None, as_list=False):
            self.calls += 1
            out = torch.full((num_images_per_prompt, 2), float(len(prompt)))
            return [out] if as_list else (out, None)

    pipe = Pipe()
    cache = TextCache()
    with cache.serving(pipe, "owner"):
        first = pipe.encode_prompt("fox")
        pipe.encode_prompt("fox", num_images_per_prompt=4)
        assert pipe.calls == 1, "a plain tuple answer is kept, at any number per prompt"
        assert first[1] is None and torch.equal(
            pipe.encode_prompt("fox", 2)[0], torch.full((2, 2), 3.0))
        pipe.encode_prompt("fox", embeds=torch.ones(2))
        pipe.encode_prompt("fox", embeds=torch.ones(2))
        assert pipe.calls == 3, "a tensor argument is not a key"
        one = pipe.encode_prompt("fox", as_list=True)
        assert pipe.calls == 4 and one[0].shape[0] == 1, "a list answer is not kept"
        two = pipe.encode_prompt("fox", 2, as_list=True)
        assert pipe.calls == 6 and two[0].shape[0] == 2, (
            "not kept, and for two images per prompt the call is made again as it came")
    assert cache.stats()["entries"] == 1


def test_the_owner_sizes_or_turns_off_the_cache():
    import os
    import subprocess
    import sys
    from pathlib import Path

    from colabswarm.backend.serve import make_engine

    assert make_engine("tiny", text_cache_mb=0).text_cache_bytes == 0
    assert make_engine("tiny", text_cache_mb=8).text_cache_bytes == 8 * 2**20
    for bad in (-1, float("nan"), float("inf"), 1e12):
        with pytest.raises(InvalidRequest, match="text_cache_mb"):
            make_engine("tiny", text_cache_mb=bad)
    r = subprocess.run(
        [sys.executable, "-m", "colabswarm", "worker", "--model", "tiny", "--port", "0",
         "--tunnel", "none", "--text-cache-mb", "-1"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "text_cache_mb must be 0 (off) to" in r.stderr and "Traceback" not in r.stderr


def test_a_flood_of_distinct_prompts_stays_within_the_bounds():
    """The worst a token holder can send: a new prompt every call. The cache keeps at most 256
    answers and its bytes, and answers the newest."""
    import torch

    pipe = _tiny_pipe()
    cache = TextCache()
    with torch.inference_mode(), cache.serving(pipe, "guest"):
        for i in range(300):
            _encode(pipe, f"prompt number {i}")
        stats = cache.stats()
        assert stats["entries"] == 256 and stats["bytes"] <= stats["max_bytes"]
        assert stats["misses"] == 300 and stats["hits"] == 0
        _encode(pipe, "prompt number 299")
        _encode(pipe, "prompt number 0")
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (1, 301), "the newest kept, the oldest gone"
