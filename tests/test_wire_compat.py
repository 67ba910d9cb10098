"""JobRequest.wire_json(): a job body that workers of every /v1 version accept.

The first /v1 workers refuse any JobRequest field they do not know (pydantic extra="forbid"),
so a field added since then may go out only when a job uses it. The old worker is emulated at
the wire as in tests/test_compat.py, but strictly: any field outside the first /v1 set is
refused, so a field added later and forgotten in JobRequest.ADDED_FIELDS is caught here.
"""

from __future__ import annotations

import asyncio
import json

import httpx

from colabswarm.backend.client import WorkerClient
from colabswarm.protocol import JobRequest, LoraRef
from tests.asgiserver import read_body, reply
from tests.test_compat import OldWorker

# JobRequest's fields in the first /v1 workers (git: 52b67c6, "init_images")
V1_FIELDS = frozenset({"kind", "prompt", "negative_prompt", "width", "height", "steps", "cfg",
                       "seeds", "model", "strength", "init_images", "upscaler", "scale"})
USED = {"crops": [(0, 0, 64, 64)], "sampler": "Euler a",
        "loras": [LoraRef(name="x", weight=0.5, hash="a" * 64)], "clip_skip": 2,
        "prompts": ["a fox", "an owl"]}


class StrictOldWorker(OldWorker):
    """The real worker behind a proxy that answers POST /v1/jobs as the first /v1 workers:
    422 for any field they did not have."""

    async def app(self, scope, receive, send) -> None:
        body = await read_body(receive)
        if scope["method"] == "POST" and scope["path"] == "/v1/jobs":
            unknown = sorted(set(json.loads(body or b"{}")) - V1_FIELDS)
            if unknown:
                self.refused += 1
                detail = json.dumps({"detail": f"{unknown[0]}: Extra inputs are not permitted"})
                return await reply(send, 422, detail.encode(), "application/json")

        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        await super().app(scope, replay, send)


def test_every_field_added_since_v1_is_listed():
    assert set(JobRequest.model_fields) - V1_FIELDS == set(JobRequest.ADDED_FIELDS)
    assert set(USED) == set(JobRequest.ADDED_FIELDS)


def test_wire_json_leaves_out_added_fields_at_their_defaults():
    plain = JobRequest(prompt="a fox", seeds=[1, 2])
    assert set(json.loads(plain.wire_json())) == V1_FIELDS
    assert JobRequest.model_validate_json(plain.wire_json()) == plain
    for name, value in USED.items():
        job = JobRequest(prompt="a fox", seeds=[1], kind="img2img", **{name: value})
        body = json.loads(job.wire_json())
        assert set(body) == V1_FIELDS | {name}, name
        assert JobRequest.model_validate_json(job.wire_json()) == job


def test_an_old_worker_runs_wire_json_jobs_and_refuses_new_features(worker):
    old = StrictOldWorker(worker.local_url).start()
    base = f"http://127.0.0.1:{old.port}/v1"
    auth = {"Authorization": f"Bearer {worker.token}", "content-type": "application/json"}
    try:
        job = JobRequest(prompt="a fox", width=64, height=64, steps=2, seeds=[3])
        r = httpx.post(f"{base}/jobs", content=job.wire_json(), headers=auth, timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        for _ in range(20):
            status = httpx.get(f"{base}/jobs/{job_id}", params={"wait": 5, "since": -1},
                               headers=auth, timeout=30).json()
            if status["state"] == "done":
                break
        assert status["state"] == "done"
        assert old.refused == 0
        # a sampler job is one an old worker cannot run: the controller must send such jobs
        # only to workers whose Info lists the sampler (old ones list none)
        with_sampler = job.model_copy(update={"sampler": "Euler a"})
        r = httpx.post(f"{base}/jobs", content=with_sampler.wire_json(), headers=auth,
                       timeout=30)
        assert r.status_code == 422 and old.refused == 1
        info = httpx.get(f"{base}/info", headers=auth, timeout=30).json()
        assert info["samplers"], "a new worker advertises its samplers (an old one does not)"
        assert {"samplers", "loras", "clip_skip"} <= set(info["capabilities"])
    finally:
        old.stop()


def test_the_client_runs_a_plain_job_on_an_old_worker(worker):
    old = StrictOldWorker(worker.local_url).start()
    try:
        async def main() -> None:
            async with WorkerClient(f"http://127.0.0.1:{old.port}#token={worker.token}") as c:
                images = await c.run(JobRequest(prompt="a fox", width=64, height=64, steps=2))
                assert len(images) == 1

        asyncio.run(main())
        assert old.refused == 0
    finally:
        old.stop()
