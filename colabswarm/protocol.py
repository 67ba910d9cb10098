"""The wire contract between controller and worker: models, limits, share strings.

Nothing here imports torch, so a controller on a laptop can use it.
"""

from __future__ import annotations

import re
import secrets
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import BadShareString, ErrorKind

__all__ = [
    "API_PREFIX",
    "API_VERSION",
    "ErrorDetail",
    "ErrorKind",
    "KIND_OF_STATUS",
    "LORA_NAME_PATTERN",
    "MAX_LORA_NAME",
    "MAX_LORAS_OFFERED",
    "MAX_LORAS_PER_JOB",
    "MAX_LORA_WEIGHT",
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
    "UploadResult",
    "decode_share",
    "encode_share",
    "mask_token",
    "new_token",
    "normalize_url",
]

API_VERSION = "1"
API_PREFIX = "/v1"
SKIP_NGROK_WARNING = {"ngrok-skip-browser-warning": "1"}
TOKEN_ENV = "COLABSWARM_TOKEN"  # a worker's token from the environment (kept off argv)
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


class Limits(BaseModel):
    """What one worker accepts; each is checked server-side with a message that names it."""

    max_pixels: int = 1536 * 1536
    max_side: int = 4096
    max_steps: int = 150
    max_images: int = 16
    max_body_bytes: int = 32 * 1024 * 1024
    max_init_pixels: int = 4096 * 4096
    max_prompt_chars: int = 4000
    max_queue: int = 256
    max_uploads: int = 64
    max_upscale: int = 8
    result_ttl_s: float = 600.0


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

    # Fields added after the first /v1 workers, which answer 422 to any field they do not
    # know: wire_json() leaves each out while it has its default value. Add every new
    # JobRequest field here.
    ADDED_FIELDS: ClassVar[tuple[str, ...]] = ("crops", "sampler", "loras", "clip_skip")

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
        fields = type(self).model_fields
        skip = {name for name in self.ADDED_FIELDS
                if getattr(self, name) == fields[name].get_default(call_default_factory=True)}
        return self.model_dump_json(exclude=skip)

    def param_key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call: all but seeds, init images and
        tile boxes (hashable: LoRAs become (name, weight, hash) tuples, in the job's order)."""
        d = self.model_dump(exclude={"seeds", "init_images", "crops", "loras"})
        d["loras"] = tuple((lo.name, lo.weight, lo.hash) for lo in self.loras)
        return tuple(sorted(d.items()))


_ID_PATTERN = r"^[0-9A-Za-z_\-]{1,64}$"  # ids go into URL paths: never a '/' or '..'


class JobStatus(BaseModel):
    id: str = Field(pattern=_ID_PATTERN)
    state: JobState
    kind: JobKind = "txt2img"
    step: int = 0
    total_steps: int = 0
    seeds: list[int] = Field(default_factory=list)
    images_ready: int = 0
    queue_position: int = 0
    error: str | None = None
    error_kind: ErrorKind | None = Field(
        None, description="with state failed/interrupted: out_of_memory, interrupted, crash, ..."
    )
    queued_s: float = 0.0
    run_s: float = 0.0
    version: int = 0
    width: int = 0
    height: int = 0
    sampler: str | None = Field(
        None, max_length=64, description="the sampler the worker runs the job with"
    )


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
    id: str = Field(pattern=_ID_PATTERN)
    width: int
    height: int


WorkerState = Literal["loading", "ready", "error"]


class Info(BaseModel):
    name: str
    state: WorkerState = "ready"
    state_detail: str | None = None
    api_version: str = API_VERSION
    version: str
    device: str
    gpu_name: str | None = None
    gpu_memory_total: int | None = None
    gpu_memory_free: int | None = None
    models: list[str]
    model_loaded: str | None = None
    capabilities: list[str]
    upscalers: list[str]
    limits: Limits
    queue_depth: int
    running: int
    jobs_served: int
    results_held: int = Field(0, description="finished jobs whose results await collection")
    step_seconds_per_mpix: float | None = Field(
        None, description="measured seconds for one denoising step of one 1-megapixel image"
    )
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

    @field_validator("samplers")
    @classmethod
    def _short_names(cls, names: list[str]) -> list[str]:
        if any(not 0 < len(n) <= 64 for n in names):
            raise ValueError("sampler names are 1-64 characters")
        return names


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
