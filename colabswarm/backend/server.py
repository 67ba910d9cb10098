"""The worker's HTTP API under /v1: bearer-token auth, limits, async jobs, binary PNG results.

Every route but ``/healthz`` needs ``Authorization: Bearer <token>``, checked in constant time
by an ASGI gate that runs before any body is parsed, so a stranger learns nothing but 401.
The token says who is asking (``guests.TokenBook``): the owner may do everything; a guest may
run jobs within its limits and see or stop only its own, and gets 403 (kind ``forbidden``) for
the owner's routes (interrupt all, free memory, logs, guests) and for other tokens' jobs.
Every error answer is an ``ErrorDetail``: a sentence for people and a ``kind`` for code, with
the HTTP status that ``protocol.STATUS_OF_KIND`` gives that kind (and ``Retry-After`` for the
transient ones). Connection-level limits (header, idle and stall timeouts, the connection cap)
are in ``connections.py``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Path, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..crops import fits_edge_rule
from ..errors import Busy, ColabSwarmError, ErrorKind, Forbidden, InvalidRequest, ModelNotAvailable
from ..protocol import (
    API_PREFIX,
    BUNDLE_TYPE,
    GUEST_NAME_PATTERN,
    KIND_OF_STATUS,
    STATUS_OF_KIND,
    ErrorDetail,
    Freed,
    GuestGrant,
    GuestLimits,
    Info,
    JobRequest,
    JobStatus,
    Limits,
    LoraInfo,
    NewGuest,
    TokenUsage,
    UploadResult,
    WorkerLogs,
    clean_name,
    mask_token,
)
from ..samplers import DEFAULT_SAMPLER, canonical_sampler
from .guests import (
    OWNER,
    OWNER_WHO,
    TokenBook,
    Usage,
    Who,
    effective_limits,
    guest_refusal,
)
from .imagescan import scan_image
from .jobs import Job, JobManager, public_error
from .worklog import WorkerLog

__all__ = ["WorkerApp", "create_app"]

log = logging.getLogger("colabswarm.server")

_ID = Path(pattern=r"^[0-9a-f]{16}$", description="job id")
_ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]{16,256}$")  # as in a share string
# what a stranger's request may name for a download (only with the owner's --allow-downloads):
# a hub id "owner/name", never a path ("../x", "/etc", "C:") or a URL
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
_REASONS = {
    400: "Malformed request: a bad Content-Length header, or a body that is not JSON "
         "(kind invalid)",
    401: "Missing, wrong or revoked bearer token (kind unauthorized)",
    403: "The token is a guest's: this route is the owner's, or the job is another token's "
         "(kind forbidden)",
    404: "No such job (finished and collected, expired, or never existed), or no such path "
         "(kind not_found)",
    409: "The job is not done yet (kind not_ready)",
    413: "Request body over the worker's max_body_bytes (uploads) or max_json_bytes (the rest) "
         "(kind too_large)",
    422: "A parameter is invalid or over one of the worker's limits (kind invalid), or it names "
         "a model or upscaler this worker does not serve (kind model_not_available)",
    429: "The job queue is full, or the worker has as many open connections as it takes (kind "
         "queue_full), or a guest token's hourly images are used up (kind rate_limited): retry "
         "after Retry-After seconds",
    500: "The worker failed on this request (kind crash)",
    503: "The worker's model failed to load (kind model_failed), or it is still loading and its "
         "queue is full (kind loading, with Retry-After)",
}
_RETRY_AFTER = {"retry-after": {"description": "seconds until the same request may succeed",
                                "schema": {"type": "string", "pattern": "^[0-9]+$"}}}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error answers: every one is an ErrorDetail, {"detail": "<what to
    do>", "kind": "<ErrorKind>"}, plus Retry-After where a retry may succeed."""
    out: dict[int | str, dict[str, Any]] = {}
    for c in codes:
        out[c] = {"model": ErrorDetail, "description": _REASONS[c]}
        if c in (429, 503):
            out[c]["headers"] = _RETRY_AFTER
    return out


def _error_body(detail: str, kind: ErrorKind,
                retry_after_s: float | None = None) -> tuple[int, dict, list[tuple[str, str]]]:
    """(status, body, headers) of an error answer: the status from the one table."""
    body = ErrorDetail(detail=detail, kind=kind, retry_after_s=retry_after_s)
    headers = []
    if retry_after_s is not None:
        headers.append(("retry-after", str(max(1, math.ceil(retry_after_s)))))
    return (STATUS_OF_KIND.get(kind, 500), body.model_dump(mode="json", exclude_none=True),
            headers)


class Deleted(BaseModel):
    deleted: str


class Interrupted(BaseModel):
    interrupted: int


class Revoked(BaseModel):
    revoked: str


_CLIENT_ID = re.compile(rb"^[0-9a-f]{8,32}$")
CLIENT_HEADER = "x-colabswarm-client"  # a controller's random id, for the owner's view


class _Gate:
    """ASGI middleware: token check and body-size cap before the app sees a request. Uploads
    may be up to ``max_body`` bytes; every other route takes JSON of at most ``max_json``.
    Who the token belongs to goes into the scope (``colabswarm.who``) for the routes."""

    def __init__(self, app: Any, worker: WorkerApp, max_body: int, max_json: int) -> None:
        self.app, self._worker = app, worker
        self.max_upload, self.max_json = max_body, min(max_json, max_body)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        scheme, _, given = auth.partition(b" ")
        who = self._worker.tokens.identify(given.strip()) if scheme.lower() == b"bearer" \
            else None
        if who is None:
            extra = [(b"www-authenticate", b"Bearer")]
            if not _has_body(headers):
                # a stranger's connection is not kept alive: it cannot sit on a slot
                extra.append((b"connection", b"close"))
            return await _send_error(
                send, "Missing, wrong or revoked token. Send 'Authorization: Bearer <token>' "
                "with the token from the worker's share string (a guest whose token was "
                "revoked needs a new one from the owner).", ErrorKind.UNAUTHORIZED, extra=extra,
            )
        client = headers.get(CLIENT_HEADER.encode(), b"")
        self._worker.touch(who, client.decode() if _CLIENT_ID.match(client) else "-")
        scope["colabswarm.who"] = who
        cap = self.max_upload if scope["path"] == _UPLOADS else self.max_json
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > cap
            except ValueError:
                return await _send_error(
                    send, "Bad Content-Length header: send the body's size in bytes.",
                    ErrorKind.INVALID)
            if too_big:
                return await _send_error(send, _too_big(cap), ErrorKind.TOO_LARGE)
        seen = 0

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise HTTPException(413, _too_big(cap))
            return message

        return await self.app(scope, counted_receive, send)


_UPLOADS = f"{API_PREFIX}/uploads"
_GUEST_UPLOADS = 16  # uploads one guest holds at once (its oldest go first)


def _limits_text(lim: GuestLimits) -> str:
    parts = [f"{k} {v}" for k, v in lim.model_dump().items()
             if v is not None and not (k == "weight" and v == 1.0)]
    return ", ".join(parts) or "no limits of its own"


def _too_big(cap: int) -> str:
    return (f"Request body too large: at most {cap} bytes are accepted here (images: the "
            "worker's max_body_bytes, JSON: its max_json_bytes).")


def _has_body(headers: dict[bytes, bytes]) -> bool:
    return b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0"


async def _send_error(send: Callable, detail: str, kind: ErrorKind,
                      extra: list | None = None) -> None:
    status, body, _ = _error_body(detail, kind)
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class WorkerApp:
    """State shared by the routes: engine, job queue, uploads, limits."""

    def __init__(
        self,
        engine: Any,
        token: str,
        limits: Limits | None = None,
        name: str = "worker",
        simulated: bool = False,
        *,
        guests_file: str | None = None,
    ) -> None:
        if not isinstance(token, str) or not _TOKEN_RE.match(token):
            raise ColabSwarmError(
                "A worker's token must be 16-256 letters, digits, '-' or '_' (it goes into the "
                "share string); leave it out and a random 192-bit one is made."
            )
        self.engine = engine
        self.token = token
        self.limits = limits or Limits()
        self.name = clean_name(name)
        self.simulated = simulated
        self.tokens = TokenBook(token, guests_file)
        self.usage = Usage()
        self.log = WorkerLog(self.tokens.known_tokens, self.name)
        self.last_contact = time.monotonic()  # any authenticated request (idle_stop)
        self.jobs = JobManager(engine, self.limits, on_end=self._job_ended)
        for g in self.tokens.guests():
            self.jobs.set_weight(g.name, g.limits.weight if g.limits else 1.0)
        self.uploads: OrderedDict[str, tuple[float, Image.Image, str]] = OrderedDict()
        self._uploads_lock = threading.Lock()
        self.state = "loading"
        self.state_detail: str | None = None

    def __repr__(self) -> str:
        return (f"WorkerApp(name={self.name!r}, state={self.state!r}, "
                f"token={mask_token(self.token)!r})")

    def _warmup(self) -> None:
        try:
            if hasattr(self.engine, "load"):
                self.engine.load()
            self.state, self.state_detail = "ready", None
        except Exception as exc:
            self.state, self.state_detail = "error", public_error(exc)
            raise

    # ----- roles and use ---------------------------------------------------------------------
    def touch(self, who: Who, client: str) -> None:
        """An authenticated request: the contact idle_stop watches, and who was seen."""
        self.last_contact = time.monotonic()
        self.usage.seen(who, client, time.time(), self.last_contact)

    def add_guest(self, name: str, limits: GuestLimits | None = None) -> str:
        """A new guest token with its limits; returns the token."""
        token = self.tokens.add(name, limits)
        lim = self.tokens.guest(name).limits or GuestLimits()
        self.jobs.set_weight(name, lim.weight)
        self.log.note(logging.INFO, f"guest {name!r} added ({_limits_text(lim)})")
        return token

    def update_guest(self, name: str, limits: GuestLimits) -> None:
        self.tokens.update(name, limits)
        self.jobs.set_weight(name, limits.weight)
        self.log.note(logging.INFO, f"guest {name!r} now has {_limits_text(limits)}")

    def revoke(self, name: str) -> bool:
        """Take a guest's token back: its next request gets 401; its queued and running jobs
        are stopped and its uploads dropped. False if there is no such guest."""
        if not self.tokens.revoke(name):
            return False
        stopped = self.jobs.interrupt(owner=name)
        with self._uploads_lock:
            for uid in [u for u, e in self.uploads.items() if e[2] == name]:
                del self.uploads[uid]
        self.usage.revoked(name)
        self.log.note(logging.INFO, f"guest {name!r} revoked ({stopped} of its jobs stopped)")
        return True

    def set_weight(self, name: str, weight: float) -> None:
        """A token's share of the GPU when several have work queued ("owner" or a guest)."""
        if not isinstance(weight, (int, float)) or not 0 < weight <= 100:
            raise InvalidRequest(f"A weight is a number above 0 and at most 100 (got "
                                 f"{weight!r}).")
        if name == OWNER:
            self.jobs.set_weight(OWNER, float(weight))
            return
        lim = self.tokens.guest(name).limits or GuestLimits()
        self.update_guest(name, lim.model_copy(update={"weight": float(weight)}))

    def usage_rows(self, only: str | None = None) -> list[TokenUsage]:
        guests = self.tokens.guests()
        names = [OWNER, *[g.name for g in guests]]
        return self.usage.rows(guests, self.jobs.per_owner(), self.jobs.weights(names),
                               time.monotonic(), only)

    def _job_ended(self, job: Job) -> None:
        made = len(job.req.seeds) if job.state == "done" else 0
        gpu = ((job.computed or job.finished or time.monotonic()) - job.started
               if job.started is not None else 0.0)
        self.usage.ended(job.owner, job.id, made, gpu, time.monotonic())
        if job.state == "done":
            self.log.note(logging.INFO, f"job {job.id}: {made} {job.req.kind} image(s) "
                                        f"{job.out_size[0]}x{job.out_size[1]} for {job.owner} "
                                        f"in {gpu:.2f}s")

    def admit(self, who: Who, req: JobRequest, images: list[Image.Image]) -> JobStatus:
        """Queue a job for `who`, within its limits (a guest's: which limit, when it resets)."""
        now = time.monotonic()
        hourly = who.limits is not None and who.limits.images_per_hour is not None
        refusal = guest_refusal(
            who, req, queued=self.jobs.per_owner().get(who.name, 0),
            accepted=self.usage.hour(who.name) if hourly else [], now=now,
            now_wall=time.time(), next_slot_s=self.jobs.next_slot_s())
        if refusal is not None:
            self.log.note(logging.INFO, f"refused a job of {who.name}: {refusal}")
            raise refusal
        status = self.jobs.submit(req, images, owner=who.name, scope=who.scope)
        self.usage.accepted(who, status.id, len(req.seeds), now)
        return status

    def info(self, who: Who = OWNER_WHO) -> Info:
        """What /v1/info says to `who`: the owner sees every token's use and the connected
        controllers; a guest sees its own limits (as `limits`) and use only."""
        queued, running, held = self.jobs.counts()
        dev = self.engine.device_info()
        limits = effective_limits(self.limits, who.limits)
        if who.is_owner:
            extra: dict[str, Any] = {"usage": self.usage_rows(),
                                     "controllers": self.usage.controllers(time.monotonic())}
        else:
            extra = {"usage": self.usage_rows(only=who.name),
                     "guest": self.usage.quota(who, time.monotonic(), time.time())}
        return Info(
            name=self.name,
            state=self.state,  # type: ignore[arg-type]
            state_detail=self.state_detail,
            version=__version__,
            device=dev.get("device", "cpu"),
            gpu_name=dev.get("gpu_name"),
            gpu_memory_total=dev.get("gpu_memory_total"),
            gpu_memory_free=dev.get("gpu_memory_free"),
            models=self.engine.model_names,
            model_loaded=self.engine.loaded_model,
            capabilities=["txt2img", "img2img", "upscale", "tiles", "bundle", "samplers",
                          "loras", "clip_skip", "prompt_lists"],
            upscalers=self.engine.upscaler_names(),
            upscaler_scales=self.engine.upscaler_scales(),
            limits=limits,
            queue_depth=queued,
            running=running,
            jobs_served=self.jobs.jobs_served,
            results_held=held,
            step_seconds_per_mpix=self.engine.step_seconds_per_mpix,
            load_seconds=dict(getattr(self.engine, "load_seconds", {})),
            compile=self._compile_info(),
            simulated=self.simulated,
            samplers=self._samplers(),
            loras=[LoraInfo(name=f.name, hash=f.hash)
                   for f in getattr(self.engine, "lora_files", {}).values()],
            role=who.role,  # type: ignore[arg-type]
            **extra,
        )

    def _compile_info(self) -> Any:
        """The engine's compiled path (None: an engine that has none, e.g. the simulator)."""
        info = getattr(self.engine, "compile_info", None)
        return info() if info is not None else None

    def _samplers(self) -> list[str]:
        """What the engine runs (an engine that does not say runs the default only)."""
        names = getattr(self.engine, "sampler_names", None)
        return names() if names is not None else [DEFAULT_SAMPLER]

    # ----- checks ----------------------------------------------------------------------------
    def check(self, req: JobRequest, who: Who = OWNER_WHO) -> list[Image.Image]:
        """Refuse what this worker will not run, with the limit in the message."""
        lim = self.limits
        if req.kind != "upscale":
            for side, value in (("width", req.width), ("height", req.height)):
                if value % 8:
                    lo = value // 8 * 8
                    raise InvalidRequest(
                        f"{side} must be a multiple of 8 (got {value}); try {max(lo, 8)} "
                        f"or {lo + 8}."
                    )
                if value > lim.max_side:
                    raise InvalidRequest(f"{side} {value} is over this worker's {lim.max_side}.")
            if req.width * req.height > lim.max_pixels:
                raise InvalidRequest(
                    f"{req.width}x{req.height} is {req.width * req.height} pixels; this worker "
                    f"accepts at most {lim.max_pixels} (e.g. {int(lim.max_pixels ** 0.5) // 8 * 8}"
                    " square). Use the upscaler for larger images."
                )
        if req.kind != "upscale" and req.steps > lim.max_steps:
            raise InvalidRequest(
                f"steps {req.steps} is over this worker's limit of {lim.max_steps}."
            )
        if len(req.seeds) > lim.max_images:
            raise InvalidRequest(
                f"{len(req.seeds)} images in one job is over this worker's limit of "
                f"{lim.max_images}; split them into several jobs."
            )
        if any(not 0 <= s <= 2**63 - 1 for s in req.seeds):
            raise InvalidRequest("Seeds must be between 0 and 2**63-1.")
        if req.prompts and len(req.prompts) != len(req.seeds):
            raise InvalidRequest(
                f"prompts needs one prompt per seed: {len(req.seeds)} seeds, "
                f"{len(req.prompts)} prompts (or leave it out and use prompt).")
        if max(len(p) for p in (req.prompt, req.negative_prompt, *req.prompts)) \
                > lim.max_prompt_chars:
            raise InvalidRequest(f"Prompts are limited to {lim.max_prompt_chars} characters.")
        for text in (req.prompt, req.negative_prompt, *req.prompts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(
                    "Prompts must be valid Unicode text (this one holds a lone surrogate)."
                ) from None
        if req.model is not None and req.model not in self.engine.model_names:
            allowed = getattr(self.engine, "allow_downloads", False)
            if not allowed or not _HUB_ID.match(req.model) or ".." in req.model:
                raise ModelNotAvailable(
                    f"This worker does not serve model {req.model!r}; it serves "
                    f"{self.engine.model_names}."
                )
        if req.kind != "upscale":
            self._check_generation(req)
        if req.kind != "img2img" and req.crops:
            raise InvalidRequest(f"{req.kind} takes no crops; tiles are img2img jobs.")
        if req.kind == "txt2img":
            if req.init_images:
                raise InvalidRequest("txt2img takes no init_images; use kind 'img2img'.")
            return []
        if len(req.init_images) not in (1, len(req.seeds)):
            raise InvalidRequest(
                f"{req.kind} needs init_images: 1 upload id shared by all seeds, or one per seed "
                f"({len(req.seeds)}); got {len(req.init_images)}. Upload with POST /v1/uploads."
            )
        images = []
        with self._uploads_lock:
            for uid in req.init_images:
                entry = self.uploads.get(uid)
                if entry is None or not (who.is_owner or entry[2] == who.name):
                    raise InvalidRequest(
                        f"Unknown or expired upload {uid!r}; upload the image again."
                    )
                images.append(entry[1])
        image = max(images, key=lambda im: im.width * im.height)
        if req.kind == "img2img":
            if 0 < req.strength and int(req.steps * req.strength) < 1:
                raise InvalidRequest(
                    f"steps*strength must be at least 1 (got {req.steps}*{req.strength}); "
                    "raise steps or strength, or use strength 0 to return the image unchanged."
                )
            if req.crops or req.scale != 1 or req.upscaler:
                self._check_tiles(req, image)
        else:
            self._check_upscale(req, image)
        return images

    def _check_generation(self, req: JobRequest) -> None:
        """Sampler, LoRAs and clip skip. The sampler becomes its canonical name (None: the
        default), which the job's status reports."""
        name = DEFAULT_SAMPLER if req.sampler is None else canonical_sampler(req.sampler)
        offered = self._samplers()
        if name not in offered:
            raise ModelNotAvailable(
                f"This worker does not run the sampler {name!r}; it runs {', '.join(offered)}."
            )
        req.sampler = name
        lora_for = getattr(self.engine, "lora_for", None)
        for ref in req.loras:
            if lora_for is None:
                raise ModelNotAvailable(f"This worker offers no LoRAs (the job asks for "
                                        f"{ref.name!r}).")
            lora_for(ref, req.model)  # ModelNotAvailable: none, another file, does not fit
        clip_max = getattr(self.engine, "clip_skip_max", None)
        limit = clip_max(req.model) if clip_max is not None else 1
        if req.clip_skip > limit:
            raise InvalidRequest(
                f"clip skip {req.clip_skip} is over the {limit} that model "
                f"{req.model or self.engine.model_names[0]!r} has text-encoder layers for."
            )

    def _check_upscale(self, req: JobRequest, source: Image.Image) -> tuple[int, int]:
        """Scale, upscaler and output size of an upscale (or of a tile job's source)."""
        lim = self.limits
        if req.scale > lim.max_upscale:
            raise InvalidRequest(f"scale {req.scale} is over this worker's {lim.max_upscale}.")
        if req.upscaler and req.upscaler not in self.engine.upscaler_names():
            why = self.engine.upscaler_problem(req.upscaler)
            raise ModelNotAvailable(
                f"Unknown upscaler {req.upscaler!r}; this worker has "
                f"{self.engine.upscaler_names()}." + (f" {why}" if why else "")
            )
        w, h = source.width * req.scale, source.height * req.scale
        if w * h > lim.max_init_pixels:
            raise InvalidRequest(
                f"Upscaling {source.width}x{source.height} by {req.scale} gives {w * h} "
                f"pixels; this worker's limit is {lim.max_init_pixels}."
            )
        return w, h

    def _check_tiles(self, req: JobRequest, source: Image.Image) -> None:
        """img2img tiles cut here from the upscaled source: every box must fit and be the job's
        size, so a bad box is refused now rather than failing on the GPU."""
        if not req.crops:
            raise InvalidRequest(
                "img2img takes upscaler/scale only with crops (one tile box per seed)."
            )
        if len(req.init_images) != 1:
            raise InvalidRequest(
                f"img2img with crops needs one shared init image (the source), got "
                f"{len(req.init_images)}."
            )
        if len(req.crops) != len(req.seeds):
            raise InvalidRequest(
                f"img2img needs one crop box per seed: {len(req.seeds)} seeds, "
                f"{len(req.crops)} boxes."
            )
        w, h = self._check_upscale(req, source)
        for i, box in enumerate(req.crops):
            x0, y0, x1, y1 = box
            if (x1 - x0, y1 - y0) != (req.width, req.height) or not fits_edge_rule(box, w, h):
                raise InvalidRequest(
                    f"crop box {i} {list(box)} must be {req.width}x{req.height} (the job's size) "
                    f"and lie inside the upscaled {w}x{h} image (rounded up to a multiple of 8)."
                )

    def add_upload(self, data: bytes | bytearray, who: Who = OWNER_WHO) -> UploadResult:
        if not data:
            raise InvalidRequest("Empty upload: send the image bytes (PNG, JPEG or WebP) as body.")
        lim = self.limits
        scan = scan_image(data, lim.max_image_segments, lim.max_png_data_chunks)
        if not scan.ok:  # refused on the chunk headers alone, before Pillow parses any
            what = ("image data (IDAT) chunks" if scan.over == "max_png_data_chunks"
                    else "metadata chunks or segments")
            limit = getattr(lim, scan.over or "max_image_segments")
            raise InvalidRequest(
                f"This {scan.format} has more than {limit} {what}, this worker's limit; save "
                "it again without extra metadata (any image editor or PIL does) and retry."
            )
        try:
            with Image.open(io.BytesIO(data)) as probe:
                fmt, (w, h) = probe.format, probe.size
                if fmt not in _ALLOWED_FORMATS:
                    raise InvalidRequest(f"Image format {fmt} refused; send PNG, JPEG or WebP.")
                if w * h > lim.max_init_pixels:
                    raise InvalidRequest(
                        f"Image {w}x{h} is over this worker's {lim.max_init_pixels} pixels."
                    )
                image = probe.convert("RGB")
        except InvalidRequest:
            raise
        except Exception as exc:
            # Pillow's messages can hold object reprs with heap addresses: name the type only
            raise InvalidRequest(
                f"Cannot read the uploaded image ({type(exc).__name__}): it is not a whole PNG, "
                "JPEG or WebP file. Send the file's bytes as they are, as a PNG if in doubt."
            ) from None
        uid = secrets.token_hex(8)
        with self._uploads_lock:
            now = time.monotonic()
            for key in [k for k, (t, _, _) in self.uploads.items()
                        if now - t > lim.result_ttl_s]:
                del self.uploads[key]
            while len(self.uploads) >= lim.max_uploads:
                self.uploads.popitem(last=False)
            if not who.is_owner:  # a guest's uploads push out only its own older ones
                mine = [u for u, e in self.uploads.items() if e[2] == who.name]
                for u in mine[:max(0, len(mine) - _GUEST_UPLOADS + 1)]:
                    del self.uploads[u]
            self.uploads[uid] = (now, image, who.name)
        return UploadResult(id=uid, width=w, height=h)


def create_app(worker: WorkerApp) -> Any:
    """The ASGI app for one worker (FastAPI wrapped in the auth/size gate)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        worker.log.attach()
        worker.jobs.start(asyncio.get_running_loop(), warmup=worker._warmup)
        yield
        worker.jobs.close()
        worker.log.detach()

    app = FastAPI(
        title="colabswarm worker",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=f"{API_PREFIX}/openapi.json",
        lifespan=lifespan,
        dependencies=[Security(HTTPBearer(auto_error=False))],
        responses=_errors(400, 401, 413, 429, 500),
    )

    def who(request: Request) -> Who:
        return request.scope.get("colabswarm.who", OWNER_WHO)

    def owner_only(request: Request, action: str) -> Who:
        w = who(request)
        if not w.is_owner:
            raise Forbidden(
                f"Only the worker's owner may {action}; this request used guest token "
                f"{w.name!r}. A guest may run jobs and see or stop its own; ask the owner.")
        return w

    def answer(detail: str, kind: ErrorKind, retry_after_s: float | None = None) -> JSONResponse:
        status, body, headers = _error_body(detail, kind, retry_after_s)
        return JSONResponse(body, status_code=status, headers=dict(headers))

    @app.exception_handler(ColabSwarmError)
    async def _refused(_: Request, exc: ColabSwarmError) -> JSONResponse:
        retry = exc.retry_after_s if isinstance(exc, Busy) else None
        return answer(str(exc), exc.kind, retry)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return answer("; ".join(parts)[:2000] or "invalid request", ErrorKind.INVALID)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own (unknown path, wrong method) and FastAPI's (unparsable body, the
        # streamed-body cap): the kind from the one table
        kind = KIND_OF_STATUS.get(exc.status_code,
                                  ErrorKind.INVALID if exc.status_code < 500 else ErrorKind.CRASH)
        detail = exc.detail if isinstance(exc.detail, str) else "invalid request"
        response = answer(detail, kind)
        response.status_code = exc.status_code
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.error("request failed: %s", public_error(exc))
        return answer(f"The worker failed on this request ({type(exc).__name__}); its log has "
                      "the details. Retrying elsewhere may help.", ErrorKind.CRASH)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"ok": True}

    @app.get(f"{API_PREFIX}/info", response_model=Info)
    async def info(request: Request) -> Info:
        return await asyncio.to_thread(worker.info, who(request))

    @app.post(
        f"{API_PREFIX}/uploads",
        response_model=UploadResult,
        status_code=201,
        responses=_errors(422),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    f"image/{fmt}": {"schema": {"type": "string", "format": "binary"}}
                    for fmt in ("png", "jpeg", "webp")
                },
            }
        },
    )
    async def upload(request: Request) -> UploadResult:
        me = who(request)
        # one growing buffer, not a list of chunks joined at the end: a body dropped half-way
        # (stalled, over the cap) leaves one block to give back, not scattered pieces
        data = bytearray()
        try:
            async for chunk in request.stream():
                data += chunk
        except ClientDisconnect:  # gone, or dropped by the stall timeout: nobody to answer
            del data
            raise ColabSwarmError("The upload ended before its last byte; send it again.",
                                  kind=ErrorKind.INVALID) from None
        return await asyncio.to_thread(worker.add_upload, data, me)

    @app.post(f"{API_PREFIX}/jobs", response_model=JobStatus, status_code=202,
              responses=_errors(422, 429, 503))
    async def submit(req: JobRequest, request: Request) -> JobStatus:
        me = who(request)
        if worker.state == "error":
            raise ColabSwarmError(
                f"The worker's model failed to load ({worker.state_detail}); its owner must "
                "restart it. Use another worker.", kind=ErrorKind.MODEL_FAILED)
        images = worker.check(req, me)
        return worker.admit(me, req, images)

    def _job(job_id: str, request: Request) -> Any:
        job = worker.jobs.get(job_id)
        if job is None:
            raise ColabSwarmError(f"No job {job_id}: it finished and was collected, expired, "
                                  "or never existed on this worker.", kind=ErrorKind.NOT_FOUND)
        me = who(request)
        if not me.is_owner and job.owner != me.name:
            raise Forbidden(f"Job {job_id} was not submitted with this token (guest "
                            f"{me.name!r}); a guest sees and stops only its own jobs.")
        return job

    @app.get(f"{API_PREFIX}/jobs/{{job_id}}", response_model=JobStatus,
             responses=_errors(403, 404, 422))
    async def job_status(
        request: Request,
        job_id: str = _ID,
        wait: float = Query(0.0, ge=0.0, le=30.0, description="long-poll seconds"),
        since: int = Query(-1, ge=-1, description="return once the version passes this"),
        progress_every: float = Query(
            0.0, ge=0.0, le=30.0, description="report step progress at most this often"
        ),
    ) -> JobStatus:
        job = _job(job_id, request)
        if wait <= 0:
            return worker.jobs.status(job)
        return await worker.jobs.wait(job, since, wait, progress_every)

    @app.get(
        f"{API_PREFIX}/jobs/{{job_id}}/images",
        response_class=Response,
        responses={
            200: {
                "description": "Every image of the job in one answer (one request instead of "
                "one per image): for each, a 4-byte big-endian length, then that many bytes of "
                "PNG; the header x-seeds holds their seeds, comma-separated, in order",
                "content": {BUNDLE_TYPE: {"schema": {"type": "string", "format": "binary"}}},
                "headers": {"x-seeds": {"schema": {"type": "string",
                                                   "pattern": "^[0-9]+(,[0-9]+)*$"}}},
            },
            **_errors(403, 404, 409, 422),
        },
    )
    async def job_images(request: Request, job_id: str = _ID) -> Response:
        job = _job(job_id, request)
        if job.state != "done":
            raise ColabSwarmError(f"Job {job_id} is {job.state}; images come when it is done.",
                                  kind=ErrorKind.NOT_READY)
        pngs = list(job.pngs)
        return Response(
            b"".join(len(p).to_bytes(4, "big") + p for p in pngs), media_type=BUNDLE_TYPE,
            headers={"x-seeds": ",".join(str(s) for s in job.req.seeds[:len(pngs)])},
        )

    @app.get(
        f"{API_PREFIX}/jobs/{{job_id}}/images/{{index}}",
        response_class=Response,
        responses={
            200: {
                "description": "The image, as PNG; the header x-seed holds its seed",
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                "headers": {"x-seed": {"schema": {"type": "string", "pattern": "^[0-9]+$"}}},
            },
            **_errors(403, 404, 409, 422),
        },
    )
    async def job_image(request: Request, job_id: str = _ID,
                        index: int = Path(ge=0, le=1023)) -> Response:
        job = _job(job_id, request)
        if job.state != "done":
            raise ColabSwarmError(f"Job {job_id} is {job.state}; images come when it is done.",
                                  kind=ErrorKind.NOT_READY)
        if index >= len(job.pngs):
            raise ColabSwarmError(f"Job {job_id} has {len(job.pngs)} images; no index {index}.",
                                  kind=ErrorKind.NOT_FOUND)
        return Response(
            job.pngs[index], media_type="image/png",
            headers={"x-seed": str(job.req.seeds[index])},
        )

    @app.delete(f"{API_PREFIX}/jobs/{{job_id}}", response_model=Deleted,
                responses=_errors(403, 404, 422))
    async def job_delete(request: Request, job_id: str = _ID) -> Deleted:
        _job(job_id, request)
        if not worker.jobs.delete(job_id):
            raise ColabSwarmError(f"No job {job_id}.", kind=ErrorKind.NOT_FOUND)
        return Deleted(deleted=job_id)

    @app.post(f"{API_PREFIX}/jobs/{{job_id}}/interrupt", response_model=JobStatus,
              responses=_errors(403, 404, 422))
    async def job_interrupt(request: Request, job_id: str = _ID) -> JobStatus:
        job = _job(job_id, request)
        worker.jobs.interrupt(job)
        return worker.jobs.status(job)

    # ----- the owner's routes (403 forbidden for a guest) --------------------------------------
    @app.post(f"{API_PREFIX}/interrupt", response_model=Interrupted, responses=_errors(403))
    async def interrupt_all(request: Request) -> Interrupted:
        owner_only(request, "interrupt every job")
        n = worker.jobs.interrupt()
        worker.log.note(logging.INFO, f"the owner interrupted every job ({n})")
        return Interrupted(interrupted=n)

    @app.post(f"{API_PREFIX}/free", response_model=Freed, responses=_errors(403))
    async def free(request: Request) -> Freed:
        owner_only(request, "free the GPU's memory")
        now = await asyncio.to_thread(worker.engine.free)
        worker.log.note(logging.INFO, "the owner freed memory" if now else
                        "the owner asked to free memory: done after the job in flight")
        return Freed(freed=now)

    @app.get(f"{API_PREFIX}/logs", response_model=WorkerLogs, responses=_errors(403, 422))
    async def logs(request: Request, lines: int = Query(
            200, ge=1, le=500, description="the most recent lines, oldest first")) -> WorkerLogs:
        owner_only(request, "read the worker's log")
        return WorkerLogs(lines=worker.log.lines(lines))

    @app.get(f"{API_PREFIX}/guests", response_model=list[TokenUsage], responses=_errors(403))
    async def guests(request: Request) -> list[TokenUsage]:
        owner_only(request, "list the guests")
        return await asyncio.to_thread(worker.usage_rows)

    @app.post(f"{API_PREFIX}/guests", response_model=GuestGrant, status_code=201,
              responses=_errors(403, 422))
    async def add_guest(new: NewGuest, request: Request) -> GuestGrant:
        owner_only(request, "add guests")
        return GuestGrant(name=new.name, token=worker.add_guest(new.name, new.limits))

    @app.put(f"{API_PREFIX}/guests/{{name}}", response_model=TokenUsage,
             responses=_errors(403, 404, 422))
    async def update_guest(limits: GuestLimits, request: Request,
                           name: str = Path(pattern=GUEST_NAME_PATTERN)) -> TokenUsage:
        owner_only(request, "change a guest's limits")
        worker.update_guest(name, limits)
        return worker.usage_rows(only=name)[0]

    @app.delete(f"{API_PREFIX}/guests/{{name}}", response_model=Revoked,
                responses=_errors(403, 404, 422))
    async def revoke_guest(request: Request,
                           name: str = Path(pattern=GUEST_NAME_PATTERN)) -> Revoked:
        owner_only(request, "revoke guests")
        if not worker.revoke(name):
            raise ColabSwarmError(f"No guest named {name!r}.", kind=ErrorKind.NOT_FOUND)
        return Revoked(revoked=name)

    return _Gate(app, worker, worker.limits.max_body_bytes, worker.limits.max_json_bytes)
