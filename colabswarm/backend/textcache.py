"""The text encoders' outputs for recent prompts, per loaded model: a repeated prompt is not
encoded again.

A swarm run is mostly one prompt: the controller splits N images of it into many jobs, and a
worker encodes the same prompt and negative prompt for every one of them. On a compiled worker
that encoding is what is left outside the compiled graphs: SD 1.5's two CLIP passes take about
17 ms of a 160 ms batch-1 image on an H200, eager and bound by kernel launches
(docs/BENCHMARKS.md, "Where a compiled image's time goes"). ComfyUI skips a text-encode node
whose inputs did not change; this does the same below the pipeline, for every diffusers
pipeline the engine runs (SD, SDXL's two encoders, txt2img and img2img), by answering a text
encoder's call from memory when it is called with the same token ids and options as before.

What it may answer, and why the answer is the same as encoding again:

- only calls made on the thread that opened ``serving`` (the engine's job): another thread
  using the same encoder objects meanwhile (the compile thread shares them) is answered by the
  encoder;
- only jobs without LoRAs: the engine turns every adapter off for those, which is the encoder
  of the model as loaded; a LoRA job neither reads nor writes (its adapters change the encoder);
- only calls whose arguments are tensors, numbers, strings, booleans or None; the key holds the
  job's token (``guests.Who.scope``: from the token's digest, "owner" for the owner), the
  encoder's slot, every tensor's shape, dtype and bytes and every other value. With the token
  in the key, a guest cannot learn from a faster job that someone else used a prompt lately;
  a swarm's jobs all come with one token;
- only answers made of tensors, tuples and transformers' output objects, each kept and given
  out as a copy (``clone``), so nothing a pipeline does to one reaches the next job.

One ``TextCache`` belongs to one loaded model and goes with it; the engine empties it when it
frees memory. It is bounded in bytes (the outputs, hidden states included, live on the model's
device) and in entries, least recently used first out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["DEFAULT_CACHE_BYTES", "ENCODER_SLOTS", "MAX_CACHE_MB", "TextCache"]

DEFAULT_CACHE_BYTES = 64 * 2**20  # SDXL's two encoders keep about 8 MB per prompt
MAX_CACHE_MB = 16384  # what an owner may give it (256 answers never need more)
ENCODER_SLOTS = ("text_encoder", "text_encoder_2")
_MAX_ENTRIES = 256


class _Uncacheable(Exception):
    """An argument the key cannot hold, or an answer the cache cannot copy: not kept."""


def _key_part(value: Any) -> tuple[Any, int]:
    """What the key holds of one argument, and its bytes."""
    import torch

    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().numpy().tobytes()
        return ("tensor", tuple(value.shape), str(value.dtype), data), len(data)
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value), 0
    raise _Uncacheable(type(value).__name__)


def _key(where: tuple[str, str], args: tuple, kw: dict[str, Any]) -> tuple[tuple, int]:
    """The key of one encoder call (its token scope and slot, every argument), and its bytes."""
    pos = [_key_part(a) for a in args]
    named = sorted((k, _key_part(v)) for k, v in kw.items())
    key = (where, tuple(p for p, _ in pos), tuple((k, p) for k, (p, _) in named))
    return key, sum(n for _, n in pos) + sum(n for _, (_, n) in named)


def _copied(value: Any) -> tuple[Any, int]:
    """A copy of an encoder output (tensors cloned, tuples and transformers' output objects
    rebuilt) and its bytes; _Uncacheable for anything else but None."""
    import torch

    if value is None:
        return None, 0
    if isinstance(value, torch.Tensor):
        return value.clone(), value.numel() * value.element_size()
    if type(value) is tuple:
        parts = [_copied(v) for v in value]
        return tuple(c for c, _ in parts), sum(n for _, n in parts)
    if any(c.__name__ == "ModelOutput" for c in type(value).__mro__):
        fields = {k: _copied(value[k]) for k in value.keys()}
        return (type(value)(**{k: c for k, (c, _) in fields.items()}),
                sum(n for _, n in fields.values()))
    raise _Uncacheable(type(value).__name__)


class TextCache:
    """Text-encoder outputs by (slot, arguments), least recently used first out."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be 0 (off) or more, not {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._entries),
                    "bytes": self._bytes, "max_bytes": self.max_bytes}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @contextmanager
    def serving(self, pipe: Any, scope: str, enabled: bool = True) -> Iterator[None]:
        """For the length of one pipeline call on this thread, the pipeline's text encoders
        answer repeated calls from the cache (nothing changes if not enabled). ``scope`` (the
        job's token) is part of every key: one token's prompts never answer another's."""
        if not enabled or self.max_bytes == 0:
            yield
            return
        job_thread = threading.get_ident()
        undo = []
        try:
            for slot in ENCODER_SLOTS:
                enc = getattr(pipe, slot, None)
                # absent, or its forward replaced already (accelerate's hooks of a model spread
                # over devices do that): such an encoder is not cached
                if enc is None or "forward" in enc.__dict__:
                    continue
                object.__setattr__(enc, "forward",
                                   self._wrap((scope, slot), enc.forward, job_thread))
                undo.append(enc)
            yield
        finally:
            for enc in undo:
                enc.__dict__.pop("forward", None)

    def _wrap(self, where: tuple[str, str], forward: Any, job_thread: int) -> Any:
        def cached_forward(*args: Any, **kw: Any) -> Any:
            if threading.get_ident() != job_thread:
                return forward(*args, **kw)
            try:
                key, key_bytes = _key(where, args, kw)
            except Exception:  # noqa: BLE001 - any argument the key cannot hold: not cached
                return forward(*args, **kw)
            with self._lock:
                found = self._entries.get(key)
                if found is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                else:
                    self.misses += 1
            if found is not None:
                return _copied(found[0])[0]
            out = forward(*args, **kw)
            try:
                kept, size = _copied(out)
            except _Uncacheable:  # an answer of a kind the cache cannot copy: not kept
                return out
            self._put(key, kept, size + key_bytes)
            return out

        return cached_forward

    def _put(self, key: tuple, value: Any, size: int) -> None:
        with self._lock:
            if size > self.max_bytes:
                return
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes or len(self._entries) > _MAX_ENTRIES:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
