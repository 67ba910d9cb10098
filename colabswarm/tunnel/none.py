"""tunnel='none': no process, the worker's own address is the one to share.

For a controller on the same machine or network (Runpod exposed ports, a LAN, SSH forwarding).
"""

from __future__ import annotations

from .base import Tunnel, _tunnel_target

__all__ = ["LocalTunnel"]


class LocalTunnel(Tunnel):
    """The worker's local URL, alive until closed."""

    provider = "none"

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.public_url = f"http://{_tunnel_target(host, port)}"
        self._closed = False

    def alive(self) -> bool:
        return not self._closed

    def close(self) -> None:
        self._closed = True
