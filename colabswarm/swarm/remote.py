"""Remote management of one backend from the controller: its owner's actions over the wire.

``swarm.backend("name")`` returns a ``BackendRemote``: read the worker's recent log lines, free
its GPU memory, interrupt every job on it, and see or manage its guests. These are the owner's
routes: they work when the backend was added with the worker's admin token (its own share
string); with a guest's token the worker refuses, and the call raises ``Forbidden`` (kind
``forbidden``) with the worker's reason.

Everything read is bounded and cleaned by the client (``WorkerClient``: capped answers, schema
checks, ``clean_text`` on every line). The calls run on the swarm's event loop (its
connections live there): each sync method is a thin wrapper over its async twin.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..backend.client import WorkerClient
from ..protocol import GuestGrant, LogLine, TokenUsage, encode_share, make_guest_limits

__all__ = ["BackendRemote"]

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, Any]], Any]


@dataclass(repr=False)
class BackendRemote:
    """The owner's controls of one backend. `run`/`arun` carry a coroutine onto the swarm's
    loop (the swarm hands them in; this module does not know the swarm)."""

    name: str
    client: WorkerClient = field(repr=False)
    run: Runner = field(repr=False)
    arun: Runner = field(repr=False)

    def __repr__(self) -> str:
        return f"BackendRemote({self.name!r})"

    # ----- log -------------------------------------------------------------------------------
    async def alogs(self, lines: int = 200) -> list[LogLine]:
        """The worker's most recent log lines (at most 500), oldest first, tokens masked."""
        return await self.arun(self.client.logs(lines))

    def logs(self, lines: int = 200) -> list[LogLine]:
        return self.run(self.alogs(lines))

    async def alog_text(self, lines: int = 200) -> str:
        """The same lines as text: `HH:MM:SS LEVEL message` per line."""
        return format_lines(await self.alogs(lines))

    def log_text(self, lines: int = 200) -> str:
        return self.run(self.alog_text(lines))

    # ----- GPU -------------------------------------------------------------------------------
    async def afree(self) -> bool:
        """Ask the worker to free GPU memory (caches, the upscaled sources it keeps): True if
        it did, False if it will right after the job in flight."""
        return await self.arun(self.client.free())

    def free(self) -> bool:
        return self.run(self.afree())

    async def ainterrupt(self) -> int:
        """Stop every job on the worker, every controller's and guest's; returns how many it
        stopped. This swarm's own images that were on it are made again (there or
        elsewhere)."""
        return await self.arun(self.client.interrupt_all())

    def interrupt(self) -> int:
        return self.run(self.ainterrupt())

    # ----- guests ----------------------------------------------------------------------------
    async def ausage(self) -> list[TokenUsage]:
        """Who used the GPU: one row per token (the owner's, each guest's, revoked ones)."""
        return await self.arun(self.client.guests())

    def usage(self) -> list[TokenUsage]:
        return self.run(self.ausage())

    async def aadd_guest(self, name: str, *, images_per_hour: int | None = None,
                         max_pixels: int | None = None, max_steps: int | None = None,
                         max_images: int | None = None, max_queued: int = 16,
                         weight: float = 1.0) -> str:
        """A new guest on that worker; returns the guest's share string."""
        limits = make_guest_limits(images_per_hour=images_per_hour, max_pixels=max_pixels,
                                   max_steps=max_steps, max_images=max_images,
                                   max_queued=max_queued, weight=weight)
        grant: GuestGrant = await self.arun(self.client.add_guest(name, limits))
        return encode_share(self.client.url, grant.token)

    def add_guest(self, name: str, *, images_per_hour: int | None = None,
                  max_pixels: int | None = None, max_steps: int | None = None,
                  max_images: int | None = None, max_queued: int = 16,
                  weight: float = 1.0) -> str:
        return self.run(self.aadd_guest(
            name, images_per_hour=images_per_hour, max_pixels=max_pixels, max_steps=max_steps,
            max_images=max_images, max_queued=max_queued, weight=weight))

    async def arevoke(self, name: str) -> None:
        """Take a guest's token back on that worker (its next request gets 401)."""
        await self.arun(self.client.revoke_guest(name))

    def revoke(self, name: str) -> None:
        self.run(self.arevoke(name))


def format_lines(lines: list[LogLine]) -> str:
    import time

    return "\n".join(f"{time.strftime('%H:%M:%S', time.localtime(ln.t))} {ln.level:<7} "
                     f"{ln.message}" for ln in lines)
