"""The async client a controller uses to reach one worker.

Nothing from a worker is trusted. Every answer is read as it streams in, up to a cap per route
(a worker cannot make the controller hold a 400 MiB /v1/info); statuses and infos are
schema-checked (finite numbers, bounded lists); a job's story must hang together; upload
results must match what was sent; image bodies are size-capped and must be PNGs of the requested
size, one per seed; long-polls are paced so a worker that answers at once cannot make the client
spin. Errors become typed exceptions with a kind through one table (`error_for`), from the kind
the worker sent or, for older workers and proxies, from the HTTP status; no decision here or
above reads an error's text.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from PIL import Image
from pydantic import ValidationError

from ..errors import (
    AuthError,
    BackendUnavailable,
    Busy,
    ColabSwarmError,
    ErrorKind,
    Forbidden,
    InvalidRequest,
    JobFailed,
    JobInterrupted,
    ModelNotAvailable,
    WorkerMisbehaved,
)
from ..protocol import (
    API_PREFIX,
    KIND_OF_STATUS,
    SKIP_NGROK_WARNING,
    ErrorDetail,
    Freed,
    GuestGrant,
    GuestLimits,
    Info,
    JobRequest,
    JobStatus,
    LogLine,
    NewGuest,
    TokenUsage,
    UploadResult,
    WorkerLogs,
    clean_text,
    decode_share,
    mask_token,
)
from .png import check_png

__all__ = ["JobResult", "WorkerClient", "WorkerMisbehaved", "error_for"]

_MAX_IMAGE_BYTES = 96 * 1024 * 1024
_MAX_RESULT_PIXELS = 2**26  # 8192x8192: no worker result is bigger (upscales included)
_STATE_ORDER = {"queued": 0, "running": 1, "done": 2, "failed": 2, "interrupted": 2}
_POLL_WAIT_S = 20.0  # well under Cloudflare's ~100 s request limit
_PARALLEL_DOWNLOADS = 4  # a job's images at once: over a tunnel each one costs a round trip
# The most a worker may send per answer, read as it streams in: an honest /v1/info is a few
# KiB, a status or an upload id a few hundred bytes. More is a worker to stop listening to.
_INFO_CAP = 1 << 20
_BODY_CAP = 256 << 10
_ERROR_CAP = 64 << 10
_TUNNEL_STATUSES = frozenset({502, 504, 520, 521, 522, 523, 524, 530})

# The one table from an error kind to the exception the client raises (a kind the worker did
# not send comes from its HTTP status, protocol.KIND_OF_STATUS).
_EXCEPTION_OF_KIND: dict[ErrorKind, type[ColabSwarmError]] = {
    ErrorKind.UNAUTHORIZED: AuthError,
    ErrorKind.FORBIDDEN: Forbidden,
    ErrorKind.INVALID: InvalidRequest,
    ErrorKind.TOO_LARGE: InvalidRequest,
    ErrorKind.MODEL_NOT_AVAILABLE: ModelNotAvailable,
    ErrorKind.NOT_FOUND: JobFailed,
    ErrorKind.NOT_READY: JobFailed,
    ErrorKind.QUEUE_FULL: Busy,
    ErrorKind.RATE_LIMITED: Busy,
    ErrorKind.LOADING: Busy,
    ErrorKind.MODEL_FAILED: BackendUnavailable,
    ErrorKind.CRASH: BackendUnavailable,
    ErrorKind.UNREACHABLE: BackendUnavailable,
    ErrorKind.OUT_OF_MEMORY: JobFailed,
    ErrorKind.INTERRUPTED: JobInterrupted,
}


def error_for(kind: ErrorKind, message: str, retry_after_s: float | None = None
              ) -> ColabSwarmError:
    """The exception for an error kind (one table), with its message and retry time."""
    cls = _EXCEPTION_OF_KIND.get(kind, BackendUnavailable)
    if issubclass(cls, Busy):
        return cls(message, kind=kind, retry_after_s=retry_after_s)
    return cls(message, kind=kind)


@dataclass
class JobResult:
    """A finished job: its images in seed order and the worker's last word on it."""

    images: list[Any]  # PIL images, or checked PNG bytes (decode=False)
    status: JobStatus


ProgressFn = Callable[[JobStatus], Awaitable[None] | None]


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


def _new_guest(name: str, limits: GuestLimits) -> NewGuest:
    try:
        return NewGuest(name=name, limits=limits)
    except ValidationError:
        raise InvalidRequest(
            f"A guest's name must be 1-32 letters, digits, '.', '-' or '_', starting with a "
            f"letter or digit (got {clean_text(name, 40)!r}).") from None


def _json_list(body: bytes, most: int) -> list[Any]:
    value = json.loads(body)
    if not isinstance(value, list) or len(value) > most:
        raise ValueError("not a bounded list")
    return value


def _png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR, without decoding it."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


@dataclass
class _Answer:
    status_code: int
    headers: CIMultiDictProxy[str]
    body: bytes


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
        progress_every: float = 1.0,
    ) -> None:
        self.url, self.token = decode_share(url, token)
        self.name = clean_text(name or self.url, 120)
        self.connect_retries = connect_retries
        self.progress_every = progress_every
        self._timeout = timeout
        self._base = self.url + API_PREFIX
        # identity: the caps count what arrives; a compressed answer could expand 1000-fold
        # a random id, so the worker's owner can tell connected controllers apart
        self.client_id = secrets.token_hex(6)
        self._headers = {"Authorization": f"Bearer {self.token}", "Accept-Encoding": "identity",
                         "x-colabswarm-client": self.client_id, **SKIP_NGROK_WARNING}
        self._session: aiohttp.ClientSession | None = None
        # what the worker said it can do, from its last /v1/info (empty until asked)
        self.capabilities: frozenset[str] = frozenset()

    def _http(self) -> aiohttp.ClientSession:
        """The connection pool, made on first use inside the caller's event loop. aiohttp, not
        httpx: a controller of fast workers makes thousands of requests a minute, and aiohttp's
        C parser costs a quarter of httpx's CPU per request (docs/BENCHMARKS.md)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=60),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0,
                                              sock_read=self._timeout),
                trust_env=False,  # proxies from the environment never see the token
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def __repr__(self) -> str:
        return f"WorkerClient({self.url!r}, token={mask_token(self.token)})"

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> WorkerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ----- plumbing --------------------------------------------------------------------------
    async def _request(self, method: str, path: str, *, cap: int = _BODY_CAP,
                       read_timeout: float | None = None, **kw: Any) -> _Answer:
        """One request; the answer's body is read up to `cap` bytes (more: the worker is
        misbehaving) and error answers become typed exceptions."""
        attempt = 0
        if read_timeout is not None:
            kw["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=10.0,
                                                  sock_read=read_timeout)
        while True:
            try:
                async with self._http().request(method, self._base + path,
                                                 allow_redirects=False, **kw) as resp:
                    limit = cap if resp.status < 400 else _ERROR_CAP
                    announced = resp.headers.get("content-length")
                    plain = resp.headers.get("content-encoding", "identity") == "identity"
                    if plain and announced is not None and (not announced.isdigit()
                                                            or int(announced) > limit):
                        raise WorkerMisbehaved(
                            f"{self.name} announced an answer of {clean_text(announced, 20)} "
                            f"bytes to {method} {path} (at most {limit}).")
                    chunks, total = [], 0
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        total += len(chunk)
                        if total > limit:
                            raise WorkerMisbehaved(
                                f"{self.name} sent over {limit} bytes for {method} {path}.")
                        chunks.append(chunk)
                    answer = _Answer(resp.status, resp.headers, b"".join(chunks))
                break
            except aiohttp.ClientConnectorError as exc:
                if attempt >= self.connect_retries:
                    raise BackendUnavailable(
                        f"Cannot connect to {self.name} ({type(exc).__name__}). Is the worker "
                        "still running (its notebook, terminal or process) and, if it has one, "
                        "its tunnel open?"
                    ) from None
                attempt += 1
                await asyncio.sleep(0.2 * 2**attempt)
            except (TimeoutError, aiohttp.ServerTimeoutError):
                raise BackendUnavailable(f"{self.name} did not answer in time.") from None
            except (aiohttp.ClientError, ValueError) as exc:
                raise BackendUnavailable(
                    f"Connection to {self.name} failed ({type(exc).__name__})."
                ) from None
        if answer.status_code >= 400:
            raise self._error(answer)
        return answer

    def _error(self, answer: _Answer) -> ColabSwarmError:
        """An error answer as its typed exception: the worker's kind if it sent one, else the
        kind of the HTTP status; proxies' and tunnels' error pages are 'unreachable'."""
        body: ErrorDetail | None = None
        try:
            body = ErrorDetail.model_validate_json(answer.body)
        except (ValidationError, ValueError):
            body = None
        code = answer.status_code
        kind = body.kind if body is not None and body.kind is not None else \
            KIND_OF_STATUS.get(code, ErrorKind.UNREACHABLE)
        detail = clean_text(body.detail if body is not None else
                            answer.body[:300].decode("utf-8", "replace"), 300)
        retry = body.retry_after_s if body is not None else None
        if retry is None:
            value = answer.headers.get("retry-after", "")
            retry = float(value) if value.isdigit() and len(value) < 7 else None
        if kind is ErrorKind.UNAUTHORIZED:
            return AuthError(
                f"{self.name} refused the token. Copy the worker's current share string again "
                "(a restarted worker has a new token unless its owner fixed one).")
        if kind is ErrorKind.UNREACHABLE:
            hint = " (the tunnel timed out or lost the worker)" if code in _TUNNEL_STATUSES \
                else ""
            return BackendUnavailable(f"{self.name} answered HTTP {code}{hint}: {detail}")
        return error_for(kind, f"{self.name} (HTTP {code}): {detail}", retry)

    def _model(self, cls: Any, answer: _Answer) -> Any:
        try:
            return cls.model_validate_json(answer.body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise WorkerMisbehaved(
                f"{self.name} sent a malformed {cls.__name__} ({clean_text(where, 60)}: "
                f"{clean_text(first.get('msg'), 120)}). Is this address really a colabswarm "
                "worker of the same version?"
            ) from None

    # ----- the API ---------------------------------------------------------------------------
    async def info(self) -> Info:
        info = self._model(Info, await self._request("GET", "/info", cap=_INFO_CAP))
        self.capabilities = frozenset(info.capabilities)
        return info

    async def upload(self, png: bytes) -> UploadResult:
        answer = await self._request(
            "POST", "/uploads", data=png, headers={"content-type": "image/png"}
        )
        result = self._model(UploadResult, answer)
        sent = _png_size(png)
        if sent is not None and (result.width, result.height) != sent:
            raise WorkerMisbehaved(
                f"{self.name} said the uploaded image is {result.width}x{result.height}; "
                f"it is {sent[0]}x{sent[1]}.")
        return result

    async def submit(self, req: JobRequest) -> JobStatus:
        # fields added since the first /v1 workers go out only when used: those workers
        # refuse unknown fields, and still serve every job that does not need them
        body = req.wire_json()
        answer = await self._request("POST", "/jobs", data=body.encode(),
                                     headers={"content-type": "application/json"})
        return self._model(JobStatus, answer)

    async def status(self, job_id: str, wait: float = 0.0, since: int = -1,
                     progress_every: float = 0.0) -> JobStatus:
        answer = await self._request(
            "GET", f"/jobs/{job_id}",
            params={"wait": str(wait), "since": str(since),
                    "progress_every": str(progress_every)},
            read_timeout=self._timeout + wait,
        )
        return self._model(JobStatus, answer)

    async def image(self, job_id: str, index: int, size: tuple[int, int],
                    seed: int | None = None, decode: bool = True) -> Image.Image | bytes:
        """Fetch one result and check it is a whole PNG of the expected size (and seed):
        decoded, or (decode=False) its checked bytes (chunks, CRCs, size; pixels later)."""
        if not 0 < size[0] * size[1] <= _MAX_RESULT_PIXELS:
            raise WorkerMisbehaved(f"{self.name} announced an image of {size[0]}x{size[1]}.")
        # a PNG of w x h is at most ~8 bytes a pixel (16-bit RGBA, stored) plus its chunks
        cap = min(_MAX_IMAGE_BYTES, size[0] * size[1] * 8 + (1 << 20))
        try:
            answer = await self._request("GET", f"/jobs/{job_id}/images/{index}", cap=cap)
        except (WorkerMisbehaved, AuthError):
            raise
        except ColabSwarmError as exc:  # it said the image was ready: now it is away
            raise BackendUnavailable(
                f"The image download failed ({exc}). Is the worker still running and, if it "
                "has one, its tunnel open?"
            ) from None
        given_seed = answer.headers.get("x-seed")
        if seed is not None and given_seed is not None and given_seed != str(seed):
            raise WorkerMisbehaved(
                f"{self.name} sent the image of seed {clean_text(given_seed, 30)!r} for seed "
                f"{seed}.")
        if not decode:
            return self._checked(answer.body, size)
        # checked and decoded on a thread: the controller's loop serves every worker meanwhile
        return await asyncio.to_thread(self._decode, answer.body, size)

    async def images(self, job_id: str, size: tuple[int, int], seeds: list[int],
                     decode: bool = True) -> list[Image.Image] | list[bytes]:
        """Every image of a job in one answer (a worker with the 'bundle' capability), each
        checked as `image` checks one."""
        if not 0 < size[0] * size[1] <= _MAX_RESULT_PIXELS:
            raise WorkerMisbehaved(f"{self.name} announced an image of {size[0]}x{size[1]}.")
        one = min(_MAX_IMAGE_BYTES, size[0] * size[1] * 8 + (1 << 20))
        cap = min(len(seeds) * (one + 4), 4 * _MAX_IMAGE_BYTES)
        try:
            answer = await self._request("GET", f"/jobs/{job_id}/images", cap=cap)
        except (WorkerMisbehaved, AuthError):
            raise
        except ColabSwarmError as exc:  # it said the images were ready: now it is away
            raise BackendUnavailable(
                f"The image download failed ({exc}). Is the worker still running and, if it "
                "has one, its tunnel open?"
            ) from None
        given = answer.headers.get("x-seeds")
        if given is not None and given != ",".join(str(s) for s in seeds):
            raise WorkerMisbehaved(
                f"{self.name} sent the images of seeds {clean_text(given, 60)!r} for seeds "
                f"{seeds[:8]}.")
        if not decode:
            return self._decode_bundle(answer.body, size, len(seeds), one, decode)
        return await asyncio.to_thread(self._decode_bundle, answer.body, size, len(seeds), one)

    def _decode_bundle(self, data: bytes, size: tuple[int, int], count: int,
                       cap: int, decode: bool = True) -> list[Any]:
        out, pos = [], 0
        while pos < len(data):
            if len(data) - pos < 4:
                raise WorkerMisbehaved(f"{self.name} sent a cut bundle of images.")
            n = int.from_bytes(data[pos:pos + 4], "big")
            if n > cap or pos + 4 + n > len(data):
                raise WorkerMisbehaved(f"{self.name} sent a bundle with an image of {n} bytes "
                                       f"(at most {cap}, {len(data) - pos - 4} left).")
            png = data[pos + 4:pos + 4 + n]
            out.append(self._decode(png, size) if decode else self._checked(png, size))
            pos += 4 + n
            if len(out) > count:
                break
        if len(out) != count:
            raise WorkerMisbehaved(f"{self.name} sent {len(out)} images for {count} seeds.")
        return out

    def _checked(self, data: bytes, size: tuple[int, int]) -> bytes:
        """The PNG's structure checked without decoding its pixels (a fraction of the CPU)."""
        why = check_png(data, size)
        if why is not None:
            raise WorkerMisbehaved(f"{self.name} sent a bad image: {why}.")
        return data

    def _decode(self, data: bytes, size: tuple[int, int]) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data))
            if image.format != "PNG":
                raise ValueError(f"format {image.format}")
            if image.size != size:
                raise ValueError(f"size {image.size}, expected {size}")
            if image.mode not in ("RGB", "RGBA", "L"):
                raise ValueError(f"mode {image.mode}")
            # decoded now, whole: a cut body or a broken zlib stream (even inside valid chunk
            # CRCs) fails here, not later in a gallery or a save after it was accepted
            image.load()
            return image
        except Exception as exc:
            raise WorkerMisbehaved(
                f"{self.name} sent a bad image ({type(exc).__name__}: "
                f"{clean_text(exc, 120)}).") from None

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

    async def delete(self, job_id: str) -> None:
        await self._request("DELETE", f"/jobs/{job_id}")

    async def interrupt(self, job_id: str | None = None) -> None:
        await self._request("POST", f"/jobs/{job_id}/interrupt" if job_id else "/interrupt")

    async def free(self) -> bool:
        """Ask the worker to free GPU memory: True if it did, False if it will right after the
        job in flight."""
        return bool(self._model(Freed, await self._request("POST", "/free")).freed)

    # ----- the owner's routes (a guest token gets Forbidden) -----------------------------------
    async def _owners(self, method: str, path: str, **kw: Any) -> _Answer:
        """A request to a route workers have had since roles came: an older worker's 404 says
        so in words a person can act on."""
        try:
            return await self._request(method, path, **kw)
        except JobFailed as exc:
            if exc.kind is not ErrorKind.NOT_FOUND or path.startswith("/guests/"):
                raise
            raise BackendUnavailable(
                f"{self.name} has no {path} route: it runs a colabswarm from before guest "
                "tokens and remote management; update colabswarm on that worker.",
                kind=ErrorKind.NOT_FOUND) from None

    async def interrupt_all(self) -> int:
        """Interrupt every job on the worker (owner only); returns how many it stopped."""
        answer = await self._owners("POST", "/interrupt")
        try:
            count = json.loads(answer.body)["interrupted"]
            if not isinstance(count, int) or not 0 <= count <= 1_000_000:
                raise ValueError(count)
        except (ValueError, KeyError, TypeError):
            raise WorkerMisbehaved(f"{self.name} sent a malformed answer to an interrupt.") \
                from None
        return count

    async def logs(self, lines: int = 200) -> list[LogLine]:
        """The worker's recent log lines, oldest first (at most 500, each cleaned)."""
        lines = max(1, min(int(lines), 500))
        answer = await self._owners("GET", "/logs", params={"lines": str(lines)},
                                    cap=_INFO_CAP)
        return self._model(WorkerLogs, answer).lines[-lines:]

    async def guests(self) -> list[TokenUsage]:
        answer = await self._owners("GET", "/guests", cap=_INFO_CAP)
        try:
            rows = [TokenUsage.model_validate(r) for r in _json_list(answer.body, 256)]
        except (ValidationError, ValueError):
            raise WorkerMisbehaved(f"{self.name} sent a malformed list of guests.") from None
        return rows

    async def add_guest(self, name: str, limits: GuestLimits) -> GuestGrant:
        body = _new_guest(name, limits).model_dump_json()
        answer = await self._owners("POST", "/guests", data=body.encode(),
                                    headers={"content-type": "application/json"})
        return self._model(GuestGrant, answer)

    async def revoke_guest(self, name: str) -> None:
        await self._request("DELETE", f"/guests/{_new_guest(name, GuestLimits()).name}")

    async def run(
        self,
        req: JobRequest,
        init_pngs: list[bytes] | None = None,
        on_progress: ProgressFn | None = None,
        timeout: float | None = None,
    ) -> list[Image.Image]:
        """Submit, follow by long-poll, fetch every image, then acknowledge (delete) the job."""
        return (await self.run_job(req, init_pngs, on_progress, timeout)).images

    async def run_job(
        self,
        req: JobRequest,
        init_pngs: list[bytes] | None = None,
        on_progress: ProgressFn | None = None,
        timeout: float | None = None,
        decode: bool = True,
    ) -> JobResult:
        """`run`, also returning the worker's final status (its run and queue times). With
        decode=False the images are their checked PNG bytes (structure, CRCs, size, seed)."""
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
                return await self._follow(req, status, init_pngs, expected, on_progress,
                                          decode)
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
                      decode: bool = True) -> JobResult:
        job_id = status.id
        self._check_status(job_id, req, None, status)
        while status.state in ("queued", "running"):
            if on_progress:
                maybe = on_progress(status)
                if asyncio.iscoroutine(maybe):
                    await maybe
            last = status
            asked = time.monotonic()
            status = await self.status(job_id, wait=_POLL_WAIT_S, since=status.version,
                                       progress_every=self.progress_every)
            self._check_status(job_id, req, last, status)
            if status.state == last.state:
                # an honest worker answers with progress at most every progress_every (or
                # when its long-poll ran out); one that answers at once must not make this
                # loop spin: pace it. State changes (at most three) go through at once.
                pause = self.progress_every - (time.monotonic() - asked)
                if status.version == last.version:
                    pause = max(pause, 0.5)
                if pause > 0:
                    await asyncio.sleep(pause)
        if status.state == "interrupted":
            raise JobInterrupted(f"{self.name}: {clean_text(status.error, 300)}")
        if status.state == "failed":
            kind = status.error_kind or ErrorKind.CRASH
            if kind not in (ErrorKind.OUT_OF_MEMORY, ErrorKind.INTERRUPTED, ErrorKind.CRASH,
                            ErrorKind.INVALID, ErrorKind.MODEL_NOT_AVAILABLE):
                kind = ErrorKind.CRASH  # a job's own failure is one of these, whatever it says
            exc = error_for(kind, f"{self.name}: {clean_text(status.error, 300)}")
            if kind is ErrorKind.CRASH:
                exc = JobFailed(str(exc), kind=kind)
            raise exc
        if status.images_ready != len(req.seeds):
            raise WorkerMisbehaved(
                f"{self.name} said it made {status.images_ready} images for "
                f"{len(req.seeds)} seeds."
            )
        if req.kind == "upscale" and not init_pngs:
            expected = (status.width, status.height)
        if "bundle" in self.capabilities:  # one request for all of them
            images = await self.images(job_id, expected, list(req.seeds), decode)
        else:
            images = await _all([lambda i=i, seed=seed: self.image(job_id, i, expected, seed,
                                                                   decode)
                                 for i, seed in enumerate(req.seeds)], _PARALLEL_DOWNLOADS)
        if on_progress:
            maybe = on_progress(status)
            if asyncio.iscoroutine(maybe):
                await maybe
        return JobResult(images, status)
