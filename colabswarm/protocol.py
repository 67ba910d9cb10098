"""The wire contract between controller and worker: models, limits, share strings.

Nothing here imports torch, so a controller on a laptop can use it.
"""

from __future__ import annotations

import functools
import re
import secrets
from typing import Annotated, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
)

from .errors import BadShareString, ErrorKind, InvalidRequest

__all__ = [
    "Freed",
    "API_PREFIX",
    "API_VERSION",
    "BUNDLE_TYPE",
    "CompileInfo",
    "CompiledShape",
    "ControllerSeen",
    "ErrorDetail",
    "ErrorKind",
    "GUEST_NAME_PATTERN",
    "GuestGrant",
    "GuestLimits",
    "GuestQuota",
    "KIND_OF_STATUS",
    "LORA_NAME_PATTERN",
    "MAX_LORA_NAME",
    "MAX_LORAS_OFFERED",
    "MAX_LORAS_PER_JOB",
    "MAX_LORA_WEIGHT",
    "LogLine",
    "NewGuest",
    "STATUS_OF_KIND",
    "Info",
    "JobRequest",
    "JobState",
    "JobStatus",
    "Limits",
    "LoraInfo",
    "LoraRef",
    "SKIP_NGROK_WARNING",
    "TOKEN_ENV",
    "TokenUsage",
    "UploadResult",
    "WorkerLogs",
    "clean_name",
    "clean_text",
    "decode_share",
    "make_guest_limits",
    "make_request",
    "encode_share",
    "mask_token",
    "new_token",
    "normalize_url",
]

API_VERSION = "1"
API_PREFIX = "/v1"
SKIP_NGROK_WARNING = {"ngrok-skip-browser-warning": "1"}
TOKEN_ENV = "COLABSWARM_TOKEN"  # a worker's token from the environment (kept off argv)
# a job's PNGs in one answer: per image a 4-byte big-endian length, then the PNG (capability
# "bundle"; older workers serve one image per request)
BUNDLE_TYPE = "application/x-colabswarm-pngs"
MAX_SEED = 2**63 - 1

_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]{16,256}$")
_SHARE_EXAMPLE = "https://example.trycloudflare.com#token=Qx3...long-secret...9a"

JobState = Literal["queued", "running", "done", "failed", "interrupted"]
JobKind = Literal["txt2img", "img2img", "upscale"]

# A LoRA's name is its file stem, written as <lora:name:weight> in prompts and as "name: hash"
# in A1111's "Lora hashes": none of ':' ',' '<' '>' quotes, slashes, control characters, and no
# space at either end. (No look-arounds: pydantic checks patterns with Rust's regex.)
_LORA_CHAR = r"[^\s:<>,\"\\/|\x00-\x1f\x7f]"
_LORA_INNER = r"[^:<>,\"\\/|\x00-\x1f\x7f]"
LORA_NAME_PATTERN = rf"^{_LORA_CHAR}(?:{_LORA_INNER}*{_LORA_CHAR})?$"
MAX_LORA_NAME = 128
MAX_LORA_WEIGHT = 4.0  # A1111 accepts any number; past +-4 a LoRA only burns the image
MAX_LORAS_PER_JOB = 8
MAX_LORAS_OFFERED = 2000  # what one worker may advertise in /v1/info


class LoraRef(BaseModel):
    """One LoRA a job asks for: by name, with its weight, and the content hash the controller
    expects (the worker refuses the job if its file of that name has another hash, so two
    workers with different files of one name never mix). The hash is the full 64 hex digits
    from /v1/info, or at least the 12 that A1111 writes in "Lora hashes"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=MAX_LORA_NAME, pattern=LORA_NAME_PATTERN)
    weight: float = Field(1.0, ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT, allow_inf_nan=False)
    hash: str = Field(pattern=r"^[0-9a-f]{12,64}$")


class LoraInfo(BaseModel):
    """A LoRA a worker offers: its name and the SHA-256 of its tensor data (A1111's hash)."""

    name: str = Field(min_length=1, max_length=MAX_LORA_NAME, pattern=LORA_NAME_PATTERN)
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")


# What a worker sends is bounded where it is parsed: no infinities or NaNs (one infinite run
# time once stopped a controller's every dispatch), lists and names of sane length.
_WIRE = ConfigDict(allow_inf_nan=False)
Name = Annotated[str, Field(max_length=200)]
_MAX_SECONDS = 1e6  # eleven days: longer than any job


def _cut(text: str | None, limit: int) -> str | None:
    return text if text is None or len(text) <= limit else text[: limit - 1] + "…"


class Limits(BaseModel):
    """What one worker accepts; each is checked server-side with a message that names it."""

    model_config = _WIRE

    max_pixels: int = 1536 * 1536
    max_side: int = 4096
    max_steps: int = 150
    max_images: int = 16
    max_body_bytes: int = 32 * 1024 * 1024  # an upload
    max_json_bytes: int = 1024 * 1024       # any other request (a job is a few kB)
    max_init_pixels: int = 4096 * 4096
    max_prompt_chars: int = 4000
    max_queue: int = 256
    max_uploads: int = 64
    max_upscale: int = 8
    result_ttl_s: float = 600.0
    # connections (backend/connections.py, before the token is checked)
    max_connections: int = 100      # open at once; past it: 429 queue_full at once, then closed
    header_timeout_s: float = 10.0  # a request's headers, from connect or from their first byte
    idle_timeout_s: float = 30.0    # a kept-alive connection between requests
    stall_timeout_s: float = 15.0   # a request body (or an answer) that makes no progress
    max_header_bytes: int = 16384
    # uploads: PNG chunks other than IDAT / JPEG segments before the image data, PNG IDATs
    max_image_segments: int = 256
    max_png_data_chunks: int = 16384


class JobRequest(BaseModel):
    """One pipeline call: all images share every parameter but their seed."""

    model_config = ConfigDict(extra="forbid")

    kind: JobKind = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    width: int = Field(512, ge=8, le=16384)
    height: int = Field(512, ge=8, le=16384)
    steps: int = Field(20, ge=1, le=10000)
    cfg: float = Field(7.0, ge=0.0, le=50.0)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=1024)
    model: str | None = Field(None, max_length=200)
    strength: float = Field(0.3, ge=0.0, le=1.0)
    init_images: list[str] = Field(
        default_factory=list, max_length=1024,
        description="ids from POST /v1/uploads: one shared by all seeds, or one per seed",
    )
    upscaler: str | None = Field(None, max_length=200)
    scale: int = Field(1, ge=1, le=64)
    crops: list[tuple[int, int, int, int]] = Field(
        default_factory=list, max_length=1024,
        description="img2img tiles: one box (left, top, right, bottom) per seed, cut by the "
        "worker from the one shared init image after `upscaler` x `scale`; each box is width x "
        "height and may pass the right/bottom edge by < 8 px (edge pixels repeat)",
    )
    sampler: str | None = Field(
        None, min_length=1, max_length=64,
        description="an A1111 sampler name such as 'DPM++ 2M Karras' (see Info.samplers); "
        "None: the worker's default, Euler",
    )
    loras: list[LoraRef] = Field(
        default_factory=list, max_length=MAX_LORAS_PER_JOB,
        description="LoRAs by name, weight and content hash (see Info.loras), each at most once",
    )
    clip_skip: int = Field(
        1, ge=1, le=12,
        description="A1111's 'Clip skip': 1 = the text encoder's last layer, 2 = the one before",
    )
    prompts: list[str] = Field(
        default_factory=list, max_length=1024,
        description="one prompt per seed (then `prompt` is ignored): images that differ only in "
        "their prompt share one pipeline call (capability 'prompt_lists')",
    )

    # Fields added after the first /v1 workers, which answer 422 to any field they do not
    # know: wire_json() leaves each out while it has its default value. Add every new
    # JobRequest field here.
    ADDED_FIELDS: ClassVar[tuple[str, ...]] = ("crops", "sampler", "loras", "clip_skip",
                                               "prompts")

    @field_validator("loras")
    @classmethod
    def _each_lora_once(cls, loras: list[LoraRef]) -> list[LoraRef]:
        names = [lo.name for lo in loras]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"LoRA {twice[0]!r} is listed twice; give each LoRA once")
        return loras

    def wire_json(self) -> str:
        """The JSON body for POST /v1/jobs that workers of every /v1 version accept: fields in
        ADDED_FIELDS are left out while they have their default value."""
        defaults = _added_defaults()
        skip = {name for name, default in defaults.items() if getattr(self, name) == default}
        return self.model_dump_json(exclude=skip)

    def param_key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call: all but seeds, prompts, init images
        and tile boxes (hashable: LoRAs become (name, weight, hash) tuples, in the job's order).
        A worker runs several prompts in one call (`prompts`); one that cannot gets jobs of
        one prompt only (the scheduler sees to it)."""
        d = self.model_dump(exclude={"seeds", "init_images", "crops", "loras", "prompt",
                                     "prompts"})
        d["loras"] = tuple((lo.name, lo.weight, lo.hash) for lo in self.loras)
        return tuple(sorted(d.items()))


def make_request(**fields: object) -> JobRequest:
    """A JobRequest from a caller's parameters, or InvalidRequest saying which one is wrong."""
    try:
        return JobRequest(**fields)  # type: ignore[arg-type]
    except ValidationError as exc:
        msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidRequest(f"Bad generation parameters: {msg}") from None


@functools.cache
def _added_defaults() -> dict[str, object]:
    """JobRequest.ADDED_FIELDS' defaults, worked out once (pydantic's get_default inspects the
    factory's signature on every call: a controller sends thousands of jobs)."""
    fields = JobRequest.model_fields
    return {name: fields[name].get_default(call_default_factory=True)
            for name in JobRequest.ADDED_FIELDS}


_ID_PATTERN = r"^[0-9A-Za-z_\-]{1,64}$"  # ids go into URL paths: never a '/' or '..'


class JobStatus(BaseModel):
    model_config = _WIRE

    id: str = Field(pattern=_ID_PATTERN)
    state: JobState
    kind: JobKind = "txt2img"
    step: int = Field(0, ge=0, le=1_000_000)
    total_steps: int = Field(0, ge=0, le=1_000_000)
    seeds: list[int] = Field(default_factory=list, max_length=1024)
    images_ready: int = Field(0, ge=0, le=1024)
    queue_position: int = Field(0, ge=0, le=1_000_000)
    error: str | None = None
    error_kind: ErrorKind | None = Field(
        None, description="with state failed/interrupted: out_of_memory, interrupted, crash, ..."
    )
    queued_s: float = Field(0.0, ge=0.0, le=_MAX_SECONDS)
    run_s: float = Field(0.0, ge=0.0, le=_MAX_SECONDS)
    version: int = Field(0, ge=0)
    width: int = Field(0, ge=0, le=65536)
    height: int = Field(0, ge=0, le=65536)
    sampler: str | None = Field(
        None, max_length=64, description="the sampler the worker runs the job with"
    )

    @field_validator("error")
    @classmethod
    def _short_error(cls, v: str | None) -> str | None:
        return _cut(v, 2000)


class ErrorDetail(BaseModel):
    """Every 4xx/5xx the worker sends on purpose: one sentence a person can act on, and the
    kind that code decides on. Workers from before kinds send only `detail`: the client then
    takes the kind from the HTTP status (KIND_OF_STATUS)."""

    detail: str
    kind: ErrorKind | None = None
    retry_after_s: float | None = Field(
        None, ge=0.0, le=86400.0,
        description="for transient kinds: when the same request may succeed (also sent as the "
        "Retry-After header)",
    )


# The one table between error kinds and HTTP statuses: the worker answers a kind with its
# status; a client reading an answer without a kind (an older worker, a proxy's error page)
# takes the kind of its status.
STATUS_OF_KIND: dict[ErrorKind, int] = {
    ErrorKind.INVALID: 422,
    ErrorKind.MODEL_NOT_AVAILABLE: 422,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.NOT_READY: 409,
    ErrorKind.QUEUE_FULL: 429,
    ErrorKind.RATE_LIMITED: 429,
    ErrorKind.LOADING: 503,
    ErrorKind.MODEL_FAILED: 503,
    ErrorKind.CRASH: 500,
}
KIND_OF_STATUS: dict[int, ErrorKind] = {
    400: ErrorKind.INVALID,
    401: ErrorKind.UNAUTHORIZED,
    403: ErrorKind.FORBIDDEN,
    404: ErrorKind.NOT_FOUND,
    409: ErrorKind.NOT_READY,
    413: ErrorKind.TOO_LARGE,
    422: ErrorKind.INVALID,
    429: ErrorKind.QUEUE_FULL,
    503: ErrorKind.LOADING,
}


class UploadResult(BaseModel):
    model_config = _WIRE

    id: str = Field(pattern=_ID_PATTERN)
    width: int = Field(ge=1, le=65536)
    height: int = Field(ge=1, le=65536)


class Freed(BaseModel):
    """The answer to POST /v1/free."""

    model_config = _WIRE

    # False: a job was in flight (it may be recording CUDA graphs); the worker frees right
    # after it. Workers before this field's meaning changed always said True.
    freed: StrictBool


WorkerState = Literal["loading", "ready", "error"]


def clean_name(text: str, max_chars: int = 64, fallback: str = "worker") -> str:
    """A worker's name as it may be printed, logged or saved: terminal escape sequences and
    every control, format or line-breaking character removed, runs of spaces made one, at most
    `max_chars` characters; `fallback` if nothing is left."""
    text = _ESCAPES.sub("", text)
    text = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(text.split())[:max_chars].rstrip() or fallback


# ANSI/VT sequences: CSI (ESC [ or 0x9b), OSC (ESC ] ... BEL or ESC \\), two-byte ESC sequences
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?|\x1b[ -~]?"
)


class CompiledShape(BaseModel):
    """Image size and the batch sizes a compiled worker has graphs for (its buckets)."""

    model_config = _WIRE

    width: int = Field(ge=8, le=16384)
    height: int = Field(ge=8, le=16384)
    batches: list[Annotated[int, Field(ge=1, le=1024)]] = Field(max_length=64)


class CompileInfo(BaseModel):
    """What a worker's compiled fast path has: mode, state, and the shapes it has compiled.
    The controller sends such a worker, for these image sizes, only these batch sizes."""

    model_config = _WIRE

    mode: Name = "off"
    state: Literal["off", "compiling", "ready", "failed"] = "off"
    detail: str | None = Field(None, max_length=300)
    shapes: list[CompiledShape] = Field(default_factory=list, max_length=64)


# ----- roles: the owner's token and named guest tokens (backend/guests.py) ---------------
GUEST_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}$"
Role = Literal["owner", "guest"]
_UNIX_S = Field(ge=0.0, le=1e11)  # a wall-clock time (seconds since 1970)


class GuestLimits(BaseModel):
    """What one guest token may use, set by the worker's owner. None: the worker's own limit."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    images_per_hour: int | None = Field(None, ge=1, le=1_000_000,
                                        description="images accepted in any rolling hour")
    max_pixels: int | None = Field(None, ge=64, le=1 << 26, description="width*height")
    max_steps: int | None = Field(None, ge=1, le=10_000)
    max_images: int | None = Field(None, ge=1, le=1024, description="images in one job")
    max_queued: int = Field(16, ge=1, le=1024, description="jobs waiting or running at once")
    weight: float = Field(1.0, gt=0.0, le=100.0,
                          description="share of the GPU when several tokens have work queued")


def make_guest_limits(*, images_per_hour: int | None = None, max_pixels: int | None = None,
                      max_steps: int | None = None, max_images: int | None = None,
                      max_queued: int = 16, weight: float = 1.0) -> GuestLimits:
    """GuestLimits from a caller's values, or InvalidRequest saying which one is wrong."""
    try:
        return GuestLimits(images_per_hour=images_per_hour, max_pixels=max_pixels,
                           max_steps=max_steps, max_images=max_images, max_queued=max_queued,
                           weight=weight)
    except ValidationError as exc:
        msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidRequest(f"Bad guest limits: {msg}") from None


class NewGuest(BaseModel):
    """POST /v1/guests (owner only): a guest's name and limits."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=GUEST_NAME_PATTERN)
    limits: GuestLimits = Field(default_factory=GuestLimits)


class GuestGrant(BaseModel):
    """A new guest's token, shown once to the owner (make the share string from it)."""

    name: str = Field(pattern=GUEST_NAME_PATTERN)
    token: str = Field(pattern=r"^[A-Za-z0-9_\-]{16,256}$", repr=False)


class TokenUsage(BaseModel):
    """Who used the GPU: one row per token (the owner's, each guest's, revoked ones too)."""

    model_config = _WIRE

    name: Annotated[str, Field(max_length=200), AfterValidator(clean_name)]
    role: Role
    revoked: bool = False
    images: int = Field(0, ge=0, description="images made")
    jobs: int = Field(0, ge=0, description="jobs finished (done, failed or interrupted)")
    gpu_seconds: float = Field(0.0, ge=0.0, le=1e10)
    last_seen: float | None = Field(None, ge=0.0, le=1e11,
                                    description="last authenticated request, unix seconds")
    queued: int = Field(0, ge=0, description="jobs waiting or running now")
    images_last_hour: int = Field(0, ge=0, description="images accepted in the last hour")
    weight: float = Field(1.0, gt=0.0, le=100.0)
    limits: GuestLimits | None = None


class ControllerSeen(BaseModel):
    """A controller that contacted the worker lately: its token's name and its random id."""

    model_config = _WIRE

    token: Annotated[str, Field(max_length=200), AfterValidator(clean_name)]
    client: str = Field(pattern=r"^(-|[0-9a-f]{8,32})$",
                        description="the controller's random id (x-colabswarm-client), '-' if "
                        "it sent none")
    last_seen: float = _UNIX_S
    requests: int = Field(0, ge=0)


class GuestQuota(BaseModel):
    """A guest's own view of its limits: what it may use and what it used this hour."""

    model_config = _WIRE

    name: Annotated[str, Field(max_length=200), AfterValidator(clean_name)]
    limits: GuestLimits
    images_last_hour: int = Field(0, ge=0)
    next_free_at: float | None = Field(
        None, ge=0.0, le=1e11,
        description="unix seconds when the oldest image of the last hour stops counting")


class LogLine(BaseModel):
    model_config = _WIRE

    t: float = _UNIX_S
    level: str = Field(pattern=r"^[A-Z]{1,10}$")
    message: Annotated[str, Field(max_length=2000), AfterValidator(lambda v: clean_text(v, 500))]


class WorkerLogs(BaseModel):
    """GET /v1/logs (owner only): the worker's recent log lines, oldest first, tokens masked."""

    model_config = _WIRE

    lines: list[LogLine] = Field(default_factory=list, max_length=1000)


class Info(BaseModel):
    model_config = _WIRE

    name: Annotated[str, Field(max_length=1000), AfterValidator(clean_name)]
    state: WorkerState = "ready"
    state_detail: str | None = None
    api_version: Name = API_VERSION
    version: Name
    device: Name
    gpu_name: Name | None = None
    gpu_memory_total: int | None = Field(None, ge=0)
    gpu_memory_free: int | None = Field(None, ge=0)
    models: list[Name] = Field(max_length=1000)
    model_loaded: Name | None = None
    capabilities: list[Name] = Field(max_length=64)
    upscalers: list[Name] = Field(max_length=1000)
    upscaler_scales: dict[Name, Annotated[int, Field(ge=1, le=64)]] = Field(
        max_length=1000,
        default_factory=dict,
        description="each upscale model's own factor by name (4: a 4x model); asked for another "
        "scale, the worker runs it at this one and resizes the result with Lanczos",
    )
    limits: Limits
    queue_depth: int = Field(ge=0)
    running: int = Field(ge=0)
    jobs_served: int = Field(ge=0)
    results_held: int = Field(0, ge=0, description="finished jobs whose results await collection")
    step_seconds_per_mpix: float | None = Field(
        None, gt=0.0, le=_MAX_SECONDS,
        description="measured seconds for one denoising step of one 1-megapixel image"
    )
    load_seconds: dict[Name, Annotated[float, Field(ge=0.0, le=86400.0)]] = Field(
        default_factory=dict, max_length=1000,
        description="measured seconds to load (switch to) each model, where measured",
    )
    compile: CompileInfo | None = None
    simulated: bool = False
    samplers: list[str] = Field(
        default_factory=list, max_length=64,
        description="sampler names this worker runs (empty from workers before samplers: "
        "those run Euler only)",
    )
    loras: list[LoraInfo] = Field(
        default_factory=list, max_length=MAX_LORAS_OFFERED,
        description="LoRAs this worker offers, by name and content hash",
    )

    # roles (a worker from before them sends none of these: a controller takes the defaults)
    role: Role | None = Field(None, description="who the asking token is")
    guest: GuestQuota | None = Field(None, description="a guest's own limits and use")
    usage: list[TokenUsage] = Field(
        default_factory=list, max_length=256,
        description="who used the GPU: every token for the owner, only its own for a guest")
    controllers: list[ControllerSeen] = Field(
        default_factory=list, max_length=256,
        description="controllers seen in the last 2 minutes (the owner's view only)")

    @field_validator("samplers")
    @classmethod
    def _short_names(cls, names: list[str]) -> list[str]:
        if any(not 0 < len(n) <= 64 for n in names):
            raise ValueError("sampler names are 1-64 characters")
        return names

    @field_validator("state_detail")
    @classmethod
    def _short_detail(cls, v: str | None) -> str | None:
        return _cut(v, 2000)


# control characters (terminal escapes, newlines, NUL), bidi overrides and zero-width marks:
# text from a stranger must not rewrite a terminal, split a log line or hide what it says
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]+")


def clean_text(text: object, limit: int = 300) -> str:
    """Text from the other side of the wire, made safe to print, log or save: terminal escape
    sequences go, other unprintable characters become one space, and it is cut to `limit`
    characters (with an ellipsis). Names use clean_name."""
    out = _UNPRINTABLE.sub(" ", _ESCAPES.sub("", str(text))).strip()
    return out if len(out) <= limit else out[: max(limit - 1, 0)] + "…"


def new_token() -> str:
    """A fresh secret: 192 random bits, URL-safe, never starting with '-' (which a command line
    would read as an option)."""
    while True:
        token = secrets.token_urlsafe(24)
        if not token.startswith("-"):
            return token


def mask_token(token: str | None) -> str:
    """Enough of a token to tell two apart in a log, never enough to use it."""
    if not token:
        return "<none>"
    return token[:4] + "…"


def normalize_url(url: str) -> str:
    """Check a worker base URL and return it without a trailing slash."""
    url = "".join(url.split())
    if not url:
        raise BadShareString(f"Empty address. Paste a share string such as {_SHARE_EXAMPLE}")
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadShareString(f"Cannot read the address {url!r}: {exc}.") from None
    if parts.scheme not in ("http", "https"):
        raise BadShareString(
            f"The address {url!r} must start with http:// or https:// (got {parts.scheme!r})."
        )
    if not parts.hostname:
        raise BadShareString(f"The address {url!r} has no host name.")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise BadShareString(
            f"The address {url!r} should be a plain base URL; put the token after '#token='."
        )
    netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
    if ":" in parts.hostname:
        netloc = f"[{parts.hostname}]" + ("" if port is None else f":{port}")
    path = parts.path.rstrip("/")
    result = f"{parts.scheme}://{netloc}{path}"
    import httpx  # the client's own URL rules are the last word (IDNA, IPv4 literals)

    try:
        httpx.URL(result + API_PREFIX)
    except (httpx.InvalidURL, ValueError) as exc:
        raise BadShareString(f"Cannot read the address {url!r}: {exc}.") from None
    return result


def encode_share(url: str, token: str) -> str:
    """One line a person can copy: the public URL, then the token after '#token='.

    The token sits in the fragment, which browsers never send, so pasting a share string into
    a browser does not leak it to the tunnel provider's logs.
    """
    if not _TOKEN_RE.match(token):
        raise BadShareString("A token must be 16-256 characters of letters, digits, '-' or '_'.")
    return f"{normalize_url(url)}#token={token}"


def decode_share(text: str, token: str | None = None) -> tuple[str, str]:
    """Read a share string (or a URL plus a separate token) into (base_url, token).

    Whitespace and line breaks anywhere are ignored, so a string wrapped by a chat app or a
    notebook output still pastes.
    """
    if not isinstance(text, str):
        raise BadShareString(f"A share string is text, not {type(text).__name__}.")
    compact = "".join(text.split()).strip("'\"`<>")
    if "#" in compact:
        url, _, frag = compact.partition("#")
        if not frag.startswith("token="):
            raise BadShareString(
                f"Cannot read the share string: after '#' it should say 'token=...'. "
                f"A good one looks like {_SHARE_EXAMPLE}"
            )
        found = frag[len("token="):]
        if token is not None and token != found:
            raise BadShareString("The share string holds a different token from the one given.")
        token = found
    else:
        url = compact
    if token is None:
        raise BadShareString(
            "This address has no token. Paste the whole share string the worker printed, "
            f"which looks like {_SHARE_EXAMPLE}, or pass token=..."
        )
    token = "".join(token.split())
    if not _TOKEN_RE.match(token):
        raise BadShareString(
            "The token in the share string is malformed (it should be 16-256 letters, digits, "
            f"'-' or '_'). Copy the whole line again; a good one looks like {_SHARE_EXAMPLE}"
        )
    return normalize_url(url), token
