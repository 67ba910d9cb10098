"""Publish a worker's local port: trycloudflare (default, no account), ngrok, or none.

    t = open_tunnel("cloudflare", 7801, deadline_s=60)
    info = await wait_until_reachable(t.public_url, token)   # proves the URL leads here
    ...
    t.close()

A tunnel that died (``alive()`` is False) stays dead: open a new one, which gets a new URL.
"""

from __future__ import annotations

from ..errors import TunnelError
from .base import Tunnel, wait_until_reachable

__all__ = ["PROVIDERS", "Tunnel", "TunnelError", "open_tunnel", "wait_until_reachable"]

PROVIDERS = ("cloudflare", "ngrok", "none")


def open_tunnel(
    provider: str,
    port: int,
    *,
    host: str = "127.0.0.1",
    deadline_s: float = 60.0,
    authtoken: str | None = None,
) -> Tunnel:
    """Open a tunnel to host:port, or raise TunnelError (saying what to try) within deadline_s.

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
    raise TunnelError(f"Unknown tunnel {provider!r}: use one of {', '.join(PROVIDERS)}.")
