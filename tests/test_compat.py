"""A controller from this version with a worker from before tile jobs (the first /v1 workers).

Friends' PCs and old Colab tabs are not all updated at once. The old worker is emulated at the
wire: the real tiny worker behind a proxy that answers as the first /v1 workers did (no "tiles"
capability, and a 422 for any job body that names a field they did not know).
"""

from __future__ import annotations

import json

import httpx
import numpy as np
from PIL import Image

from colabswarm.swarm import Swarm
from tests.asgiserver import LoopbackServer, read_body, relay, reply

_NEW_FIELDS = ("crops",)


class OldWorker(LoopbackServer):
    def __init__(self, target: str) -> None:
        self.target = target
        self.refused = 0
        self._client: httpx.AsyncClient | None = None
        super().__init__(self.app, "old-worker")

    async def app(self, scope, receive, send) -> None:
        body = await read_body(receive)
        method, path = scope["method"], scope["path"]
        if method == "POST" and path == "/v1/jobs":
            unknown = [f for f in _NEW_FIELDS if f in json.loads(body or b"{}")]
            if unknown:
                self.refused += 1
                detail = f"{unknown[0]}: Extra inputs are not permitted"
                return await reply(send, 422, json.dumps({"detail": detail}).encode(),
                                    "application/json")
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.target, timeout=60)
        qs = scope["query_string"].decode()
        headers = {k.decode(): v.decode() for k, v in scope["headers"]
                   if k.lower() in (b"authorization", b"content-type")}
        r = await self._client.request(method, path + (f"?{qs}" if qs else ""),
                                       headers=headers, content=body)
        content = r.content
        if path == "/v1/info" and r.status_code == 200:
            info = r.json()
            info["capabilities"] = [c for c in info["capabilities"] if c != "tiles"]
            content = json.dumps(info).encode()
        await relay(send, r, content)


def test_a_new_controller_uses_a_worker_from_before_tile_jobs(worker):
    old = OldWorker(worker.local_url).start()
    s = Swarm(output_dir=None)
    try:
        s.add(f"http://127.0.0.1:{old.port}#token={worker.token}", name="old")
        made = s.generate("a red fox", images=2, seed=7, width=64, height=64, steps=2)
        assert [g.seed for g in made.images] == [7, 8]
        src = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), np.uint8))
        r = s.upscale(src, scale=2, tile=64, overlap=16, denoise=0.0, steps=4, seed=3)
        plain = src.resize((128, 128), Image.Resampling.LANCZOS)
        assert np.abs(np.asarray(r.image, np.int16) - np.asarray(plain, np.int16)).max() <= 1
        assert old.refused == 0, "no job named a field the old worker does not know"
        assert any("the controller cuts them" in m for _, _, m in s.logs)
    finally:
        s.close()
        old.stop()
