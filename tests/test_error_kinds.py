"""Every error the worker answers carries a kind, and a failed job says what kind of failure it
was, decided by the exception's type: a real uvicorn server on loopback, with the bench
simulator (or a small subclass of it that fails on purpose) as engine."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest
import torch

from colabswarm.backend.serve import start_worker
from colabswarm.backend.simulated import SimulatedEngine
from colabswarm.errors import ErrorKind
from colabswarm.protocol import STATUS_OF_KIND, ErrorDetail, JobStatus, Limits
from tests.conftest import wait_until

JOB = {"prompt": "p", "width": 64, "height": 64, "steps": 2, "seeds": [1]}


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _kind(r: httpx.Response) -> ErrorKind:
    """The answer is an ErrorDetail with a kind, and its status is the kind's in the table."""
    detail = ErrorDetail.model_validate(r.json())
    assert detail.kind is not None, r.text
    assert "0x" not in detail.detail, detail.detail
    return detail.kind


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def _wait_final(http: httpx.Client, job_id: str) -> JobStatus:
    status = JobStatus.model_validate(http.get(f"/v1/jobs/{job_id}").json())
    for _ in range(60):
        if status.state not in ("queued", "running"):
            return status
        r = http.get(f"/v1/jobs/{job_id}", params={"wait": 5, "since": status.version})
        status = JobStatus.model_validate(r.json())
    raise AssertionError(f"job {job_id} did not finish: {status}")


@pytest.fixture
def sim():
    limits = Limits(max_queue=2, max_body_bytes=100_000, max_json_bytes=10_000,
                    max_steps=1000)
    handle = start_worker(name="kinds", limits=limits, simulate_speed=1.0)
    with httpx.Client(base_url=handle.local_url, headers=_auth(handle.token), timeout=30) as c:
        yield handle, c
        c.post("/v1/interrupt")
    handle.stop()


def test_every_error_answer_has_a_kind_and_the_status_of_its_kind(sim):
    handle, http = sim
    seen: dict[str, tuple[int, ErrorKind]] = {}

    def expect(what: str, r: httpx.Response, status: int, kind: ErrorKind) -> None:
        assert (r.status_code, _kind(r)) == (status, kind), (what, r.status_code, r.text)
        seen[what] = (status, kind)

    anon = httpx.get(handle.local_url + "/v1/info")
    expect("no token", anon, 401, ErrorKind.UNAUTHORIZED)
    expect("too large upload", http.post("/v1/uploads", content=b"x" * 100_001), 413,
           ErrorKind.TOO_LARGE)
    streamed = http.post("/v1/jobs", content=iter([b"{" + b" " * 9_000] * 2),
                         headers={"content-type": "application/json"})
    expect("streamed JSON over max_json_bytes", streamed, 413, ErrorKind.TOO_LARGE)
    expect("not JSON", http.post("/v1/jobs", content=b"{]",
                                 headers={"content-type": "application/json"}),
           422, ErrorKind.INVALID)
    expect("over a limit", http.post("/v1/jobs", json={**JOB, "width": 100}), 422,
           ErrorKind.INVALID)
    expect("unknown model", http.post("/v1/jobs", json={**JOB, "model": "nope"}), 422,
           ErrorKind.MODEL_NOT_AVAILABLE)
    png = http.post("/v1/uploads", content=_png()).json()["id"]
    expect("unknown upscaler", http.post("/v1/jobs", json={
        "kind": "upscale", "init_images": [png], "scale": 2, "upscaler": "esrgan-9000",
        "seeds": [1]}), 422, ErrorKind.MODEL_NOT_AVAILABLE)
    expect("unreadable upload", http.post("/v1/uploads", content=b"\x89PNG not really"), 422,
           ErrorKind.INVALID)
    expect("malformed job id", http.get("/v1/jobs/XYZ"), 422, ErrorKind.INVALID)
    expect("no such job", http.get("/v1/jobs/0123456789abcdef"), 404, ErrorKind.NOT_FOUND)
    expect("no such path", http.get("/v1/nowhere"), 404, ErrorKind.NOT_FOUND)
    r = http.put("/v1/info")
    assert r.status_code == 405 and _kind(r) is ErrorKind.INVALID and "allow" in r.headers
    long = http.post("/v1/jobs", json={**JOB, "width": 512, "height": 512, "steps": 1000})
    expect("images of a running job", http.get(f"/v1/jobs/{long.json()['id']}/images/0"), 409,
           ErrorKind.NOT_READY)
    full = [http.post("/v1/jobs", json=JOB) for _ in range(3)]
    expect("queue full", full[-1], 429, ErrorKind.QUEUE_FULL)
    assert full[-1].json()["retry_after_s"] > 0 and int(full[-1].headers["retry-after"]) >= 1
    # what no client library sends: the connection-level answers are ErrorDetails too
    for data, status in ((b"GARBAGE\r\n\r\n", 400),
                         (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                          + handle.token.encode() + b"\r\nContent-Length: abc\r\n\r\n", 400)):
        head, _, body = _raw(handle.port, data).partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status}".encode()), head
        assert ErrorDetail.model_validate_json(body).kind is ErrorKind.INVALID
    for what, (status, kind) in seen.items():
        assert STATUS_OF_KIND[kind] == status, what  # the one table


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    return buf.getvalue()


class FailingEngine(SimulatedEngine):
    """The simulator, failing on purpose by prompt: the exception's type is what matters."""

    frees = 0

    def run(self, req, init_images=None, on_step=None, should_stop=None, *, scope="owner"):
        if req.prompt == "oom":  # what torch raises when CUDA (or another device) is full
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if req.prompt == "says oom":  # the same words, not the type: a crash
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if req.prompt == "crash":
            raise ValueError(f"cannot use {object()} here")
        return super().run(req, init_images, on_step, should_stop)

    def free(self) -> None:
        type(self).frees += 1


def test_a_failed_job_reports_its_kind_by_exception_type():
    handle = start_worker(name="failing", engine=FailingEngine(speed=1.0))
    try:
        with httpx.Client(base_url=handle.local_url, headers=_auth(handle.token),
                          timeout=30) as http:
            def run(prompt: str, steps: int = 2) -> JobStatus:
                r = http.post("/v1/jobs", json={**JOB, "prompt": prompt, "steps": steps})
                assert r.status_code == 202, r.text
                return _wait_final(http, r.json()["id"])

            oom = run("oom")
            assert (oom.state, oom.error_kind) == ("failed", ErrorKind.OUT_OF_MEMORY)
            assert "1 images of 64x64" in oom.error
            assert FailingEngine.frees == 1, "device memory is given back after an OOM"
            said = run("says oom")
            assert (said.state, said.error_kind) == ("failed", ErrorKind.CRASH)
            crash = run("crash")
            assert crash.error_kind is ErrorKind.CRASH
            assert crash.error.startswith("ValueError: cannot use <object> here")
            assert "0x" not in crash.error
            ok = run("fine")
            assert (ok.state, ok.error_kind) == ("done", None)
            # interrupted while running, and before it started
            long = http.post("/v1/jobs", json={**JOB, "width": 512, "height": 512,
                                               "steps": 150}).json()
            queued = http.post("/v1/jobs", json=JOB).json()
            wait_until(lambda: http.get(f"/v1/jobs/{long['id']}").json()["step"] > 0,
                       what="the long job to start")
            assert http.post("/v1/interrupt").json()["interrupted"] == 2
            for job in (long, queued):
                final = _wait_final(http, job["id"])
                assert (final.state, final.error_kind) == ("interrupted",
                                                           ErrorKind.INTERRUPTED)
    finally:
        handle.stop()


class SlowLoadingEngine(SimulatedEngine):
    def __init__(self, release: threading.Event, fail: bool) -> None:
        super().__init__(speed=1.0)
        self.release, self.fail = release, fail

    def load(self, name=None):
        self.release.wait(60)
        if self.fail:
            raise OSError(f"weights unreadable: {object()}")
        return super().load(name)


def test_loading_and_failed_model_answers():
    release = threading.Event()
    handle = start_worker(name="loading", engine=SlowLoadingEngine(release, fail=False),
                          limits=Limits(max_queue=1), wait_ready=False)
    try:
        with httpx.Client(base_url=handle.local_url, headers=_auth(handle.token),
                          timeout=30) as http:
            assert http.get("/v1/info").json()["state"] == "loading"
            first = http.post("/v1/jobs", json=JOB)
            assert first.status_code == 202, "a job is queued while the model loads"
            r = http.post("/v1/jobs", json=JOB)
            assert r.status_code == 503 and _kind(r) is ErrorKind.LOADING
            assert "retry-after" in r.headers and r.json()["retry_after_s"] > 0
            release.set()
            assert _wait_final(http, first.json()["id"]).state == "done"
    finally:
        release.set()
        handle.stop()

    broken = threading.Event()
    broken.set()
    handle = start_worker(name="broken", engine=SlowLoadingEngine(broken, fail=True),
                          wait_ready=False)
    try:
        with httpx.Client(base_url=handle.local_url, headers=_auth(handle.token),
                          timeout=30) as http:
            wait_until(lambda: http.get("/v1/info").json()["state"] == "error",
                       what="the load to fail")
            detail = http.get("/v1/info").json()["state_detail"]
            assert detail.startswith("OSError: weights unreadable") and "0x" not in detail
            r = http.post("/v1/jobs", json=JOB)
            assert r.status_code == 503 and _kind(r) is ErrorKind.MODEL_FAILED
    finally:
        handle.stop()


def test_the_openapi_document_names_the_kinds(sim):
    _, http = sim
    spec = http.get("/v1/openapi.json").json()
    schemas = spec["components"]["schemas"]
    kinds = schemas["ErrorKind"]["enum"]
    assert set(kinds) == {k.value for k in ErrorKind}
    detail = schemas["ErrorDetail"]["properties"]
    assert {"detail", "kind", "retry_after_s"} <= set(detail)
    assert "error_kind" in schemas["JobStatus"]["properties"]
    submit = spec["paths"]["/v1/jobs"]["post"]["responses"]
    assert "queue_full" in submit["429"]["description"]
    assert "retry-after" in submit["429"]["headers"]
    assert "loading" in submit["503"]["description"]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            for code in ("401", "413", "429"):
                assert "kind" in op["responses"][code]["description"], (method, path, code)
