"""The worker's HTTP API, against a real uvicorn server on loopback with the tiny model."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from colabswarm.backend.client import WorkerClient
from colabswarm.backend.serve import start_worker
from colabswarm.errors import AuthError, InvalidRequest
from colabswarm.protocol import JobRequest, Limits
from tests.imagecheck import assert_different, assert_identical, assert_same_picture


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _png(size=(64, 64), fmt="PNG", color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _wait_done(http: httpx.Client, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    status = {"version": -1}
    while time.monotonic() < deadline:
        params = {"wait": 5, "since": status["version"]}
        status = http.get(f"/v1/jobs/{job_id}", params=params).json()
        if status["state"] not in ("queued", "running"):
            return status
    raise AssertionError(f"job {job_id} did not finish: {status}")


@pytest.fixture
def http(worker):
    with httpx.Client(base_url=worker.local_url, headers=_auth(worker.token), timeout=60) as c:
        yield c


def test_every_route_needs_the_token(worker, http):
    spec = http.get("/v1/openapi.json").json()
    assert "/healthz" not in spec["paths"], "the bare liveness probe is the only open route"
    checked = 0
    with httpx.Client(base_url=worker.local_url, timeout=10) as anon:
        for path, methods in spec["paths"].items():
            concrete = path.replace("{job_id}", "0123456789abcdef").replace("{index}", "0")
            for method in methods:
                for headers in ({}, _auth("wrong-token-wrong-token"), {"Authorization": "Basic x"}):
                    r = anon.request(method.upper(), concrete, headers=headers, content=b"{}")
                    assert r.status_code == 401, (method, path, headers, r.text)
                    assert "token" in r.json()["detail"]
                checked += 1
        assert anon.get("/v1/openapi.json").status_code == 401
        assert anon.get("/healthz").json() == {"ok": True}
    assert checked >= 8


def test_three_images_come_back_as_pngs_with_consecutive_seeds(http):
    r = http.post("/v1/jobs", json={"prompt": "a red fox", "width": 64, "height": 64,
                                    "steps": 3, "seeds": [41, 42, 43]})
    assert r.status_code == 202, r.text
    status = _wait_done(http, r.json()["id"])
    assert status["state"] == "done" and status["images_ready"] == 3
    seeds = []
    for i in range(3):
        img = http.get(f"/v1/jobs/{status['id']}/images/{i}")
        assert img.headers["content-type"] == "image/png"
        assert img.content.startswith(b"\x89PNG")
        assert Image.open(io.BytesIO(img.content)).size == (64, 64)
        seeds.append(int(img.headers["x-seed"]))
    assert seeds == [41, 42, 43]
    assert http.delete(f"/v1/jobs/{status['id']}").status_code == 200
    assert http.get(f"/v1/jobs/{status['id']}").status_code == 404


async def test_seed_is_reproducible_alone_and_inside_a_batch(worker):
    req = JobRequest(prompt="a lighthouse", width=64, height=64, steps=3)
    async with WorkerClient(worker.share) as c:
        alone1 = await c.run(req.model_copy(update={"seeds": [7]}))
        alone2 = await c.run(req.model_copy(update={"seeds": [7]}))
        batch1 = await c.run(req.model_copy(update={"seeds": [5, 6, 7, 8]}))
        batch2 = await c.run(req.model_copy(update={"seeds": [5, 6, 7, 8]}))
    # exact: same seed, same batch size, same worker
    assert_identical(alone1[0], alone2[0], "seed 7 alone, twice")
    for i in range(4):
        assert_identical(batch1[i], batch2[i], f"seed {5 + i} in the same batch, twice")
    # up to the rounding of batched kernels, which depends on the processor
    assert_same_picture(alone1[0], batch1[2], "seed 7 alone and inside a batch of 4")
    assert_different(batch1[0], batch1[2], "seeds 5 and 7")


def test_interrupt_stops_a_running_job_between_steps(http):
    r = http.post("/v1/jobs", json={"prompt": "slow", "width": 256, "height": 256, "steps": 150,
                                    "seeds": [1, 2, 3, 4]})
    job_id = r.json()["id"]
    status = {"version": -1, "step": 0, "state": "queued"}
    deadline = time.monotonic() + 30
    while status["step"] < 1 and time.monotonic() < deadline:
        params = {"wait": 5, "since": status["version"]}
        status = http.get(f"/v1/jobs/{job_id}", params=params).json()
    assert status["state"] == "running"
    r = http.post(f"/v1/jobs/{job_id}/interrupt")
    assert r.status_code == 200
    final = _wait_done(http, job_id)
    assert final["state"] == "interrupted"
    assert final["step"] < 150
    assert "interrupted at step" in final["error"]
    assert http.get(f"/v1/jobs/{job_id}/images/0").status_code == 409


@pytest.fixture
def strict_worker():
    limits = Limits(max_pixels=128 * 128, max_steps=10, max_images=4, max_body_bytes=200_000,
                    max_init_pixels=256 * 256, max_prompt_chars=50, max_queue=3)
    handle = start_worker("tiny", limits=limits)
    with httpx.Client(base_url=handle.local_url, headers=_auth(handle.token), timeout=30) as c:
        yield handle, c
    handle.stop()


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"width": 100, "height": 64}, ["multiple of 8", "96", "104"]),
        ({"width": 256, "height": 256}, ["pixels", "16384"]),
        ({"steps": 11}, ["steps", "10"]),
        ({"seeds": [1, 2, 3, 4, 5]}, ["5 images", "limit of 4"]),
        ({"model": "runwayml/stable-diffusion-v1-5"}, ["does not serve", "tiny"]),
        ({"prompt": "x" * 51}, ["50 characters"]),
        ({"cfg": 99}, ["cfg"]),
        ({"seeds": [-1]}, ["Seeds"]),
        ({"kind": "img2img"}, ["init_images", "POST /v1/uploads"]),
        ({"kind": "img2img", "init_images": ["00000000deadbeef"]}, ["upload"]),
        ({"strength": 1.5}, ["strength"]),
        ({"scheduler": "dpm"}, ["scheduler", "Extra inputs"]),  # not a field: refused
    ],
)
def test_each_limit_has_a_clear_4xx(strict_worker, body, words):
    _, http = strict_worker
    req = {"prompt": "p", "width": 64, "height": 64, "steps": 4, "seeds": [1], **body}
    r = http.post("/v1/jobs", json=req)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    for w in words:
        assert w in detail, (w, detail)


def test_upload_and_img2img_limits(strict_worker):
    _, http = strict_worker
    big = http.post("/v1/uploads", content=b"x" * 300_000)
    assert big.status_code == 413 and "200000 bytes" in big.json()["detail"]
    gif = http.post("/v1/uploads", content=_png(fmt="GIF"))
    assert gif.status_code == 422 and "PNG" in gif.json()["detail"]
    junk = http.post("/v1/uploads", content=b"not an image at all")
    assert junk.status_code == 422 and "Cannot read" in junk.json()["detail"]
    huge = http.post("/v1/uploads", content=_png(size=(300, 300)))
    assert huge.status_code == 422 and "65536 pixels" in huge.json()["detail"]
    up = http.post("/v1/uploads", content=_png())
    assert up.status_code == 201
    uid = up.json()["id"]
    r = http.post("/v1/jobs", json={"kind": "img2img", "init_images": [uid], "width": 64,
                                    "height": 64, "steps": 4, "strength": 0.1, "seeds": [1]})
    assert r.status_code == 422 and "steps*strength" in r.json()["detail"]
    r = http.post("/v1/jobs", json={"kind": "upscale", "init_images": [uid], "scale": 2,
                                    "upscaler": "esrgan-9000", "seeds": [1]})
    assert r.status_code == 422 and "lanczos" in r.json()["detail"]
    r = http.post("/v1/jobs", json={"kind": "img2img", "init_images": [uid], "width": 64,
                                    "height": 64, "steps": 4, "strength": 0.5, "seeds": [3]})
    assert r.status_code == 202
    assert _wait_done(http, r.json()["id"])["state"] == "done"


def test_full_queue_is_refused_with_a_hint(strict_worker):
    _, http = strict_worker
    body = {"prompt": "q", "width": 128, "height": 128, "steps": 10, "seeds": [1, 2, 3, 4]}
    codes = [http.post("/v1/jobs", json=body) for _ in range(5)]
    refused = [r for r in codes if r.status_code == 429]
    assert refused, [r.status_code for r in codes]
    answer = refused[0].json()
    assert answer["kind"] == "queue_full" and "queue is full" in answer["detail"]
    # when to come back, in the body and as the standard header (whole seconds, rounded up)
    assert 1 <= answer["retry_after_s"] <= 600
    assert int(refused[0].headers["retry-after"]) >= answer["retry_after_s"]
    http.post("/v1/interrupt")


def test_img2img_with_zero_strength_returns_the_image(worker):
    src = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    buf = io.BytesIO()
    src.save(buf, format="PNG")
    req = JobRequest(kind="img2img", width=64, height=64, steps=4, strength=0.0, seeds=[1])
    out = asyncio.run(_run(worker.share, req, buf.getvalue()))
    assert np.array_equal(np.asarray(out[0]), np.asarray(src))


async def _run(share: str, req: JobRequest, png: bytes | None = None):
    async with WorkerClient(share) as c:
        return await c.run(req, [png] if png else None)


async def test_twenty_concurrent_submits_all_complete(worker):
    async with WorkerClient(worker.share) as c:
        reqs = [JobRequest(prompt=f"p{i}", width=64, height=64, steps=2, seeds=[i])
                for i in range(20)]
        results = await asyncio.gather(*(c.run(r) for r in reqs))
        assert [len(r) for r in results] == [1] * 20
        info = await c.info()
    assert info.jobs_served >= 20
    assert info.results_held == 0, "acknowledged results are dropped"


async def test_client_errors_name_the_problem(worker):
    bad = WorkerClient(worker.local_url, token="x" * 20)
    with pytest.raises(AuthError, match="refused the token"):
        await bad.info()
    await bad.aclose()
    async with WorkerClient(worker.share) as c:
        with pytest.raises(InvalidRequest, match="multiple of 8"):
            await c.submit(JobRequest(width=65, height=64))


def test_uncollected_results_expire(strict_worker):
    handle, http = strict_worker
    handle.worker.limits.result_ttl_s = 0.3
    r = http.post("/v1/jobs", json={"prompt": "p", "width": 64, "height": 64, "steps": 2,
                                    "seeds": [1]})
    job_id = r.json()["id"]
    assert _wait_done(http, job_id)["state"] == "done"
    time.sleep(0.5)
    http.post("/v1/jobs", json={"prompt": "p", "width": 64, "height": 64, "steps": 2,
                                "seeds": [2]})
    assert http.get(f"/v1/jobs/{job_id}").status_code == 404


def test_tile_boxes_are_checked_before_any_work(strict_worker):
    _, http = strict_worker
    uid = http.post("/v1/uploads", content=_png(size=(60, 44))).json()["id"]  # x2: 120x88
    base = {"kind": "img2img", "init_images": [uid], "width": 64, "height": 64, "steps": 4,
            "strength": 0.5, "upscaler": "lanczos", "scale": 2}
    cases = [
        ({"seeds": [1, 2], "crops": [[0, 0, 64, 64]]}, ["one crop box per seed", "2 seeds"]),
        ({"seeds": [1], "crops": [[0, 0, 64, 56]]}, ["crop box 0", "64x64", "120x88"]),
        ({"seeds": [1], "crops": [[60, 0, 124, 64]]}, ["crop box 0", "inside"]),
        ({"seeds": [1], "crops": [[0, 0, 64, 64]], "scale": 9}, ["scale 9"]),
        ({"seeds": [1], "crops": [[0, 0, 64, 64]], "scale": 6}, ["65536"]),
        ({"seeds": [1], "crops": [[0, 0, 64, 64]], "upscaler": "esrgan-9000"}, ["lanczos"]),
        ({"seeds": [1], "crops": []}, ["only with crops"]),
    ]
    for extra, words in cases:
        r = http.post("/v1/jobs", json={**base, **extra})
        assert r.status_code == 422, (extra, r.text)
        for w in words:
            assert w in r.json()["detail"], (extra, w, r.json()["detail"])
    r = http.post("/v1/jobs", json={"prompt": "p", "width": 64, "height": 64, "steps": 4,
                                    "seeds": [1], "crops": [[0, 0, 64, 64]]})
    assert r.status_code == 422 and "tiles are img2img" in r.json()["detail"]
    # a box may pass the right edge by < 8 px (120 -> 128): accepted
    ok = http.post("/v1/jobs", json={**base, "seeds": [1], "crops": [[56, 0, 120, 64]]})
    assert ok.status_code == 202, ok.text
    assert _wait_done(http, ok.json()["id"])["state"] == "done"


def test_worker_cuts_tiles_like_the_controller(worker):
    """Tiles cut on the worker from the upscaled source are the controller's crops, edge rule
    included (90 px is not a multiple of 8, so every crop runs 6 px past the bottom edge)."""
    from colabswarm.swarm.tiles import cut_tiles, plan_tiles

    src = Image.fromarray(np.random.default_rng(1).integers(0, 255, (45, 61, 3), np.uint8))
    big = src.resize((122, 90), Image.Resampling.LANCZOS)
    plan = plan_tiles(122, 90, tile=96, overlap=16, padding=8)
    want = cut_tiles(big, plan)
    w, h = want[0].size
    boxes = [t.crop for t in plan.tiles]
    assert any(b[2] > 122 or b[3] > 90 for b in boxes), "the test needs a crop past the edge"
    req = JobRequest(kind="img2img", width=w, height=h, steps=4, strength=0.0,
                     seeds=list(range(len(boxes))), upscaler="lanczos", scale=2, crops=boxes)
    buf = io.BytesIO()
    src.save(buf, format="PNG")
    got = asyncio.run(_run(worker.share, req, buf.getvalue()))
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), f"tile {i} differs"


def test_a_worker_upscales_each_source_once(worker, monkeypatch):
    """Every tile job of one upscale uploads the same source; the big image is made once."""
    engine = worker.worker.engine
    calls: list[tuple[int, int]] = []
    real = engine.upscale

    def counting(image, upscaler, scale):
        calls.append(image.size)
        return real(image, upscaler, scale)

    monkeypatch.setattr(engine, "upscale", counting)
    rng = np.random.default_rng(5)

    def tile_job(src: Image.Image, seed: int) -> None:
        buf = io.BytesIO()
        src.save(buf, format="PNG")
        req = JobRequest(kind="img2img", width=64, height=64, steps=4, strength=0.0,
                         seeds=[seed], upscaler="lanczos", scale=2, crops=[(0, 0, 64, 64)])
        asyncio.run(_run(worker.share, req, buf.getvalue()))

    a = Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8))
    tile_job(a, 1)
    tile_job(a.copy(), 2)  # another upload of the same pixels
    assert calls == [(48, 48)]
    tile_job(Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)), 3)
    assert len(calls) == 2, "a different source is upscaled anew"
