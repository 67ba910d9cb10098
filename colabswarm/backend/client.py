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

from ..errors import (
    AuthError,
    BackendUnavailable,
    InvalidRequest,
    JobFailed,
    JobInterrupted,
    WorkerMisbehaved,
)
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

__all__ = ["WorkerClient", "WorkerMisbehaved"]

_MAX_IMAGE_BYTES = 96 * 1024 * 1024
_MAX_RESULT_PIXELS = 2**26  # 8192x8192: no worker result is bigger (upscales included)
_STATE_ORDER = {"queued": 0, "running": 1, "done": 2, "failed": 2, "interrupted": 2}
_POLL_WAIT_S = 20.0  # well under Cloudflare's ~100 s request limit
_PARALLEL_DOWNLOADS = 4  # a job's images at once: over a tunnel each one costs a round trip


async def _all(calls: list[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    """Run all, at most `limit` at a time, results in order; on the first error the rest are
    called off (and awaited, so nothing is left running or unretrieved) and that error is
    raised."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await call()

    tasks = [asyncio.ensure_future(one(c)) for c in calls]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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
        progress_every: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url, self.token = decode_share(url, token)
        self.name = name or self.url
        self.connect_retries = connect_retries
        self.progress_every = progress_every
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
            raise WorkerMisbehaved(
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
        # fields added since the first /v1 workers go out only when used: those workers
        # refuse unknown fields, and still serve every job that does not need them
        body = req.model_dump_json(exclude=set() if req.crops else {"crops"})
        resp = await self._request("POST", "/jobs", content=body,
                                   headers={"content-type": "application/json"})
        return self._model(JobStatus, resp)

    async def status(self, job_id: str, wait: float = 0.0, since: int = -1,
                     progress_every: float = 0.0) -> JobStatus:
        resp = await self._request(
            "GET", f"/jobs/{job_id}",
            params={"wait": wait, "since": since, "progress_every": progress_every},
            timeout=httpx.Timeout(self._timeout + wait, connect=10.0),
        )
        return self._model(JobStatus, resp)

    async def image(self, job_id: str, index: int, size: tuple[int, int],
                    seed: int | None = None) -> Image.Image:
        """Fetch one result and check it is a whole PNG of the expected size (and seed)."""
        if not 0 < size[0] * size[1] <= _MAX_RESULT_PIXELS:
            raise WorkerMisbehaved(f"{self.name} announced an image of {size[0]}x{size[1]}.")
        # a PNG of w x h is at most ~8 bytes a pixel (16-bit RGBA, stored) plus its chunks
        cap = min(_MAX_IMAGE_BYTES, size[0] * size[1] * 8 + (1 << 20))
        try:
            async with self._http.stream("GET", f"/jobs/{job_id}/images/{index}") as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    await self._raise_for(resp)
                announced = resp.headers.get("content-length", "0")
                if not announced.isdigit() or int(announced) > cap:
                    raise WorkerMisbehaved(
                        f"{self.name} announced an image of {announced[:20]} bytes "
                        f"(at most {cap} for {size[0]}x{size[1]})."
                    )
                given_seed = resp.headers.get("x-seed")
                if seed is not None and given_seed is not None and given_seed != str(seed):
                    raise WorkerMisbehaved(
                        f"{self.name} sent the image of seed {given_seed[:30]!r} for seed {seed}."
                    )
                chunks, total = [], 0
                async for chunk in resp.aiter_bytes():
                    total += len(chunk)
                    if total > cap:
                        raise WorkerMisbehaved(
                            f"{self.name} sent an image over {cap} bytes for {size[0]}x{size[1]}."
                        )
                    chunks.append(chunk)
        except httpx.HTTPError as exc:  # refused, reset or cut mid-body: the worker is away
            raise BackendUnavailable(
                f"{self.name}: the image download failed ({type(exc).__name__}). Is the worker "
                "still running and its tunnel open?"
            ) from None
        # checked and decoded on a thread: the controller's loop serves every worker meanwhile
        return await asyncio.to_thread(self._decode, b"".join(chunks), size)

    def _decode(self, data: bytes, size: tuple[int, int]) -> Image.Image:
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "PNG":
                    raise ValueError(f"format {img.format}")
                if img.size != size:
                    raise ValueError(f"size {img.size}, expected {size}")
                img.verify()  # chunk CRCs: catches truncated or corrupted bodies cheaply
            image = Image.open(io.BytesIO(data))
            if image.mode not in ("RGB", "RGBA", "L"):
                raise ValueError(f"mode {image.mode}")
            # decode now: valid CRCs around a broken zlib stream pass verify() and would
            # otherwise fail later, in a gallery or a save, after the image was accepted
            image.load()
            return image
        except Exception as exc:
            raise WorkerMisbehaved(f"{self.name} sent a bad image: {exc}.") from None

    def _check_status(self, job_id: str, req: JobRequest, last: JobStatus | None,
                      new: JobStatus) -> None:
        """A worker's story about a job must hang together: same job, same seeds, and time
        running forwards (version, state, step). Anything else is a worker not to trust."""
        problem = None
        if new.id != job_id:
            problem = f"the status of job {new.id[:40]!r} for job {job_id!r}"
        elif new.seeds and new.seeds != list(req.seeds):
            problem = f"seeds {new.seeds[:8]} for seeds {list(req.seeds)[:8]}"
        elif last is not None:
            if new.version < last.version:
                problem = f"version {new.version} after {last.version}"
            elif _STATE_ORDER[new.state] < _STATE_ORDER[last.state]:
                problem = f"state {new.state!r} after {last.state!r}"
            elif new.state == last.state == "running" and new.step < last.step:
                problem = f"step {new.step} after step {last.step}"
        if problem:
            raise WorkerMisbehaved(f"{self.name} sent an inconsistent job status: {problem}.")

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
            # the whole job, downloads included, is bounded: a worker that trickles bytes or
            # holds a long-poll open forever cannot hold the controller's slot forever
            async with asyncio.timeout(timeout):
                return await self._follow(req, status, init_pngs, expected, on_progress)
        except TimeoutError:
            if timeout is None:
                raise
            raise BackendUnavailable(f"{self.name} took longer than {timeout:.0f}s.") from None
        finally:
            try:
                await self.delete(job_id)
            except Exception:  # best effort: the worker's time-to-live collects it anyway
                pass

    async def _follow(self, req: JobRequest, status: JobStatus, init_pngs: list[bytes] | None,
                      expected: tuple[int, int], on_progress: ProgressFn | None,
                      ) -> list[Image.Image]:
        job_id = status.id
        self._check_status(job_id, req, None, status)
        while status.state in ("queued", "running"):
            if on_progress:
                maybe = on_progress(status)
                if asyncio.iscoroutine(maybe):
                    await maybe
            last = status
            status = await self.status(job_id, wait=_POLL_WAIT_S, since=status.version,
                                       progress_every=self.progress_every)
            self._check_status(job_id, req, last, status)
            if status.version == last.version and status.state == last.state:
                # nothing new: a worker answers so only when its long-poll ran out; one that
                # does it at once must not make this loop spin
                await asyncio.sleep(0.5)
        if status.state == "interrupted":
            raise JobInterrupted(f"{self.name}: {status.error}")
        if status.state == "failed":
            raise JobFailed(f"{self.name}: {status.error}")
        if status.images_ready != len(req.seeds):
            raise WorkerMisbehaved(
                f"{self.name} said it made {status.images_ready} images for "
                f"{len(req.seeds)} seeds."
            )
        if req.kind == "upscale" and not init_pngs:
            expected = (status.width, status.height)
        images = await _all([lambda i=i, seed=seed: self.image(job_id, i, expected, seed)
                             for i, seed in enumerate(req.seeds)], _PARALLEL_DOWNLOADS)
        if on_progress:
            maybe = on_progress(status)
            if asyncio.iscoroutine(maybe):
                await maybe
        return images
