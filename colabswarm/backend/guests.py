"""Who a bearer token is, what it may do, and what each token used: the worker's roles.

- The owner's token (the one in the worker's own share string) is the **admin** token: it may
  do everything, see every job and every token's use, and manage guests.
- A **guest** token has a name and limits (``protocol.GuestLimits``): it may generate, upscale
  and see or stop its own jobs, within its limits; never another token's jobs, never the
  owner's actions (free memory, interrupt all, logs, guests).

``TokenBook.identify`` compares a presented token with every known token in constant time:
both sides are hashed with SHA-256 and every stored digest is compared with
``hmac.compare_digest``, with no early exit and no lookup keyed by the secret. The book is an
immutable tuple swapped on each change, so a revocation holds from the next request on.

Guests are kept across restarts only when the owner names a file: JSON, mode 0600, written to a
temporary file in the same folder and renamed over the old one (never half-written), and
refused at start if other users could read it.

``Usage`` counts what each token used (images, GPU seconds, last seen), which controllers are
connected, and each guest's images in a rolling hour. The limit checks are pure functions of
what they are given (``guest_refusal``), with the time passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import Busy, ColabSwarmError, ErrorKind, InvalidRequest
from ..protocol import (
    GUEST_NAME_PATTERN,
    ControllerSeen,
    GuestLimits,
    GuestQuota,
    JobRequest,
    Limits,
    TokenUsage,
    mask_token,
    new_token,
)

__all__ = [
    "MAX_GUESTS",
    "OWNER",
    "TokenBook",
    "Usage",
    "Who",
    "effective_limits",
    "guest_refusal",
    "hour_window",
    "load_guests_file",
    "save_guests_file",
]

log = logging.getLogger("colabswarm.guests")

OWNER = "owner"
MAX_GUESTS = 64
HOUR_S = 3600.0
CONNECTED_S = 120.0   # a controller seen within this long is "connected"
_MAX_CONTROLLERS = 64
_MAX_REVOKED_ROWS = 64
_NAME_RE = re.compile(GUEST_NAME_PATTERN)
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]{16,256}$")


@dataclass(frozen=True)
class Who:
    """The holder of a request's token."""

    name: str                          # "owner" or the guest's name
    role: str                          # "owner" | "guest"
    limits: GuestLimits | None = None  # a guest's
    # what the worker's per-token caches are keyed by: one token's own (a guest revoked and
    # added again under its name with a new token starts afresh); never leaves the process
    scope: str = field(default=OWNER, compare=False)

    @property
    def is_owner(self) -> bool:
        return self.role == "owner"


OWNER_WHO = Who(OWNER, "owner")


@dataclass(frozen=True, repr=False)
class _Entry:
    who: Who
    digest: bytes
    token: str

    def __repr__(self) -> str:
        return f"_Entry({self.who.name!r}, token={mask_token(self.token)!r})"


def _digest(token: bytes | str) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def check_guest_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidRequest(
            f"A guest's name must be 1-32 letters, digits, '.', '-' or '_', starting with a "
            f"letter or digit (got {str(name)[:40]!r}).")
    if name.lower() == OWNER:
        raise InvalidRequest("'owner' is the worker's owner; give the guest another name.")
    return name


class TokenBook:
    """The tokens a worker takes: the owner's and the guests'. Thread-safe; reads take no
    lock (the entries are an immutable tuple swapped on each change)."""

    def __init__(self, owner_token: str, path: str | Path | None = None) -> None:
        self._owner = _Entry(OWNER_WHO, _digest(owner_token), owner_token)
        self._entries: tuple[_Entry, ...] = (self._owner,)
        self._lock = threading.Lock()
        self._ever: set[str] = {owner_token}  # every token this worker took: masked in logs
        self.path = Path(path) if path is not None else None
        if self.path is not None and self.path.exists():
            for name, token, limits in load_guests_file(self.path):
                self._put(name, token, limits)

    def __repr__(self) -> str:
        owner = mask_token(self._owner.token)
        return f"TokenBook({len(self._entries) - 1} guests, owner={owner!r})"

    # ----- the gate's question ---------------------------------------------------------------
    def identify(self, given: bytes) -> Who | None:
        """Who holds `given`, or None. Constant time in the secrets: the presented token is
        hashed once and compared with every entry's digest, all of them, every time."""
        digest = _digest(given)
        found: Who | None = None
        for entry in self._entries:
            match = hmac.compare_digest(digest, entry.digest)
            found = entry.who if match else found
        return found

    # ----- the owner's changes ---------------------------------------------------------------
    def add(self, name: str, limits: GuestLimits | None = None, token: str | None = None) -> str:
        """A new guest; returns its token. Refuses a name that is taken."""
        name = check_guest_name(name)
        limits = limits or GuestLimits()
        with self._lock:
            if any(e.who.name.lower() == name.lower() for e in self._entries):
                raise InvalidRequest(
                    f"There is already a guest named {name!r}: revoke it first, change its "
                    "limits with update_guest, or pick another name.")
            if len(self._entries) - 1 >= MAX_GUESTS:
                raise InvalidRequest(f"A worker takes at most {MAX_GUESTS} guests; revoke one "
                                     "first.")
            token = token or new_token()
            if not _TOKEN_RE.match(token):
                raise InvalidRequest("A guest token must be 16-256 letters, digits, '-' or '_'.")
            self._put(name, token, limits)
            self._save()
        return token

    def update(self, name: str, limits: GuestLimits) -> None:
        with self._lock:
            entry = self._find(name)
            self._entries = tuple(
                _Entry(Who(e.who.name, "guest", limits, e.who.scope), e.digest, e.token)
                if e is entry else e
                for e in self._entries)
            self._save()

    def revoke(self, name: str) -> bool:
        """Take a guest's token back; False if there is no such guest."""
        with self._lock:
            try:
                entry = self._find(name)
            except ColabSwarmError:
                return False
            self._entries = tuple(e for e in self._entries if e is not entry)
            self._save()
            return True

    # ----- the owner's reading ---------------------------------------------------------------
    def guests(self) -> list[Who]:
        return [e.who for e in self._entries if not e.who.is_owner]

    def guest(self, name: str) -> Who:
        return self._find(name).who

    def token_of(self, name: str) -> str:
        """A guest's token (for its share string): only the owner's code asks this."""
        return self._find(name).token

    def known_tokens(self) -> list[str]:
        """Every token this worker took, revoked ones too (the log masks them all)."""
        return sorted(self._ever, key=len, reverse=True)

    # ----- internals -------------------------------------------------------------------------
    def _find(self, name: str) -> _Entry:
        for e in self._entries:
            if not e.who.is_owner and e.who.name == name:
                return e
        raise ColabSwarmError(
            f"No guest named {str(name)[:40]!r}; the guests are "
            f"{[w.name for w in self.guests()][:20]}.", kind=ErrorKind.NOT_FOUND)

    def _put(self, name: str, token: str, limits: GuestLimits) -> None:
        if hmac.compare_digest(_digest(token), self._owner.digest):
            raise InvalidRequest(f"Guest {name!r} cannot have the owner's token.")
        digest = _digest(token)
        self._entries = (*self._entries, _Entry(Who(name, "guest", limits, digest.hex()[:32]),
                                                digest, token))
        self._ever.add(token)

    def _save(self) -> None:
        if self.path is not None:
            save_guests_file(self.path, [(e.who.name, e.token, e.who.limits or GuestLimits())
                                         for e in self._entries if not e.who.is_owner])


# ----- the guests file ----------------------------------------------------------------------
class _StoredGuest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=GUEST_NAME_PATTERN)
    token: str = Field(pattern=r"^[A-Za-z0-9_\-]{16,256}$", repr=False)
    limits: GuestLimits = Field(default_factory=GuestLimits)


class _GuestsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    colabswarm_guests: int = 1
    guests: list[_StoredGuest] = Field(default_factory=list, max_length=MAX_GUESTS)


def load_guests_file(path: str | Path) -> list[tuple[str, str, GuestLimits]]:
    """The guests kept in `path`; refuses a file other users could read or change."""
    path = Path(path)
    try:
        st = path.stat()
        if os.name == "posix" and st.st_mode & 0o077:
            raise ColabSwarmError(
                f"The guests file {path} can be read or changed by other users (mode "
                f"{st.st_mode & 0o777:03o}); it holds guests' tokens. Run `chmod 600 {path}` "
                "and start the worker again.")
        if os.name == "posix" and st.st_uid != os.getuid():
            raise ColabSwarmError(
                f"The guests file {path} belongs to another user (uid {st.st_uid}); use a "
                "file of your own.")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ColabSwarmError(f"Cannot read the guests file {path} ({exc.strerror}); fix it or "
                              "name another file.") from None
    try:
        stored = _GuestsFile.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ColabSwarmError(
            f"The guests file {path} is not one colabswarm wrote ({where}: {first.get('msg')}); "
            "move it away and add the guests again.") from None
    return [(g.name, g.token, g.limits) for g in stored.guests]


def save_guests_file(path: str | Path, guests: list[tuple[str, str, GuestLimits]]) -> None:
    """Write the guests atomically with mode 0600: a temporary file in the same folder,
    flushed to disk, then renamed over the old one."""
    path = Path(path)
    data = _GuestsFile(guests=[_StoredGuest(name=n, token=t, limits=lim)
                               for n, t, lim in guests]).model_dump_json(indent=1)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)  # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ----- limits (pure) ------------------------------------------------------------------------
def effective_limits(limits: Limits, guest: GuestLimits | None) -> Limits:
    """The limits a token works under: the worker's, tightened by a guest's own. A guest's
    /v1/info publishes these, so its controller plans jobs that fit."""
    if guest is None:
        return limits
    per_job = [limits.max_images, guest.max_images, guest.images_per_hour]
    return limits.model_copy(update={
        "max_pixels": min(limits.max_pixels, guest.max_pixels or limits.max_pixels),
        "max_steps": min(limits.max_steps, guest.max_steps or limits.max_steps),
        "max_images": min(v for v in per_job if v is not None),
        "max_queue": min(limits.max_queue, guest.max_queued),
    })


def hour_window(accepted: list[tuple[float, int]], now: float) -> tuple[int, float | None]:
    """(images accepted in the hour before `now`, when the oldest of them stops counting)."""
    inside = [(t, n) for t, n in accepted if now - t < HOUR_S]
    return sum(n for _, n in inside), (min(t for t, _ in inside) + HOUR_S if inside else None)


def _free_at(accepted: list[tuple[float, int]], now: float, need: int, limit: int) -> float:
    """When `need` more images fit under `limit` per rolling hour: the moment enough of the
    hour's images have aged out (monotonic seconds)."""
    inside = sorted((t, n) for t, n in accepted if now - t < HOUR_S)
    used = sum(n for _, n in inside)
    for t, n in inside:
        if used + need <= limit:
            break
        used -= n
        if used + need <= limit:
            return t + HOUR_S
    return now


def _clock(mono_at: float, now_mono: float, now_wall: float) -> str:
    wall = datetime.fromtimestamp(now_wall + (mono_at - now_mono), UTC)
    return wall.strftime("%H:%M:%S UTC")


def _fixed(what: str) -> str:
    return (f"{what} This limit is set by the worker's owner for this token and does not reset "
            "with time; ask the owner to raise it.")


def guest_refusal(who: Who, req: JobRequest, *, queued: int,
                  accepted: list[tuple[float, int]], now: float, now_wall: float,
                  next_slot_s: float) -> ColabSwarmError | None:
    """Why a guest may not queue `req` now (which limit, and when it resets), or None.

    `queued`: the guest's jobs waiting or running; `accepted`: (monotonic time, images) of its
    jobs in the last hour that count against images_per_hour; `next_slot_s`: when the running
    job should be done (for a full queue's retry time)."""
    lim = who.limits
    if who.is_owner or lim is None:
        return None
    n = len(req.seeds)
    tag = f"Guest token {who.name!r}:"
    if req.kind != "upscale":
        pixels = req.width * req.height
        if lim.max_pixels is not None and pixels > lim.max_pixels:
            side = int(lim.max_pixels ** 0.5) // 8 * 8
            return InvalidRequest(_fixed(
                f"{tag} {req.width}x{req.height} is {pixels} pixels, over its limit max_pixels "
                f"{lim.max_pixels} (e.g. {side}x{side})."))
        if lim.max_steps is not None and req.steps > lim.max_steps:
            return InvalidRequest(_fixed(
                f"{tag} {req.steps} steps is over its limit max_steps {lim.max_steps}."))
    if lim.max_images is not None and n > lim.max_images:
        return InvalidRequest(_fixed(
            f"{tag} {n} images in one job is over its limit max_images {lim.max_images}; "
            "split them into smaller jobs."))
    if lim.images_per_hour is not None:
        if n > lim.images_per_hour:
            return InvalidRequest(_fixed(
                f"{tag} {n} images in one job is over its limit images_per_hour "
                f"{lim.images_per_hour}; send at most {lim.images_per_hour} per job."))
        used, _ = hour_window(accepted, now)
        if used + n > lim.images_per_hour:
            at = _free_at(accepted, now, n, lim.images_per_hour)
            wait = max(1.0, at - now)
            return Busy(
                f"{tag} its limit images_per_hour {lim.images_per_hour} is used up ({used} "
                f"images in the last hour; this job asks for {n}). It resets as the hour rolls "
                f"on: {n} more fit from {_clock(at, now, now_wall)}, in {_minutes(wait)}. "
                "Images already made are kept; collect them meanwhile.",
                kind=ErrorKind.RATE_LIMITED, retry_after_s=round(wait, 1))
    if queued >= lim.max_queued:
        return Busy(
            f"{tag} it has {queued} jobs waiting or running, its limit max_queued "
            f"{lim.max_queued}. A place frees when one of them finishes (in about "
            f"{_minutes(next_slot_s)}); retry then.",
            kind=ErrorKind.QUEUE_FULL, retry_after_s=round(max(1.0, next_slot_s), 1))
    return None


def _minutes(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60} s"


# ----- who used the GPU ---------------------------------------------------------------------
@dataclass
class _Row:
    role: str
    images: int = 0
    jobs: int = 0
    gpu_seconds: float = 0.0
    last_seen: float | None = None   # wall clock
    revoked: bool = False
    window: dict[str, tuple[float, int]] = field(default_factory=dict)  # job id -> (t, n)


@dataclass
class _Seen:
    token: str
    last_seen: float       # wall clock
    last_mono: float
    requests: int = 0


class Usage:
    """Per token: images, GPU seconds, last seen, the rolling hour's images; and the
    controllers seen lately. Thread-safe (the gate and the engine thread both write)."""

    def __init__(self) -> None:
        self._rows: dict[str, _Row] = {OWNER: _Row("owner")}
        self._seen: OrderedDict[tuple[str, str], _Seen] = OrderedDict()
        self._lock = threading.Lock()

    def _row(self, name: str, role: str = "guest") -> _Row:
        row = self._rows.get(name)
        if row is None or (row.revoked and role == "guest"):
            row = self._rows[name] = _Row(role)
        return row

    def seen(self, who: Who, client: str, now_wall: float, now_mono: float) -> None:
        """An authenticated request from `who` through controller `client`."""
        with self._lock:
            self._row(who.name, who.role).last_seen = now_wall
            key = (who.name, client)
            s = self._seen.pop(key, None) or _Seen(who.name, now_wall, now_mono)
            s.last_seen, s.last_mono = now_wall, now_mono
            s.requests += 1
            self._seen[key] = s
            while len(self._seen) > _MAX_CONTROLLERS:
                self._seen.popitem(last=False)

    def accepted(self, who: Who, job_id: str, images: int, now: float) -> None:
        with self._lock:
            self._row(who.name, who.role).window[job_id] = (now, images)

    def ended(self, name: str, job_id: str, made: int, gpu_seconds: float,
              now: float) -> None:
        """A job ended: count what it made; images it did not make stop counting against the
        hour (a failed or interrupted job costs its guest nothing)."""
        with self._lock:
            row = self._rows.get(name)
            if row is None:
                return
            row.jobs += 1
            row.images += made
            row.gpu_seconds += max(0.0, gpu_seconds)
            if made == 0:
                row.window.pop(job_id, None)
            for jid in [j for j, (t, _) in row.window.items() if now - t >= HOUR_S]:
                del row.window[jid]

    def revoked(self, name: str) -> None:
        with self._lock:
            if name in self._rows:
                self._rows[name].revoked = True
            revoked = [n for n, r in self._rows.items() if r.revoked]
            for n in revoked[:-_MAX_REVOKED_ROWS]:
                del self._rows[n]
            for key in [k for k in self._seen if k[0] == name]:
                del self._seen[key]

    def hour(self, name: str) -> list[tuple[float, int]]:
        with self._lock:
            row = self._rows.get(name)
            return list(row.window.values()) if row is not None else []

    def quota(self, who: Who, now: float, now_wall: float) -> GuestQuota | None:
        if who.limits is None:
            return None
        used, oldest_out = hour_window(self.hour(who.name), now)
        return GuestQuota(
            name=who.name, limits=who.limits, images_last_hour=used,
            next_free_at=None if oldest_out is None else now_wall + (oldest_out - now))

    def rows(self, guests: list[Who], queued: dict[str, int], weights: dict[str, float],
             now: float, only: str | None = None) -> list[TokenUsage]:
        """The owner's view (every token, revoked ones last), or one token's (`only`)."""
        limits = {g.name: g.limits for g in guests}
        with self._lock:
            for g in guests:
                self._row(g.name)
            out = []
            for name, r in self._rows.items():
                if only is not None and name != only:
                    continue
                used, _ = hour_window(list(r.window.values()), now)
                out.append(TokenUsage(
                    name=name, role=r.role, revoked=r.revoked, images=r.images, jobs=r.jobs,
                    gpu_seconds=round(r.gpu_seconds, 3), last_seen=r.last_seen,
                    queued=queued.get(name, 0) if not r.revoked else 0,
                    images_last_hour=used, weight=weights.get(name, 1.0),
                    limits=limits.get(name)))
        out.sort(key=lambda u: (u.revoked, u.role != "owner"))
        return out

    def controllers(self, now_mono: float) -> list[ControllerSeen]:
        with self._lock:
            return [ControllerSeen(token=s.token, client=client, last_seen=s.last_seen,
                                   requests=s.requests)
                    for (_, client), s in reversed(self._seen.items())
                    if now_mono - s.last_mono <= CONNECTED_S]

