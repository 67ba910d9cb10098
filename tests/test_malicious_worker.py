"""A worker that lies: the controller trusts nothing it says, marks it errored with the reason,
and the images it was given are made elsewhere, each exactly once.

The fake speaks /v1 well enough to be registered (its /v1/info is a valid Info), then sends
oversized, truncated or non-PNG bodies, or tells an impossible story about its jobs.
"""

from __future__ import annotations

import asyncio
import io
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

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.token = secrets.token_urlsafe(24)
        self.jobs: dict[str, dict] = {}
        self.submits = 0
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
        async def info() -> dict:
            if fake.mode == "bad_info":
                return {"name": "something else", "version": 3}
            return Info(name=f"fake-{fake.mode}", version="0.1.0", device="cuda",
                        gpu_name="Totally Real GPU", models=["tiny"], model_loaded="tiny",
                        capabilities=["txt2img", "img2img", "upscale"], upscalers=["lanczos"],
                        limits=Limits(), queue_depth=0, running=0, jobs_served=0,
                        step_seconds_per_mpix=0.001).model_dump()

        @app.post("/v1/jobs", status_code=202)
        async def submit(req: JobRequest) -> dict:
            fake.submits += 1
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
            if fake.mode == "forever":
                await asyncio.sleep(min(wait, 1.0))
            return fake._status(job_id, job, job["polls"])

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
    "jpeg": "format JPEG",
    "html": "bad image",
    "wrong_size": "size (32, 32)",
    "broken_stream": "bad image",
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
    "forever": None,  # looks busy, never finishes: a copy on the honest worker wins
}


@pytest.fixture(scope="module")
def honest() -> Iterator:
    handle = start_worker("tiny", name="honest")
    yield handle
    handle.stop()


@pytest.mark.parametrize("mode", list(MISBEHAVIOURS))
def test_a_lying_worker_is_errored_and_its_images_are_made_elsewhere(mode, honest):
    fake = FakeWorker(mode).start()
    swarm = Swarm(output_dir=None, health_every=0.5)
    try:
        swarm.add(fake.share, name="liar")  # first in order: it gets work first
        swarm.add(honest.share, name="honest")
        delivered: Counter = Counter()
        t0 = time.monotonic()
        result = swarm.generate("trust no one", images=8, seed=700, width=SIZE, height=SIZE,
                                steps=2, on_image=lambda g: delivered.update([g.seed]))
        took = time.monotonic() - t0
        assert [g.seed for g in result.images] == list(range(700, 708))
        assert delivered == Counter(range(700, 708)), "every image exactly once"
        assert {g.backend for g in result.images} == {"honest"}, "nothing the liar sent is kept"
        assert all(g.image.size == (SIZE, SIZE) for g in result.images)
        assert fake.submits > 0, "the liar was given work"
        errored = [msg for _, _, msg in swarm.logs if msg.startswith("liar is errored: ")]
        expected = MISBEHAVIOURS[mode]
        if expected is not None:
            assert errored, list(swarm.logs)
            assert any(expected in msg for msg in errored), errored
            if mode != "missing_image":  # a 404 for an image is a failed job, not a lie
                liar = next(b for b in swarm.backends if b["name"] == "liar")
                assert "quarantined" in liar["reason"], liar
                time.sleep(1.5)  # three health checks' worth: /v1/info still looks fine
                liar = next(b for b in swarm.backends if b["name"] == "liar")
                assert liar["status"] == "errored", "a caught liar does not come back by itself"
        assert took < 30, f"{mode}: {took:.1f}s"
    finally:
        swarm.close()
        fake.stop()


@pytest.mark.parametrize("mode", [m for m, why in MISBEHAVIOURS.items()
                                  if why is not None and m != "missing_image"])
async def test_the_client_names_a_lie_as_misbehaviour(mode):
    """The client raises WorkerMisbehaved (a BackendUnavailable) for answers no honest worker
    sends, so a controller can tell them from a dropped connection."""
    fake = FakeWorker(mode).start()
    try:
        async with WorkerClient(fake.share) as client:
            with pytest.raises(WorkerMisbehaved, match=re.escape(MISBEHAVIOURS[mode])):
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
