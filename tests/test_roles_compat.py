"""Roles and an older worker or controller: a controller from this version with a worker from
before guest tokens (its /v1/info has no role, usage or controllers, and it has no /v1/logs or
/v1/guests), and what this version's worker sends to a controller that knows none of it.

The old worker is emulated at the wire, as in test_compat.py: the real tiny worker behind a
proxy that answers as the workers before roles did.
"""

from __future__ import annotations

import json

import httpx
import pytest

from colabswarm.backend.serve import start_worker
from colabswarm.errors import BackendUnavailable, ErrorKind
from colabswarm.protocol import Info
from colabswarm.swarm import Swarm
from tests.asgiserver import LoopbackServer, read_body, relay, reply

_NEW_INFO_FIELDS = ("role", "guest", "usage", "controllers")
_NEW_ROUTES = ("/v1/logs", "/v1/guests")


class WorkerBeforeRoles(LoopbackServer):
    def __init__(self, target: str) -> None:
        self.target = target
        self.client_ids: set[str] = set()
        super().__init__(self.app, "worker-before-roles")

    async def app(self, scope, receive, send) -> None:
        body = await read_body(receive)
        method, path = scope["method"], scope["path"]
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.client_ids.add(headers.get("x-colabswarm-client", "-"))
        if path.startswith(_NEW_ROUTES):  # Starlette's answer for a path it does not have
            return await reply(send, 404, b'{"detail":"Not Found"}', "application/json")
        async with httpx.AsyncClient(base_url=self.target, timeout=60) as client:
            qs = scope["query_string"].decode()
            fwd = {k: v for k, v in headers.items() if k in ("authorization", "content-type")}
            r = await client.request(method, path + (f"?{qs}" if qs else ""), headers=fwd,
                                     content=body)
        content = r.content
        if path == "/v1/info" and r.status_code == 200:
            info = r.json()
            for key in _NEW_INFO_FIELDS:
                info.pop(key, None)
            content = json.dumps(info).encode()
        await relay(send, r, content)


def test_a_controller_with_roles_uses_a_worker_from_before_them(worker):
    old = WorkerBeforeRoles(worker.local_url).start()
    s = Swarm(output_dir=None)
    try:
        s.add(f"http://127.0.0.1:{old.port}#token={worker.token}", name="old")
        assert s.backends[0]["role"] is None
        made = s.generate("a red fox", images=2, seed=7, width=64, height=64, steps=2)
        assert [g.seed for g in made.images] == [7, 8]
        with pytest.raises(BackendUnavailable) as err:
            s.backend("old").logs()
        assert err.value.kind is ErrorKind.NOT_FOUND
        assert "from before guest tokens" in str(err.value) and "update" in str(err.value)
        assert len(old.client_ids - {"-"}) == 1  # it sent its id; the old worker ignored it
    finally:
        s.close()
        old.stop()


def test_what_a_worker_with_roles_sends_parses_where_the_new_fields_are_unknown():
    """A controller from before roles reads /v1/info with a model that lacks the new fields:
    pydantic's default ignores unknown keys, which is the wire rule that keeps it working.
    Checked with the real answers to the owner and to a guest."""
    h = start_worker(name="roles", simulate_speed=1.0)
    try:
        share = h.add_guest("ivy", images_per_hour=5)
        with httpx.Client(base_url=h.local_url, timeout=30) as http:
            for token in (h.token, share.split("#token=")[1]):
                data = http.get("/v1/info", headers={"Authorization": f"Bearer {token}"}).json()
                assert set(_NEW_INFO_FIELDS) <= set(data)
                old_fields = {k: v for k, v in Info.model_fields.items()
                              if k not in _NEW_INFO_FIELDS}
                from pydantic import create_model

                OldInfo = create_model("OldInfo", __config__=Info.model_config,  # noqa: N806
                                       **{k: (f.annotation, f) for k, f in old_fields.items()})
                old = OldInfo.model_validate(data)
                assert old.name == "roles" and old.limits.max_images >= 1
    finally:
        h.stop()
