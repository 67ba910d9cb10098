"""One exception hierarchy, and the error kinds that every decision reads instead of messages.

Every exception colabswarm raises on purpose is a ``ColabSwarmError`` with a ``kind`` (an
``ErrorKind``): the controller, the widgets and the tests decide on the kind and the fields,
never on the text, which is for people (what happened and what to do next). The worker sends
the same kinds over the wire (``protocol.ErrorDetail.kind``, ``JobStatus.error_kind``);
``protocol.STATUS_OF_KIND`` is the one table between kinds and HTTP statuses.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "AuthError",
    "BackendUnavailable",
    "BadShareString",
    "Busy",
    "ColabSwarmError",
    "ErrorKind",
    "Forbidden",
    "InvalidRequest",
    "JobFailed",
    "JobInterrupted",
    "ModelNotAvailable",
    "TunnelError",
    "WorkerMisbehaved",
]


class ErrorKind(StrEnum):
    """What went wrong, for machines. The values travel on the wire: never rename one."""

    # the request itself: retrying the same request elsewhere or later does not help
    BAD_SHARE = "bad_share"              # a share string or address that cannot be read
    INVALID = "invalid"                  # a parameter refused (over a limit, malformed)
    TOO_LARGE = "too_large"              # a body over the worker's byte cap
    MODEL_NOT_AVAILABLE = "model_not_available"  # the worker does not serve that model/LoRA/..
    UNAUTHORIZED = "unauthorized"        # missing, wrong or revoked token
    FORBIDDEN = "forbidden"              # the token is valid but its role may not do this
    NOT_FOUND = "not_found"              # no such job or upload (collected, expired, never)
    NOT_READY = "not_ready"              # the job has no images yet
    # transient: the same request may succeed later (the worker says when, if it knows)
    QUEUE_FULL = "queue_full"            # the worker's queue is full (HTTP 429 + Retry-After)
    RATE_LIMITED = "rate_limited"        # a guest token's quota is used up until a reset time
    LOADING = "loading"                  # the model is still loading or compiling
    UNREACHABLE = "unreachable"          # no connection, a timeout, or a tunnel error page
    # the worker or its GPU failed the job
    MODEL_FAILED = "model_failed"        # the worker's model failed to load
    OUT_OF_MEMORY = "out_of_memory"      # the GPU ran out of memory on this job
    INTERRUPTED = "interrupted"          # stopped on purpose between two steps
    CRASH = "crash"                      # anything else that failed inside the worker
    # the controller's own verdicts
    MISBEHAVED = "misbehaved"            # the worker sent what no honest worker sends
    TUNNEL = "tunnel"                    # a tunnel could not be opened or died

    @property
    def transient(self) -> bool:
        return self in _TRANSIENT


_TRANSIENT = frozenset({ErrorKind.QUEUE_FULL, ErrorKind.RATE_LIMITED, ErrorKind.LOADING,
                        ErrorKind.UNREACHABLE})


class ColabSwarmError(Exception):
    """Base of every error colabswarm raises on purpose: a message for people, a kind for
    code. Subclasses set a default kind; a raiser may give a more precise one."""

    default_kind: ErrorKind = ErrorKind.CRASH

    def __init__(self, message: str = "", *, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        self.kind: ErrorKind = ErrorKind(kind) if kind is not None else self.default_kind


class BadShareString(ColabSwarmError, ValueError):
    """A share string or worker address could not be understood."""

    default_kind = ErrorKind.BAD_SHARE


class AuthError(ColabSwarmError):
    """The worker refused the token (missing, wrong, or revoked)."""

    default_kind = ErrorKind.UNAUTHORIZED


class Forbidden(AuthError):
    """The worker knows the token, but its role may not do this (a guest token asking for an
    owner's action)."""

    default_kind = ErrorKind.FORBIDDEN


class BackendUnavailable(ColabSwarmError):
    """A worker could not be reached, or answered with something that is not a worker."""

    default_kind = ErrorKind.UNREACHABLE


class Busy(BackendUnavailable):
    """The worker refused for now (queue full, quota used up, model still loading); the same
    request may succeed after ``retry_after_s`` seconds (None: the worker did not say)."""

    default_kind = ErrorKind.QUEUE_FULL

    def __init__(self, message: str = "", *, kind: ErrorKind | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, kind=kind)
        self.retry_after_s = retry_after_s


class WorkerMisbehaved(BackendUnavailable):
    """The worker answered, but with something no honest worker sends: a malformed status, a
    story about a job that does not hang together, or an image that is not the one asked for.
    Unlike a dropped connection, retrying soon is unlikely to help: the controller quarantines
    it."""

    default_kind = ErrorKind.MISBEHAVED


class InvalidRequest(ColabSwarmError, ValueError):
    """The worker (or the controller, before sending) refused the parameters of a job."""

    default_kind = ErrorKind.INVALID


class ModelNotAvailable(InvalidRequest):
    """No worker has the model (or LoRA, sampler, upscaler) a job asks for."""

    default_kind = ErrorKind.MODEL_NOT_AVAILABLE


class JobFailed(ColabSwarmError):
    """A job could not be finished, even after retries on other workers."""

    default_kind = ErrorKind.CRASH


class JobInterrupted(ColabSwarmError):
    """A job was stopped on purpose (interrupt) before it finished."""

    default_kind = ErrorKind.INTERRUPTED


class TunnelError(ColabSwarmError):
    """A tunnel could not be opened or has died."""

    default_kind = ErrorKind.TUNNEL
