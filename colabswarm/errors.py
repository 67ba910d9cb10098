"""One exception hierarchy: every message says what happened and what to do next."""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BackendUnavailable",
    "BadShareString",
    "ColabSwarmError",
    "InvalidRequest",
    "JobFailed",
    "JobInterrupted",
    "ModelNotAvailable",
    "TunnelError",
    "WorkerMisbehaved",
]


class ColabSwarmError(Exception):
    """Base of every error colabswarm raises on purpose."""


class BadShareString(ColabSwarmError, ValueError):
    """A share string or worker address could not be understood."""


class AuthError(ColabSwarmError):
    """The worker refused the token."""


class BackendUnavailable(ColabSwarmError):
    """A worker could not be reached, or answered with something that is not a worker."""


class WorkerMisbehaved(BackendUnavailable):
    """The worker answered, but with something no honest worker sends: a malformed status, a
    story about a job that does not hang together, or an image that is not the one asked for.
    Unlike a dropped connection, retrying soon is unlikely to help: the controller quarantines
    it."""


class InvalidRequest(ColabSwarmError, ValueError):
    """The worker (or the controller, before sending) refused the parameters of a job."""


class ModelNotAvailable(InvalidRequest):
    """No worker has the model a job asks for."""


class JobFailed(ColabSwarmError):
    """A job could not be finished, even after retries on other workers."""


class JobInterrupted(ColabSwarmError):
    """A job was stopped on purpose (interrupt) before it finished."""


class TunnelError(ColabSwarmError):
    """A tunnel could not be opened or has died."""
