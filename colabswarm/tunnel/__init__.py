"""Publish a worker's local port: trycloudflare (default, no account), ngrok, or none.

    t = publish("cloudflare", 7801, token, deadline_s=60)  # opened AND checked, one deadline
    ...
    t.close()

or in two steps, ``open_tunnel(...)`` then ``await wait_until_reachable(t.public_url, token)``.
Every failure is a ``TunnelFailure`` (a ``TunnelError``) whose ``problem`` (a ``TunnelProblem``)
says why, for code; its message says what happened and what to do, for people, and never holds
a secret. A tunnel that died (``alive()`` is False) stays dead: open a new one (a new URL).
"""

from __future__ import annotations

from ..errors import TunnelError
from .base import (
    Tunnel,
    TunnelFailure,
    TunnelProblem,
    _Deadline,
    redact,
    remember_secret,
    wait_until_reachable,
)

__all__ = [
    "PROVIDERS",
    "Tunnel",
    "TunnelError",
    "TunnelFailure",
    "TunnelProblem",
    "open_tunnel",
    "publish",
    "redact",
    "remember_secret",
    "wait_until_reachable",
]

PROVIDERS = ("cloudflare", "ngrok", "none")


def open_tunnel(
    provider: str,
    port: int,
    *,
    host: str = "127.0.0.1",
    deadline_s: float = 60.0,
    authtoken: str | None = None,
) -> Tunnel:
    """Open a tunnel to host:port, or raise TunnelFailure (saying what to try) within deadline_s.

    authtoken is for ngrok; without it NGROK_AUTHTOKEN, then Colab secrets, are used.
    """
    name = (provider or "none").strip().lower()
    if name == "cloudflare":
        from .cloudflare import open_cloudflare

        return open_cloudflare(port, host=host, deadline_s=deadline_s)
    if name == "ngrok":
        from .ngrok import open_ngrok

        return open_ngrok(port, host=host, deadline_s=deadline_s, authtoken=authtoken)
    if name == "none":
        from .none import LocalTunnel

        return LocalTunnel(port, host=host)
    raise TunnelFailure(f"Unknown tunnel {provider!r}: use one of {', '.join(PROVIDERS)}.",
                        problem=TunnelProblem.UNKNOWN_PROVIDER, provider=str(provider))


def publish(
    provider: str,
    port: int,
    token: str,
    *,
    host: str = "127.0.0.1",
    deadline_s: float = 60.0,
    authtoken: str | None = None,
) -> Tunnel:
    """Open a tunnel to host:port and prove its URL leads to the worker with this token, both
    within ONE deadline of deadline_s (the check gets what opening left). Returns the open
    tunnel; on any failure (or an interrupt) the tunnel is closed and TunnelFailure raised.
    """
    from .._sync import run_sync

    deadline = _Deadline(deadline_s)
    remember_secret(token)
    tunnel = open_tunnel(provider, port, host=host, deadline_s=deadline_s, authtoken=authtoken)
    if tunnel.provider == "none":
        return tunnel
    opened_s = deadline.elapsed()
    try:
        # at least one attempt, even when opening used (nearly) all of the time
        run_sync(wait_until_reachable(tunnel.public_url, token,
                                      max(deadline.remaining(), 0.01)))
    except TunnelFailure as exc:
        tunnel.close()
        raise TunnelFailure(
            f"{exc} (Opening the tunnel took {opened_s:.1f} s of the {deadline_s:g} s deadline "
            "that covers the whole start.)",
            problem=exc.problem, provider=tunnel.provider, last_line=exc.last_line,
        ) from None
    except BaseException:
        tunnel.close()
        raise
    return tunnel
