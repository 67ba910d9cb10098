"""The async client a controller uses to reach one worker.

Nothing from a worker is trusted: statuses are schema-checked, image bodies are size-capped,
must be PNGs of the requested size, and a job must come back with one image per seed.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from PIL import Image
from pydantic import ValidationError

from ..errors import AuthError, BackendUnavailable, InvalidRequest, JobFailed, JobInterrupted
from ..protocol import (
    API_PREFIX,
    SKIP_NGROK_WARNING,
    Info,
    JobRequest,
    JobStatus,
    UploadResult,
    decode_share,
    mask_token,
)

__all__ = ["WorkerClient"]

_MAX_IMAGE_BYTES = 96 * 1024 * 1024
_POLL_WAIT_S = 20.0  # well under Cloudflare's ~100 s request limit
ProgressFn = Callable[[JobStatus], Awaitable[None] | None]


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        detail = body.get("detail") if isinstance(body, dict) else None
        return str(detail) if detail else resp.text[:300]
    except ValueError:
        return resp.text[:300] or resp.reason_phrase


class WorkerClient:
    """One worker, reached over HTTP(S) with its bearer token."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        name: str | None = None,
        timeout: float = 30.0,
        connect_retries: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url, self.token = decode_share(url, token)
        self.name = name or self.url
        self.connect_retries = connect_retries
        self._timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.url + API_PREFIX,
            headers={"Authorization": f"Bearer {self.token}", **SKIP_NGROK_WARNING},
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
            follow_redirects=False,
            trust_env=False,
        )

    def __repr__(self) -> str:
        return f"WorkerClient({self.url!r}, token={mask_token(self.token)})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> WorkerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ----- plumbing --------------------------------------------------------------------------
    async def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = await self._http.request(method, path, **kw)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt >= self.connect_retries:
                    raise BackendUnavailable(
                        f"Cannot connect to {self.name} ({type(exc).__name__}). Is the worker "
                        "notebook still running and its tunnel open?"
                    ) from None
                attempt += 1
                await asyncio.sleep(0.2 * 2**attempt)
            except httpx.TimeoutException:
                raise BackendUnavailable(f"{self.name} did not answer in time.") from None
            except httpx.HTTPError as exc:
                raise BackendUnavailable(
                    f"Connection to {self.name} failed: {type(exc).__name__}: {exc}"
                ) from None
        if resp.status_code == 401:
            raise AuthError(
                f"{self.name} refused the token. Copy the worker's current share string again "
                "(a restarted worker has a new token unless its owner fixed one)."
            )
        if resp.status_code in (400, 409, 413, 422):
            raise InvalidRequest(f"{self.name}: {_detail(resp)}")
        if resp.status_code == 404:
            raise JobFailed(f"{self.name}: {_detail(resp)}")
        if resp.status_code >= 400:
            hint = " (the tunnel timed out)" if resp.status_code in (502, 504, 524, 530) else ""
            raise BackendUnavailable(
                f"{self.name} answered HTTP {resp.status_code}{hint}: {_detail(resp)[:200]}"
            )
        return resp

    def _model(self, cls: Any, resp: httpx.Response) -> Any:
        try:
            return cls.model_validate_json(resp.content)
        except ValidationError as exc:
            raise BackendUnavailable(
                f"{self.name} sent a malformed {cls.__name__}: {exc.errors()[0].get('msg')}. "
                "Is this address really a colabswarm worker of the same version?"
            ) from None

    # ----- the API ---------------------------------------------------------------------------
    async def info(self) -> Info:
        return self._model(Info, await self._request("GET", "/info"))

    async def upload(self, png: bytes) -> UploadResult:
        resp = await self._request(
            "POST", "/uploads", content=png, headers={"content-type": "image/png"}
        )
        return self._model(UploadResult, resp)

    async def submit(self, req: JobRequest) -> JobStatus:
        resp = await self._request("POST", "/jobs", content=req.model_dump_json(),
                                   headers={"content-type": "application/json"})
        return self._model(JobStatus, resp)

    async def status(self, job_id: str, wait: float = 0.0, since: int = -1) -> JobStatus:
        resp = await self._request(
            "GET", f"/jobs/{job_id}", params={"wait": wait, "since": since},
            timeout=httpx.Timeout(self._timeout + wait, connect=10.0),
        )
        return self._model(JobStatus, resp)

    async def image(self, job_id: str, index: int, size: tuple[int, int]) -> Image.Image:
        """Fetch one result and check it is a PNG of the expected size."""
        async with self._http.stream("GET", f"/jobs/{job_id}/images/{index}") as resp:
            if resp.status_code != 200:
                await resp.aread()
                await self._raise_for(resp)
            chunks, total = [], 0
            async for chunk in resp.aiter_bytes():
                total += len(chunk)
                if total > _MAX_IMAGE_BYTES:
                    raise BackendUnavailable(
                        f"{self.name} sent an image over {_MAX_IMAGE_BYTES} bytes."
                    )
                chunks.append(chunk)
        data = b"".join(chunks)
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "PNG":
                    raise ValueError(f"format {img.format}")
                if img.size != size:
                    raise ValueError(f"size {img.size}, expected {size}")
                return img.convert("RGB")
        except Exception as exc:
            raise BackendUnavailable(f"{self.name} sent a bad image: {exc}.") from None

    async def _raise_for(self, resp: httpx.Response) -> None:
        if resp.status_code == 401:
            raise AuthError(f"{self.name} refused the token.")
        raise BackendUnavailable(f"{self.name}: HTTP {resp.status_code}: {_detail(resp)[:200]}")

    async def delete(self, job_id: str) -> None:
        await self._request("DELETE", f"/jobs/{job_id}")

    async def interrupt(self, job_id: str | None = None) -> None:
        await self._request("POST", f"/jobs/{job_id}/interrupt" if job_id else "/interrupt")

    async def free(self) -> None:
        await self._request("POST", "/free")

    async def run(
        self,
        req: JobRequest,
        init_pngs: list[bytes] | None = None,
        on_progress: ProgressFn | None = None,
        timeout: float | None = None,
    ) -> list[Image.Image]:
        """Submit, follow by long-poll, fetch every image, then acknowledge (delete) the job."""
        expected = (req.width, req.height)
        if init_pngs:
            ups = [await self.upload(png) for png in init_pngs]
            req = req.model_copy(update={"init_images": [u.id for u in ups]})
            if req.kind == "upscale":
                expected = (ups[0].width * req.scale, ups[0].height * req.scale)
        status = await self.submit(req)
        job_id = status.id
        try:
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            while status.state in ("queued", "running"):
                if deadline is not None and loop.time() > deadline:
                    raise BackendUnavailable(f"{self.name} took longer than {timeout:.0f}s.")
                if on_progress:
                    maybe = on_progress(status)
                    if asyncio.iscoroutine(maybe):
                        await maybe
                status = await self.status(job_id, wait=_POLL_WAIT_S, since=status.version)
            if status.state == "interrupted":
                raise JobInterrupted(f"{self.name}: {status.error}")
            if status.state == "failed":
                raise JobFailed(f"{self.name}: {status.error}")
            if status.images_ready != len(req.seeds):
                raise BackendUnavailable(
                    f"{self.name} said it made {status.images_ready} images for "
                    f"{len(req.seeds)} seeds."
                )
            if req.kind == "upscale" and not init_pngs:
                expected = (status.width, status.height)
            images = [await self.image(job_id, i, expected) for i in range(len(req.seeds))]
            if on_progress:
                maybe = on_progress(status)
                if asyncio.iscoroutine(maybe):
                    await maybe
            return images
        finally:
            try:
                await self.delete(job_id)
            except Exception:  # best effort: the worker's time-to-live collects it anyway
                pass
