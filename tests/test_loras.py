"""LoRAs on a real worker process: offered by file name and content hash (A1111's), applied per
job at the asked weight, never left active for the next job, refused when the file differs."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from colabswarm.backend.client import WorkerClient
from colabswarm.backend.loras import addnet_hash, find_loras
from colabswarm.backend.tiny import build_tiny_lora
from colabswarm.errors import ErrorKind, InvalidRequest, ModelNotAvailable
from colabswarm.protocol import JobRequest, LoraRef
from tests.conftest import WorkerProcess
from tests.imagecheck import assert_different, assert_identical, assert_same_picture


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    made = {
        "alpha": build_tiny_lora(root / "alpha.safetensors", "tiny", 1),
        # the same UNet weights as alpha (same seed), no text-encoder part
        "alpha unet": build_tiny_lora(root / "alpha unet.safetensors", "tiny", 1,
                                      text_encoder=False),
        # the same weights as alpha, laid out as kohya's sd-scripts write them for A1111
        "alpha-kohya": build_tiny_lora(root / "sub" / "alpha-kohya.safetensors", "tiny", 1,
                                       layout="kohya"),
        "beta": build_tiny_lora(root / "beta.safetensors", "tiny", 2),
        "gamma": build_tiny_lora(root / "gamma.safetensors", "tiny", 3),
        "xl": build_tiny_lora(root / "xl.safetensors", "tiny-xl", 4),
        "xl unet": build_tiny_lora(root / "xl unet.safetensors", "tiny-xl", 4, text_encoder=False),
    }
    (root / "old.ckpt").write_bytes(b"\x80\x02pickle")  # skipped: never loaded
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    made["delta"] = build_tiny_lora(elsewhere / "delta.safetensors", "tiny", 5)
    return made


@pytest.fixture(scope="module")
def lora_worker(lora_files):
    folder = lora_files["alpha"].parent
    proc = WorkerProcess("--model", "tiny", "--model", "tiny-xl", "--loras-dir", str(folder),
                         "--lora", str(lora_files["delta"]), "--lora-cache", "2",
                         name="loras", env={"OMP_NUM_THREADS": "1"})
    try:
        yield proc.start()
    finally:
        proc.kill()


def _req(seeds=(5,), loras=(), **kw) -> JobRequest:
    base = dict(prompt="a red fox", width=64, height=64, steps=3, cfg=7.0)
    return JobRequest(seeds=list(seeds), loras=list(loras), **{**base, **kw})


async def _one(c: WorkerClient, req: JobRequest) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.int16) for im in await c.run(req)]


# ----- files and hashes ---------------------------------------------------------------------
def _tensor_bytes_sha256(path: Path) -> str:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()


def test_the_hash_is_a1111s_and_ignores_metadata(lora_files, tmp_path):
    from safetensors.torch import load_file, save_file

    path = lora_files["alpha"]
    assert addnet_hash(path) == _tensor_bytes_sha256(path)
    tensors = load_file(str(path))
    save_file(tensors, str(tmp_path / "retitled.safetensors"), metadata={"ss_output_name": "x"})
    assert addnet_hash(tmp_path / "retitled.safetensors") == addnet_hash(path)
    tensors[next(iter(tensors))][0, 0] += 1
    save_file(tensors, str(tmp_path / "changed.safetensors"))
    assert addnet_hash(tmp_path / "changed.safetensors") != addnet_hash(path)


def test_what_an_owner_may_offer(lora_files, tmp_path, caplog):
    folder = lora_files["alpha"].parent
    found = find_loras(folder)
    assert set(found) == {"alpha", "alpha unet", "alpha-kohya", "beta", "gamma", "xl", "xl unet"}
    assert "pickle" in caplog.text, "the .ckpt in the folder is skipped and said so"
    assert found["beta"].hash == addnet_hash(lora_files["beta"])
    assert set(find_loras([lora_files["delta"], folder])) == set(found) | {"delta"}
    pickled = tmp_path / "evil.pt"
    pickled.write_bytes(b"\x80\x02")
    with pytest.raises(InvalidRequest, match="pickle"):
        find_loras([pickled])
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"not a safetensors file at all")
    with pytest.raises(InvalidRequest, match="safetensors"):
        find_loras(fake)
    bad_name = tmp_path / "a,b.safetensors"
    bad_name.write_bytes(lora_files["beta"].read_bytes())
    with pytest.raises(InvalidRequest, match="Rename"):
        find_loras(bad_name)
    twice = tmp_path / "twice"
    (twice / "x").mkdir(parents=True)
    for sub in (twice, twice / "x"):
        (sub / "beta.safetensors").write_bytes(lora_files["beta"].read_bytes())
    with pytest.raises(InvalidRequest, match="Two LoRA files"):
        find_loras(twice)
    with pytest.raises(InvalidRequest, match="No such"):
        find_loras(tmp_path / "missing.safetensors")


def test_hashes_are_kept_and_redone_only_for_changed_files(lora_files, tmp_path, monkeypatch):
    monkeypatch.setenv("COLABSWARM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "kept.safetensors"
    path.write_bytes(lora_files["beta"].read_bytes())
    first = find_loras(path)["kept"].hash
    cache = tmp_path / "cache" / "lora-hashes.json"
    kept = json.loads(cache.read_text())
    assert list(kept.values()) == [first]
    # a restart reads the hash back instead of reading the file (seen here by planting one)
    cache.write_text(json.dumps({k: "f" * 64 for k in kept}))
    assert find_loras(path)["kept"].hash == "f" * 64
    before = path.stat().st_mtime_ns
    path.write_bytes(lora_files["gamma"].read_bytes())  # changed: hashed again
    os.utime(path, ns=(before + 10**9, before + 10**9))  # whatever the clock's granularity
    assert find_loras(path)["kept"].hash == addnet_hash(lora_files["gamma"])
    cache.write_text("{not json")
    assert find_loras(path)["kept"].hash == addnet_hash(lora_files["gamma"])


def test_start_worker_refuses_a_pickled_lora(tmp_path):
    from colabswarm.backend.serve import start_worker

    (tmp_path / "x.ckpt").write_bytes(b"\x80\x02")
    with pytest.raises(InvalidRequest, match="pickle"):
        start_worker("tiny", loras=[tmp_path / "x.ckpt"])


# ----- on the worker ------------------------------------------------------------------------
def test_info_advertises_each_lora_with_its_hash(lora_worker, lora_files):
    async def main() -> None:
        async with WorkerClient(lora_worker.share) as c:
            info = await c.info()
            offered = {lo.name: lo.hash for lo in info.loras}
            assert offered == {name: addnet_hash(p) for name, p in lora_files.items()}

    asyncio.run(main())


def test_weights_apply_per_job_and_nothing_stays_active(lora_worker, lora_files):
    h = {name: addnet_hash(p) for name, p in lora_files.items()}

    def ref(name: str, weight: float = 1.0) -> LoraRef:
        return LoraRef(name=name, weight=weight, hash=h[name])

    async def main() -> None:
        async with WorkerClient(lora_worker.share) as c:
            before = (await _one(c, _req()))[0]  # before any LoRA was loaded
            full = (await _one(c, _req(loras=[ref("alpha")])))[0]
            zero = (await _one(c, _req(loras=[ref("alpha", 0.0)])))[0]
            half = (await _one(c, _req(loras=[ref("alpha", 0.5)])))[0]
            after = (await _one(c, _req()))[0]
            assert_different(full, before, "a LoRA at weight 1 and no LoRA")
            assert_identical(zero, before, "a LoRA at weight 0 and no LoRA")
            assert_different(half, full, "weights 0.5 and 1")
            # (its text encoding comes from the worker's text cache: that no adapter stays on
            # in the text encoder is checked against an engine without the cache in
            # tests/test_text_cache.py)
            assert_identical(after, before, "no LoRA after a LoRA job, and before any")
            # A1111's 12-digit short hash names the same file
            short = LoraRef(name="alpha", hash=h["alpha"][:12])
            assert_identical((await _one(c, _req(loras=[short])))[0], full, "short hash")
            # the text-encoder half of a LoRA takes effect too
            unet_only = (await _one(c, _req(loras=[ref("alpha unet")])))[0]
            assert_different(unet_only, full, "alpha with and without its text-encoder part")
            # kohya's layout (A1111's LoRAs) loads to the same weights
            kohya = (await _one(c, _req(loras=[ref("alpha-kohya")])))[0]
            assert_same_picture(kohya, full, "the same LoRA in kohya and peft layouts")
            # two LoRAs at once, and a LoRA given with --lora outside the folder
            both = (await _one(c, _req(loras=[ref("alpha"), ref("beta", 0.7)])))[0]
            assert_different(both, full, "alpha+beta and alpha")
            assert_different((await _one(c, _req(loras=[ref("delta")])))[0], before, "delta")
            # more LoRAs than the cache holds (2): each comes back as it was
            for name in ("beta", "gamma", "delta", "alpha"):
                await _one(c, _req(loras=[ref(name)]))
            assert_identical((await _one(c, _req(loras=[ref("alpha")])))[0], full,
                             "alpha after being unloaded and loaded again")
            assert_identical((await _one(c, _req()))[0], before, "no LoRA, at the end")
            # same seed, same image alone or batched, with a LoRA
            batch = await _one(c, _req(seeds=(3, 5), loras=[ref("alpha")]))
            assert_same_picture(batch[1], full, "seed 5 with alpha, alone vs batched")
            assert_different(batch[0], batch[1], "seeds 3 and 5 with alpha")
            # img2img shares the UNet and text encoder: the LoRA applies there too
            init = io.BytesIO()
            Image.fromarray(before.astype(np.uint8)).save(init, format="PNG")

            async def img2img(loras: list[LoraRef]) -> np.ndarray:
                req = _req(kind="img2img", steps=6, strength=0.6, loras=loras)
                return np.asarray((await c.run(req, init_pngs=[init.getvalue()]))[0], np.int16)

            plain = await img2img([])
            assert_different(await img2img([ref("alpha")]), plain, "img2img with alpha")
            assert_identical(await img2img([]), plain, "img2img without a LoRA, again")

    asyncio.run(main())


def test_a_different_file_of_the_same_name_is_refused(lora_worker, lora_files):
    async def main() -> None:
        async with WorkerClient(lora_worker.share) as c:
            other = addnet_hash(lora_files["beta"])  # beta's content, alpha's name
            with pytest.raises(InvalidRequest, match="different file"):
                await c.submit(_req(loras=[LoraRef(name="alpha", hash=other)]))
            with pytest.raises(InvalidRequest, match="no LoRA 'zeta'"):
                await c.submit(_req(loras=[LoraRef(name="zeta", hash=other)]))

    asyncio.run(main())


def test_bounds_on_the_wire(lora_worker, lora_files):
    h = addnet_hash(lora_files["alpha"])
    for bad in (dict(weight=4.5), dict(weight=float("nan")), dict(hash="xyz" * 4),
                dict(hash=h[:11]), dict(name="a:b"), dict(name="x" * 129)):
        with pytest.raises(ValidationError):
            LoraRef(**{"name": "alpha", "hash": h, **bad})
    with pytest.raises(ValidationError):
        JobRequest(loras=[LoraRef(name=f"n{i}", hash=h) for i in range(9)])
    body = json.loads(_req().model_dump_json())
    for loras in ([{"name": "alpha", "weight": 5, "hash": h}],
                  [{"name": "alpha", "weight": 1, "hash": h}] * 2,
                  [{"name": "alpha", "weight": 1, "hash": h, "extra": 1}],
                  [{"name": "../alpha", "weight": 1, "hash": h}]):
        r = httpx.post(lora_worker.share.split("#")[0] + "/v1/jobs",
                       json={**body, "loras": loras},
                       headers={"Authorization": f"Bearer {lora_worker.token}"}, timeout=30)
        assert r.status_code == 422, (loras, r.text)


def test_the_worker_check_says_which_kind(lora_files):
    from colabswarm.backend.engine import Engine
    from colabswarm.backend.server import WorkerApp

    app = WorkerApp(Engine(["tiny"], warmup=False, loras=[str(lora_files["alpha"])]), "t" * 32)
    good = addnet_hash(lora_files["alpha"])
    app.check(_req(loras=[LoraRef(name="alpha", hash=good)]))
    for ref in (LoraRef(name="alpha", hash="0" * 64), LoraRef(name="beta", hash=good)):
        with pytest.raises(ModelNotAvailable):  # another worker may have it: not invalid
            app.check(_req(loras=[ref]))
    info = app.info()
    assert [(lo.name, lo.hash) for lo in info.loras] == [("alpha", good)]


def test_sdxl_loras_on_unet_and_both_text_encoders(lora_worker, lora_files):
    h = {name: addnet_hash(p) for name, p in lora_files.items()}

    async def main() -> None:
        async with WorkerClient(lora_worker.share) as c:
            def xl(*loras: LoraRef) -> JobRequest:
                return _req(model="tiny-xl", loras=loras)

            before = (await _one(c, xl()))[0]
            full = (await _one(c, xl(LoraRef(name="xl", hash=h["xl"]))))[0]
            unet_only = (await _one(c, xl(LoraRef(name="xl unet", hash=h["xl unet"]))))[0]
            zero = (await _one(c, xl(LoraRef(name="xl", weight=0.0, hash=h["xl"]))))[0]
            assert_different(full, before, "SDXL with a LoRA and without")
            assert_different(full, unet_only, "SDXL LoRA with and without text encoders")
            assert_identical(zero, before, "SDXL LoRA at weight 0 and none")
            assert_identical((await _one(c, xl()))[0], before, "SDXL, no LoRA after a LoRA")
            # an SD 1.x LoRA does not fit the SDXL model: the job fails, saying so, and
            # leaves nothing behind
            with pytest.raises(ModelNotAvailable, match="does not fit") as failed:
                await c.run(xl(LoraRef(name="beta", hash=h["beta"])))
            assert failed.value.kind is ErrorKind.MODEL_NOT_AVAILABLE
            assert_identical((await _one(c, xl()))[0], before, "SDXL after a LoRA that failed")
            # from then on the worker refuses it up front (422), and still runs it on SD
            with pytest.raises(InvalidRequest, match="does not fit"):
                await c.submit(xl(LoraRef(name="beta", hash=h["beta"])))
            await _one(c, _req(loras=[LoraRef(name="beta", hash=h["beta"])]))

    asyncio.run(main())
