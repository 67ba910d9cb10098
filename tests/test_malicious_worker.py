"""A worker that lies: the controller trusts nothing it says, marks it errored with the reason,
and the images it was given are made elsewhere, each exactly once.

The fake speaks /v1 well enough to be registered (its /v1/info is a valid Info), then sends
oversized, truncated or non-PNG bodies, or tells an impossible story about its jobs.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import secrets
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from colabswarm.backend.client import WorkerClient
from colabswarm.backend.serve import start_worker
from colabswarm.errors import BackendUnavailable, WorkerMisbehaved
from colabswarm.protocol import Info, JobRequest, Limits
from colabswarm.swarm import Swarm
from tests.asgiserver import LoopbackServer

SIZE = 64


def _png(size: tuple[int, int] = (SIZE, SIZE), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (9, 9, 9)).save(buf, format="JPEG")
    return buf.getvalue()


def _broken_stream_png() -> bytes:
    """Every chunk CRC right, the compressed pixels cut short: passes Image.verify()."""
    data, out, pos = _png(), bytearray(_png()[:8]), 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            body = zlib.compress(b"\x00" * 10)
        out += struct.pack(">I", len(body)) + kind + body
        out += struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        pos += 12 + length
    return bytes(out)


class FakeWorker(LoopbackServer):
    """A /v1 server on loopback that misbehaves in one chosen way."""

    def __init__(self, mode: str, info_name: str | None = None,
                 extra_capabilities: tuple[str, ...] = ()) -> None:
        self.mode = mode
        self.info_name = info_name
        self.extra_capabilities = list(extra_capabilities)
        self.token = secrets.token_urlsafe(24)
        self.jobs: dict[str, dict] = {}
        self.submits = 0
        self.polls = 0
        super().__init__(self._app(), "fake-worker")

    @property
    def share(self) -> str:
        return f"http://127.0.0.1:{self.port}#token={self.token}"

    def _status(self, job_id: str, job: dict, polls: int) -> dict:
        n = len(job["seeds"])
        st = {"id": job_id, "state": "done", "kind": "txt2img", "step": 2, "total_steps": 2,
              "seeds": job["seeds"], "images_ready": n, "version": 3,
              "width": job["width"], "height": job["height"]}
        m = self.mode
        if m == "fewer_images":
            st["images_ready"] = n - 1
        elif m == "step_backwards":
            st.update(state="running", step=max(0, 10 - polls), total_steps=10, version=polls)
        elif m == "version_backwards":
            st.update(state="running", step=polls, total_steps=100, version=100 - polls)
        elif m == "back_to_queued":
            st.update(state="running" if polls < 2 else "queued", step=1, version=polls)
        elif m == "forever":
            st.update(state="running", step=1, total_steps=2, version=1)
        elif m == "other_job":
            st["id"] = "0123456789abcdef"
        elif m == "other_seeds":
            st["seeds"] = [s + 1 for s in job["seeds"]]
        elif m == "bad_status":
            st["state"] = "exploded"
        elif m == "path_in_id":
            st["id"] = "../../v1/free"
        elif m == "huge_run":  # finite, schema-valid, and impossible: longer than the job took
            st["run_s"] = 5e5
        elif m == "spin":  # "progress" at every poll, at once
            st.update(state="running", step=min(polls, 999_999), total_steps=1_000_000,
                      version=polls)
        elif m == "long_error":
            st.update(state="failed", error="E" * 100_000, images_ready=0)
        return st

    def _app(self) -> FastAPI:
        app = FastAPI()
        fake = self

        @app.middleware("http")
        async def auth(request: Request, call_next):  # noqa: ANN202
            if request.headers.get("authorization") != f"Bearer {fake.token}":
                return JSONResponse({"detail": "token"}, status_code=401)
            return await call_next(request)

        @app.get("/v1/info")
        async def info() -> Any:
            if fake.mode == "bad_info":
                return {"name": "something else", "version": 3}
            if fake.mode == "huge_info":  # an endless body: 400 MiB if read whole
                async def endless():
                    yield b'{"name": "'
                    for _ in range(400 * 16):
                        yield b"x" * 65536
                return StreamingResponse(endless(), media_type="application/json")
            name = fake.info_name or f"fake-{fake.mode}"
            caps = ["txt2img", "img2img", "upscale"] + fake.extra_capabilities
            if fake.mode.startswith("bundle_"):
                caps.append("bundle")
            return Info(name=name, version="0.1.0", device="cuda",
                        gpu_name="Totally Real GPU", models=["tiny"], model_loaded="tiny",
                        capabilities=caps, upscalers=["lanczos"],
                        limits=Limits(), queue_depth=0, running=0, jobs_served=0,
                        step_seconds_per_mpix=0.001).model_dump()

        @app.post("/v1/uploads", status_code=201)
        async def upload(request: Request) -> dict:
            with Image.open(io.BytesIO(await request.body())) as im:
                w, h = im.size
            if fake.mode == "wrong_upload":
                w, h = w // 2, h // 2
            return {"id": secrets.token_hex(8), "width": w, "height": h}

        @app.post("/v1/jobs", status_code=202)
        async def submit(req: JobRequest) -> Any:
            fake.submits += 1
            if fake.mode == "busy_first" and fake.submits <= 2:
                return JSONResponse({"detail": "This worker's queue is full.", "kind":
                                     "queue_full", "retry_after_s": 1.0}, status_code=429,
                                    headers={"retry-after": "1"})
            job_id = secrets.token_hex(8)
            fake.jobs[job_id] = {"seeds": req.seeds, "width": req.width, "height": req.height,
                                 "polls": 0}
            return {"id": job_id, "state": "queued", "seeds": req.seeds, "version": 0,
                    "width": req.width, "height": req.height}

        @app.get("/v1/jobs/{job_id}")
        async def status(job_id: str, wait: float = 0.0) -> Any:
            job = fake.jobs.get(job_id)
            if job is None:
                return JSONResponse({"detail": "no such job"}, status_code=404)
            job["polls"] += 1
            fake.polls += 1
            if fake.mode == "forever":
                await asyncio.sleep(min(wait, 1.0))
            st = fake._status(job_id, job, job["polls"])
            if fake.mode == "infinite_run":  # valid JSON whose number parses to infinity
                body = json.dumps(st)[:-1] + ', "run_s": 1e999}'
                return Response(body.encode(), media_type="application/json")
            if fake.mode == "huge_status":  # an endless body: 300 MiB if read whole
                async def endless():
                    yield json.dumps(st)[:-1].encode() + b', "error": "'
                    for _ in range(300 * 16):
                        yield b"x" * 65536
                return StreamingResponse(endless(), media_type="application/json")
            return st

        @app.get("/v1/jobs/{job_id}/images")
        async def bundle(job_id: str) -> Response:
            job = fake.jobs.get(job_id)
            if job is None:
                return JSONResponse({"detail": "no such job"}, status_code=404)
            seeds = list(job["seeds"])
            pngs = [_png(seed=s) for s in seeds]
            m = fake.mode
            if m == "bundle_short":
                pngs = pngs[:-1]
            elif m == "bundle_jpeg":
                pngs[0] = _jpeg()
            elif m == "bundle_wrong_seeds":
                seeds = [s + 1 for s in seeds]
            body = b"".join(len(p).to_bytes(4, "big") + p for p in pngs)
            if m == "bundle_overlong":  # a frame that says it is far longer than the body
                body = (1 << 30).to_bytes(4, "big") + body[4:]
            return Response(body, media_type="application/x-colabswarm-pngs",
                            headers={"x-seeds": ",".join(map(str, seeds))})

        @app.get("/v1/jobs/{job_id}/images/{index}")
        async def image(job_id: str, index: int) -> Response:
            job = fake.jobs.get(job_id)
            if job is None:
                return JSONResponse({"detail": "no such job"}, status_code=404)
            seed = job["seeds"][min(index, len(job["seeds"]) - 1)]
            png, headers = _png(seed=seed), {"x-seed": str(seed)}
            m = fake.mode
            if m == "oversized":
                png += b"\x00" * (3 << 20)
            elif m == "oversized_chunked":
                async def endless():
                    yield png
                    for _ in range(64):
                        yield b"\x00" * 65536

                return StreamingResponse(endless(), media_type="image/png")
            elif m == "truncated":
                png = png[: len(png) // 2]
            elif m == "jpeg":
                png = _jpeg()
            elif m == "html":
                return Response(b"<html>502 Bad Gateway</html>", media_type="text/html")
            elif m == "wrong_size":
                png = _png((SIZE // 2, SIZE // 2), seed)
            elif m == "broken_stream":
                png = _broken_stream_png()
            elif m == "wrong_seed":
                headers["x-seed"] = str(seed + 1)
            elif m == "missing_image" and index == len(job["seeds"]) - 1:
                return JSONResponse({"detail": "gone"}, status_code=404)
            return Response(png, media_type="image/png", headers=headers)

        @app.delete("/v1/jobs/{job_id}")
        async def delete(job_id: str) -> dict:
            fake.jobs.pop(job_id, None)
            return {"deleted": job_id}

        @app.post("/v1/jobs/{job_id}/interrupt")
        async def interrupt(job_id: str) -> Any:
            if job_id not in fake.jobs:
                return JSONResponse({"detail": "no such job"}, status_code=404)
            return fake._status(job_id, fake.jobs[job_id], 0)

        return app


# mode -> what the controller's reason must say (None: no error needed, just no lost image)
MISBEHAVIOURS = {
    "oversized": "announced an answer of",
    "oversized_chunked": "sent over",
    "truncated": "bad image",
    "jpeg": "format JPEG|not a PNG",
    "html": "bad image",
    "wrong_size": r"size \(32, 32\)",
    "broken_stream": "bad image|cannot be decoded",
    "wrong_seed": "image of seed",
    "fewer_images": "said it made",
    "missing_image": "HTTP 404",
    "step_backwards": "inconsistent job status: step",
    "version_backwards": "inconsistent job status: version",
    "back_to_queued": "inconsistent job status: state",
    "other_job": "inconsistent job status: the status of job",
    "other_seeds": "inconsistent job status: seeds",
    "bad_status": "malformed JobStatus",
    "path_in_id": "malformed JobStatus",
    "infinite_run": "malformed JobStatus",
    "huge_run": "reported running",
    "huge_status": "sent over",
    "bundle_short": "images for",
    "bundle_jpeg": "format JPEG|not a PNG",
    "bundle_wrong_seeds": "images of seeds",
    "bundle_overlong": "with an image of",
    "forever": None,  # looks busy, never finishes: a copy on the honest worker wins
}


@pytest.fixture(scope="module")
def honest() -> Iterator:
    handle = start_worker("tiny", name="honest")
    yield handle
    handle.stop()


# generated images are decoded when first used (their structure is checked on arrival): a pixel
# stream that does not decode inside valid chunks is caught then (its own test below)
_LATE = {"broken_stream"}


@pytest.mark.parametrize("mode", [m for m in MISBEHAVIOURS if m not in _LATE])
def test_a_lying_worker_is_errored_and_its_images_are_made_elsewhere(mode, honest):
    fake = FakeWorker(mode).start()
    swarm = Swarm(output_dir=None, health_every=0.5)
    try:
        swarm.add(fake.share, name="liar")  # first in order: it gets work first
        swarm.add(honest.share, name="honest")
        delivered: Counter = Counter()
        result = swarm.generate("trust no one", images=8, seed=700, width=SIZE, height=SIZE,
                                steps=2, on_image=lambda g: delivered.update([g.seed]))
        assert [g.seed for g in result.images] == list(range(700, 708))
        assert delivered == Counter(range(700, 708)), "every image exactly once"
        assert {g.backend for g in result.images} == {"honest"}, "nothing the liar sent is kept"
        assert all(g.image.size == (SIZE, SIZE) for g in result.images)
        assert fake.submits > 0, "the liar was given work"
        errored = [msg for _, _, msg in swarm.logs if msg.startswith("liar is errored: ")]
        expected = MISBEHAVIOURS[mode]
        if expected is not None:
            assert errored, list(swarm.logs)
            assert any(re.search(expected, msg) for msg in errored), errored
            if mode != "missing_image":  # a 404 for an image is a failed job, not a lie
                liar = next(b for b in swarm.backends if b["name"] == "liar")
                assert "quarantined" in liar["reason"], liar
                time.sleep(1.5)  # three health checks' worth: /v1/info still looks fine
                liar = next(b for b in swarm.backends if b["name"] == "liar")
                assert liar["status"] == "errored", "a caught liar does not come back by itself"
    finally:
        swarm.close()
        fake.stop()


def test_an_image_whose_pixels_do_not_decode_quarantines_its_worker(honest):
    """Valid chunks and CRCs around a zlib stream cut short: the image is refused with the
    reason when its pixels are first decoded, and its worker is quarantined then."""
    from tests.conftest import wait_until

    fake = FakeWorker("broken_stream").start()
    swarm = Swarm(output_dir=None, health_every=0.5)
    try:
        swarm.add(fake.share, name="liar")
        result = swarm.generate("late", images=2, seed=5, width=SIZE, height=SIZE, steps=2)
        assert {g.backend for g in result.images} == {"liar"}
        with pytest.raises(WorkerMisbehaved, match="cannot be decoded.*broken PNG"):
            result.images[0].image  # noqa: B018
        wait_until(lambda: "quarantined" in (swarm.backends[0]["reason"] or ""),
                   what="the liar quarantined")
        swarm.add(honest.share, name="honest")
        again = swarm.generate("late", images=2, seed=5, width=SIZE, height=SIZE, steps=2)
        assert {g.backend for g in again.images} == {"honest"}
        assert all(g.image.size == (SIZE, SIZE) for g in again.images)
    finally:
        swarm.close()
        fake.stop()


# a worker that is caught by the swarm's state (its figures do not add up), not by the client
_STATE_VERDICTS = {"missing_image", "huge_run"}


@pytest.mark.parametrize("mode", [m for m, why in MISBEHAVIOURS.items()
                                  if why is not None and m not in _STATE_VERDICTS])
async def test_the_client_names_a_lie_as_misbehaviour(mode):
    """The client raises WorkerMisbehaved (a BackendUnavailable) for answers no honest worker
    sends, so a controller can tell them from a dropped connection."""
    fake = FakeWorker(mode).start()
    try:
        async with WorkerClient(fake.share) as client:
            await client.info()  # as a controller does: learns whether it sends bundles
            with pytest.raises(WorkerMisbehaved, match=MISBEHAVIOURS[mode]):
                await client.run(JobRequest(width=SIZE, height=SIZE, steps=2, seeds=[1, 2]),
                                 timeout=20)
        assert fake.jobs == {}, "the job was deleted on the worker all the same"
    finally:
        fake.stop()


async def test_the_client_bounds_a_whole_job_in_time():
    """A worker that keeps a job 'running' forever costs the client its timeout, no more."""
    fake = FakeWorker("forever").start()
    try:
        async with WorkerClient(fake.share) as client:
            t0 = time.monotonic()
            with pytest.raises(BackendUnavailable, match="took longer than 2s"):
                await client.run(JobRequest(width=SIZE, height=SIZE, steps=2, seeds=[1]),
                                 timeout=2.0)
            assert time.monotonic() - t0 < 5
            assert fake.jobs == {}, "the abandoned job was deleted on the worker"
    finally:
        fake.stop()


def test_a_server_that_is_not_a_worker_cannot_be_added():
    fake = FakeWorker("bad_info").start()
    swarm = Swarm(output_dir=None)
    try:
        with pytest.raises(BackendUnavailable, match="malformed Info"):
            swarm.add(fake.share)
        assert swarm.backends == []
    finally:
        swarm.close()
        fake.stop()


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def test_an_endless_info_is_cut_off_at_add_and_costs_no_memory():
    fake = FakeWorker("huge_info").start()
    swarm = Swarm(output_dir=None)
    try:
        before = _rss()
        with pytest.raises(WorkerMisbehaved, match="sent over"):
            swarm.add(fake.share, name="bloat")
        assert _rss() - before < 64 << 20, "a 400 MiB /v1/info was not read whole"
        assert swarm.backends == []
    finally:
        swarm.close()
        fake.stop()


def test_a_worker_that_answers_long_polls_at_once_cannot_make_the_controller_spin(honest):
    """Every poll answered at once with 'progress': the client paces itself (at most one poll
    per progress interval), and the honest worker makes the images meanwhile."""
    fake = FakeWorker("spin").start()
    swarm = Swarm(output_dir=None, copies=False)
    try:
        swarm.add(fake.share, name="spinner")
        t0 = time.monotonic()
        future = swarm.submit_generate("spin", images=2, seed=1, width=SIZE, height=SIZE,
                                       steps=2)
        time.sleep(3.0)
        elapsed = time.monotonic() - t0
        polls = fake.polls
        # progress_every is 0.5 s: ~2 polls a second, plus the few state changes
        assert polls <= elapsed / 0.5 + 4, f"{polls} polls in {elapsed:.1f}s"
        assert not future.done()
        swarm.add(honest.share, name="honest")
        swarm.disable("spinner")
        result = future.result(timeout=60)
        assert [g.seed for g in result.images] == [1, 2]
    finally:
        swarm.close()
        fake.stop()


def test_a_full_queue_is_waited_out_and_not_remembered():
    """429 queue_full with Retry-After: the controller pauses that worker and tries again;
    the same parameters are not refused for good (the only backend is the busy one)."""
    fake = FakeWorker("busy_first").start()
    swarm = Swarm(output_dir=None)
    try:
        swarm.add(fake.share, name="busy")
        result = swarm.generate("wait for it", images=3, seed=50, width=SIZE, height=SIZE,
                                steps=2)
        assert [g.seed for g in result.images] == [50, 51, 52]
        assert fake.submits >= 3, "it was asked again after saying busy"
        busy = next(b for b in swarm.backends if b["name"] == "busy")
        assert busy["status"] == "running", busy
        assert any("is busy" in m for _, _, m in swarm.logs)
        again = swarm.generate("wait for it", images=1, seed=9, width=SIZE, height=SIZE,
                               steps=2)
        assert [g.seed for g in again.images] == [9]
    finally:
        swarm.close()
        fake.stop()


def test_a_long_error_string_is_cut_where_it_is_logged(honest):
    fake = FakeWorker("long_error").start()
    swarm = Swarm(output_dir=None)
    try:
        swarm.add(fake.share, name="chatty")
        swarm.add(honest.share, name="honest")
        result = swarm.generate("quiet", images=4, seed=3, width=SIZE, height=SIZE, steps=2)
        assert sorted(g.seed for g in result.images) == [3, 4, 5, 6]
        mentions = [m for _, _, m in swarm.logs if "EEEE" in m]
        assert mentions, "the worker's error is shown"
        assert max(len(m) for _, _, m in swarm.logs) < 1000, "no log line carries it whole"
    finally:
        swarm.close()
        fake.stop()


def test_an_upload_reported_at_the_wrong_size_quarantines_and_tiles_run_elsewhere(honest):
    fake = FakeWorker("wrong_upload", extra_capabilities=("tiles",)).start()
    swarm = Swarm(output_dir=None)
    try:
        swarm.add(fake.share, name="liar")  # first in order: it gets tiles first
        swarm.add(honest.share, name="honest")
        src = Image.fromarray(np.random.default_rng(4).integers(0, 255, (64, 64, 3), np.uint8))
        r = swarm.upscale(src, scale=2, tile=64, overlap=16, denoise=0.0, steps=2, seed=1,
                          save=False)
        assert r.image.size == (128, 128)
        assert set(r.tile_backends.values()) == {"honest"}
        liar = next(b for b in swarm.backends if b["name"] == "liar")
        assert liar["status"] == "errored" and "quarantined" in liar["reason"], liar
        assert "said the uploaded image is" in liar["reason"]
    finally:
        swarm.close()
        fake.stop()


def test_a_worker_name_with_terminal_escapes_is_cleaned_everywhere(tmp_path, honest):
    evil = "\x1b[2J\x1b[31mpwned\nfake log line\u202e"
    fake = FakeWorker("fine", info_name=evil).start()
    swarm = Swarm(output_dir=tmp_path)
    try:
        snap = swarm.add(fake.share)
        assert snap["name"] == "pwned fake log line", snap["name"]
        result = swarm.generate("clean", images=2, seed=1, width=SIZE, height=SIZE, steps=2)
        for _, _, message in swarm.logs:
            assert not any(ord(c) < 32 or c == "\u202e" for c in message), repr(message)
        from colabswarm.swarm import read_parameters

        for g in result.images:
            assert g.path is not None
            text = read_parameters(g.path)
            assert "\x1b" not in text and "\u202e" not in text
    finally:
        swarm.close()
        fake.stop()


@pytest.mark.parametrize("body", [b'{"freed": "yes"}', b'{"freed": 1}', b'{}', b'[true]'])
async def test_a_free_answer_that_is_not_a_yes_or_no_is_misbehaviour(body):
    """POST /v1/free's answer is one strict boolean: anything else from a worker is named."""
    from tests.asgiserver import LoopbackServer, read_body, reply

    async def app(scope, receive, send):
        await read_body(receive)
        await reply(send, 200, body, "application/json")

    server = LoopbackServer(app, "lying-free").start()
    try:
        async with WorkerClient(f"http://127.0.0.1:{server.port}#token={'t' * 32}") as c:
            with pytest.raises(WorkerMisbehaved, match="malformed Freed"):
                await c.free()
    finally:
        server.stop()
