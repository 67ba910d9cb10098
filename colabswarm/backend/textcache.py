"""The pipelines' prompt encodings for recent prompts, per loaded model: a repeated prompt is
not encoded again.

A swarm run is mostly one prompt: the controller splits N images of it into many jobs, and a
worker encodes the same prompt and negative prompt for every one of them. On a compiled worker
that encoding is what is left outside the compiled graphs: SD 1.5's two CLIP passes take about
17 ms of a 160 ms batch-1 image on an H200, eager and bound by kernel launches
(docs/BENCHMARKS.md, "Where a compiled image's time goes"). ComfyUI skips a text-encode node
whose inputs did not change; this does the same for every diffusers pipeline the engine runs
(SD, SDXL with its two encoders, txt2img and img2img), by answering the pipeline's own
``encode_prompt`` call from memory when it comes with the same prompts and options as before.

It answers at ``encode_prompt``, not at the text encoders, so that a repeat does nothing on the
device but copy: no tokenizing, no token ids sent to the GPU, nothing read back to make a key.
Each of those copies waits for the GPU to finish the job before, which would stop the engine's
thread from queueing the next job behind it (inflight.py).

What it may answer, and why the answer is the same as encoding again:

- only calls made on the thread that opened ``serving`` (the engine's job);
- only jobs without LoRAs: the engine turns every adapter off for those, which is the encoder
  of the model as loaded; a LoRA job neither reads nor writes (its adapters change the encoder);
- only calls whose arguments are strings, numbers, booleans, None, devices and lists, tuples
  or dicts of those (a call given tensors, such as ready embeddings, is encoded); the key holds
  the job's token (``guests.Who.scope``: from the token's digest, "owner" for the owner) and
  every argument but the number of images per prompt. With the token in the key, a guest cannot
  learn from a faster job that someone else used a prompt lately; a swarm's jobs all come with
  one token;
- the encoding is kept for one image per prompt and repeated for the call's number, as the
  pipelines do it (each prompt's rows ``repeat(1, n, 1).view(b * n, ...)``, which is
  ``repeat_interleave(n, dim=0)``): so one batch size's encoding answers every other;
- only answers made of tensors, None and tuples of those, each kept and given out as a copy,
  so nothing a pipeline does to one reaches the next job.

One ``TextCache`` belongs to one loaded model and goes with it; the engine empties it when it
frees memory. It is bounded in bytes (the encodings live on the model's device) and in entries,
least recently used first out.
"""

from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["DEFAULT_CACHE_BYTES", "MAX_CACHE_MB", "TextCache"]

DEFAULT_CACHE_BYTES = 64 * 2**20  # SDXL keeps about 0.6 MB per prompt and negative prompt
MAX_CACHE_MB = 16384  # what an owner may give it (256 answers never need more)
_MAX_ENTRIES = 256
_PER_PROMPT = "num_images_per_prompt"


class _Uncacheable(Exception):
    """An argument the key cannot hold, or an answer the cache cannot copy: not kept."""


def _key_part(value: Any) -> Any:
    """What the key holds of one argument (plain values only: nothing is read off a device)."""
    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    if isinstance(value, torch.device):
        return ("device", str(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key_part(v) for v in value))
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return ("dict", tuple(sorted((k, _key_part(v)) for k, v in value.items())))
    raise _Uncacheable(type(value).__name__)


def _key(scope: str, arguments: dict[str, Any]) -> tuple[tuple, int]:
    """The key of one encode_prompt call (its token scope, every argument), and its bytes."""
    key = (scope, tuple(sorted((k, _key_part(v)) for k, v in arguments.items())))
    return key, len(repr(key))


def _copied(value: Any, per_prompt: int = 1) -> tuple[Any, int]:
    """A copy of an encoding (each tensor's rows repeated ``per_prompt`` times in place, as the
    pipelines repeat them; tuples rebuilt) and its bytes; _Uncacheable for anything else."""
    import torch

    if value is None:
        return None, 0
    if isinstance(value, torch.Tensor):
        out = value.repeat_interleave(per_prompt, dim=0) if per_prompt > 1 else value.clone()
        return out, out.numel() * out.element_size()
    if type(value) is tuple:
        parts = [_copied(v, per_prompt) for v in value]
        return tuple(c for c, _ in parts), sum(n for _, n in parts)
    raise _Uncacheable(type(value).__name__)


class TextCache:
    """Prompt encodings by (token scope, encode_prompt arguments), least recently used first
    out."""

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
        """For the length of one pipeline call on this thread, the pipeline's ``encode_prompt``
        answers repeated calls from the cache (nothing changes if not enabled). ``scope`` (the
        job's token) is part of every key: one token's prompts never answer another's."""
        encode = getattr(pipe, "encode_prompt", None)
        own = getattr(pipe, "__dict__", None)
        # absent, or replaced on this pipeline already: such a pipeline is not cached
        if (not enabled or self.max_bytes == 0 or encode is None or own is None
                or "encode_prompt" in own):
            yield
            return
        object.__setattr__(pipe, "encode_prompt",
                           self._wrap(scope, encode, threading.get_ident()))
        try:
            yield
        finally:
            pipe.__dict__.pop("encode_prompt", None)

    def _wrap(self, scope: str, encode: Any, job_thread: int) -> Any:
        signature = inspect.signature(encode)

        def cached_encode(*args: Any, **kw: Any) -> Any:
            if threading.get_ident() != job_thread:
                return encode(*args, **kw)
            try:
                bound = signature.bind(*args, **kw)
                per_prompt = bound.arguments.pop(_PER_PROMPT, 1)
                if type(per_prompt) is not int or per_prompt < 1:
                    raise _Uncacheable(repr(per_prompt))
                key, key_bytes = _key(scope, bound.arguments)
            except (TypeError, _Uncacheable):  # an argument the key cannot hold: encoded
                return encode(*args, **kw)
            with self._lock:
                found = self._entries.get(key)
                if found is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                else:
                    self.misses += 1
            if found is not None:
                return _copied(found[0], per_prompt)[0]
            if _PER_PROMPT in signature.parameters:
                bound.arguments[_PER_PROMPT] = 1  # kept for one image per prompt
            out = encode(*bound.args, **bound.kwargs)
            try:
                kept, size = _copied(out)
            except _Uncacheable:  # an answer the cache cannot copy (nor repeat): not kept; for
                # more than one image per prompt the call is made again as it came
                return out if per_prompt == 1 else encode(*args, **kw)
            self._put(key, kept, size + key_bytes)
            return out if per_prompt == 1 else _copied(out, per_prompt)[0]

        return cached_encode

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
