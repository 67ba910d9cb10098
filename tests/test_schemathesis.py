"""Schemathesis against a live tiny-model worker: no 5xx, every answer as documented, and no
operation answers anything but 401 without the token.

The worker runs with small limits so that every generated job is either refused at once (422)
or runs in a fraction of a second. The number of cases is printed and written to
``<tmp>/schemathesis-figures.json`` (docs/SECURITY.md quotes it).
"""

from __future__ import annotations

import copy
import json
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

import requests  # noqa: E402  (a schemathesis dependency)
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402  (the public names of the built-in checks)
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from colabswarm.backend.serve import start_worker  # noqa: E402
from colabswarm.protocol import Limits  # noqa: E402

EXAMPLES = 40  # per operation and mode: ~900 cases, ~30 s on 2 cores
LIMITS = Limits(max_pixels=64 * 64, max_steps=4, max_images=2, max_queue=8, max_uploads=8,
                max_body_bytes=256_000, max_init_pixels=128 * 128, max_prompt_chars=200)
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance,
          content_type_conformance, response_headers_conformance]
WRONG = "Bearer " + "w" * 32


@pytest.fixture(scope="module")
def live() -> Iterator:
    handle = start_worker("tiny", name="fuzzed", limits=LIMITS)
    yield handle
    handle.stop()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _done_job(http: httpx.Client) -> str:
    """A finished job with two images, so job routes are exercised on a real id too."""
    r = http.post("/v1/jobs", json={"prompt": "st", "width": 64, "height": 64, "steps": 2,
                                    "seeds": [1, 2]})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = http.get(f"/v1/jobs/{job_id}", params={"wait": 5}).json()
        if s["state"] == "done":
            return job_id
    raise AssertionError(f"job {job_id} did not finish")


def _narrowed(spec: dict) -> dict:
    """The same API with JobRequest narrowed to what this worker accepts (its /v1/info limits),
    so that generated jobs are also accepted and run, not only refused."""
    spec = copy.deepcopy(spec)
    job = spec["components"]["schemas"]["JobRequest"]
    job["required"] = ["width", "height", "steps"]
    props = job["properties"]
    sides = list(range(8, 65, 8))
    props["kind"] = {"type": "string", "enum": ["txt2img"]}
    props["width"] = props["height"] = {"type": "integer", "enum": sides}
    props["steps"] = {"type": "integer", "minimum": 1, "maximum": LIMITS.max_steps}
    props["seeds"] = {"type": "array", "minItems": 1, "maxItems": LIMITS.max_images,
                      "items": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}}
    props["model"] = {"anyOf": [{"type": "string", "enum": ["tiny"]}, {"type": "null"}]}
    props["init_images"] = {"type": "array", "maxItems": 0, "items": {"type": "string"}}
    for key in ("prompt", "negative_prompt"):
        props[key] = {"type": "string", "maxLength": LIMITS.max_prompt_chars}
    return spec


def test_schemathesis_finds_no_5xx_and_no_schema_violation(live, tmp_path_factory):
    base = live.local_url
    http = httpx.Client(base_url=base, headers=_auth(live.token), timeout=60)
    assert httpx.get(base + "/v1/openapi.json").status_code == 401
    spec = http.get("/v1/openapi.json").json()
    schema = schemathesis.openapi.from_dict(spec)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 9, [op.label for op in ops]

    cases = 0
    anonymous = 0
    codes: dict[str, Counter] = defaultdict(Counter)
    failures: list[str] = []

    def run(op, mode: GenerationMode, **fixed) -> None:
        @given(case=op.as_strategy(generation_mode=mode, **fixed))
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate])
        def one(case) -> None:
            nonlocal cases, anonymous
            cases += 1
            resp = case.call(base_url=base, headers=_auth(live.token), timeout=60)
            codes[op.label][resp.status_code] += 1
            try:
                case.validate_response(resp, checks=CHECKS)
            except BaseException as exc:  # schemathesis raises an exception group
                failures.append(f"{op.label} ({mode.value}): {exc}"[:2000])
            if mode is not GenerationMode.POSITIVE:
                return
            # the same request without the token, and with a wrong one: 401 and nothing else
            kw = case.as_transport_kwargs(base_url=base)
            kw["headers"] = {k: v for k, v in kw["headers"].items()
                             if k.lower() != "authorization"}
            for extra in ({}, {"Authorization": WRONG}):
                anonymous += 1
                r = requests.request(**{**kw, "headers": {**kw["headers"], **extra}},
                                     timeout=30)
                if r.status_code != 401 or "token" not in r.json().get("detail", ""):
                    failures.append(f"{op.label} without a good token: {r.status_code} "
                                    f"{r.text[:200]}")

        one()

    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run(op, mode)
        if "{job_id}" in op.path:
            run(op, GenerationMode.POSITIVE, path_parameters={"job_id": _done_job(http)})
    run(schemathesis.openapi.from_dict(_narrowed(spec))["/v1/jobs"]["POST"],
        GenerationMode.POSITIVE)
    http.post("/v1/interrupt")
    http.close()

    figures = {"cases": cases, "anonymous_requests": anonymous, "operations": len(ops),
               "failures": len(failures),
               "status_codes": {k: dict(sorted(v.items())) for k, v in sorted(codes.items())}}
    out = Path(tmp_path_factory.getbasetemp()) / "schemathesis-figures.json"
    out.write_text(json.dumps(figures, indent=1))
    print(f"\nschemathesis: {cases} cases over {len(ops)} operations "
          f"(+{anonymous} replays without a good token), {len(failures)} failures -> {out}")
    print(json.dumps(figures["status_codes"]))
    assert not failures, "\n\n".join(dict.fromkeys(failures))
    successes = sum(n for c in codes.values() for code, n in c.items() if code < 300)
    assert successes > 20, f"too few requests reached the API's logic: {figures}"
    assert codes["POST /v1/jobs"][202] > 0, "some generated jobs must be accepted and run"
    assert all(code < 500 for c in codes.values() for code in c)


def test_every_operation_needs_the_token(live):
    """All routes of the OpenAPI document (and the document) answer 401 to a stranger."""
    spec = httpx.get(live.local_url + "/v1/openapi.json", headers=_auth(live.token)).json()
    checked = 0
    with httpx.Client(base_url=live.local_url, timeout=10) as anon:
        for path, methods in spec["paths"].items():
            concrete = path.replace("{job_id}", "0123456789abcdef").replace("{index}", "0")
            for method in methods:
                for headers in ({}, {"Authorization": WRONG}, {"Authorization": "bearer"},
                                {"Authorization": f"Basic {live.token}"},
                                {"Authorization": f"Bearer {live.token[:-1]}"}):
                    r = anon.request(method.upper(), concrete, headers=headers, content=b"{}")
                    assert r.status_code == 401, (method, path, headers, r.status_code)
                    assert r.headers["www-authenticate"] == "Bearer"
                checked += 1
        assert anon.get("/v1/openapi.json").status_code == 401
        assert anon.get("/v1/nonexistent").status_code == 401, "no route probing without a token"
    assert checked == sum(len(m) for m in spec["paths"].values()) >= 9


def test_every_error_is_documented_with_a_detail_string(live):
    spec = httpx.get(live.local_url + "/v1/openapi.json", headers=_auth(live.token)).json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            for code in ("401", "413"):
                assert code in op["responses"], (method, path, code)
            for code, resp in op["responses"].items():
                if code.startswith(("4", "5")):
                    ref = resp["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorDetail"), (method, path, code)
    detail = spec["components"]["schemas"]["ErrorDetail"]
    assert detail["properties"]["detail"]["type"] == "string"


def _raw(port: int, data: bytes) -> bytes:
    """One raw HTTP/1.1 exchange: for requests no well-behaved client library will send."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


def test_hostile_requests_beyond_the_schema(live):
    """What a generator built from the schema does not send: streamed oversize bodies, broken
    headers, lone surrogates, paths where names belong."""
    auth = _auth(live.token)
    with httpx.Client(base_url=live.local_url, headers=auth, timeout=30) as http:

        def chunks():  # no Content-Length: the cap must hold while the body streams in
            for _ in range(8):
                yield b"x" * 50_000

        r = http.post("/v1/uploads", content=chunks())
        assert r.status_code == 413 and "256000 bytes" in r.json()["detail"]
        r = http.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        lone = b'{"prompt": "\\ud800", "width": 64, "height": 64, "steps": 2}'
        r = http.post("/v1/jobs", content=lone, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "Unicode" in r.json()["detail"]
        for body in (b"[" * 50_000, b'{"prompt": "\xff"}', b"null"):
            r = http.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
            assert r.status_code in (400, 422) and isinstance(r.json()["detail"], str)
        for model in ("../../etc", "/root/model", "C:\\models\\x", "a/b/c", "http://x/y"):
            r = http.post("/v1/jobs", json={"model": model, "width": 64, "height": 64,
                                            "steps": 2})
            assert r.status_code == 422 and "does not serve" in r.json()["detail"], model
        r = http.get("/v1/jobs/..%2F..%2Finfo")
        assert r.status_code in (404, 422)
    tok = live.token.encode()
    head = b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + tok
    assert b" 400 " in _raw(live.port, head + b"\r\nContent-Length: abc\r\n\r\n{}")
    assert b" 413 " in _raw(live.port, head + b"\r\nContent-Length: 99999999999\r\n\r\n{}")
    anon = b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{}"
    assert b" 401 " in _raw(live.port, anon), "strangers hear 401 before any size check"


def test_downloads_allowed_only_by_hub_id(live):
    """With the owner's --allow-downloads, a request may name a hub id, never a path."""
    from colabswarm.backend.server import WorkerApp
    from colabswarm.errors import ColabSwarmError, InvalidRequest
    from colabswarm.protocol import JobRequest

    class Engine:
        model_names = ["tiny"]
        allow_downloads = True

        def upscaler_names(self) -> list[str]:
            return ["lanczos"]

    app = WorkerApp(Engine(), "t" * 32, LIMITS)
    app.check(JobRequest(model="stabilityai/sd-turbo", width=64, height=64, steps=2))
    for model in ("../x", "./x", "/etc/passwd", "a/../b", "a/b/c", "..\\x", "a/.", "a/..",
                  "https://x/y", "~/models", "C:/x", "a/b\x00", " a/b"):
        with pytest.raises(InvalidRequest, match="does not serve"):
            app.check(JobRequest(model=model, width=64, height=64, steps=2))
    Engine.allow_downloads = False
    with pytest.raises(InvalidRequest, match="does not serve"):
        app.check(JobRequest(model="stabilityai/sd-turbo", width=64, height=64, steps=2))
    for weak in ("", "short", "x" * 15, "has space in it ok", "ünïcode-token-123456"):
        with pytest.raises(ColabSwarmError, match="16-256"):
            WorkerApp(Engine(), weak, LIMITS)
