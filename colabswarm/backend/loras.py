"""The LoRA files a worker's owner offers: found, checked and hashed once at start.

A LoRA is named by its file stem (as A1111 names it in ``<lora:name:0.8>``) and identified by
the hash A1111 writes into "Lora hashes": SHA-256 of the safetensors file after its header
(kohya's "addnet" hash, A1111's ``hashes.sha256(..., use_addnet_hash=True)``), so editing a
file's metadata does not change it and readers of A1111's PNGs agree with ours. Workers
advertise the full 64 hex digits; A1111 writes the first 12 (``SHORT_HASH``), which a job may
give instead.

Only ``.safetensors`` files are read, and only their header here (no tensor is loaded until a
job asks for the LoRA): pickle formats (.ckpt, .pt, .bin, ...) can run code when loaded and are
refused.

Hashing reads every byte (a folder of 50 LoRAs is several GB), so hashes are kept in
``<cache>/lora-hashes.json`` by path, size and modification time, as A1111 keeps its own: a
restarted worker rehashes only files that changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidRequest
from ..protocol import LORA_NAME_PATTERN, MAX_LORA_NAME, MAX_LORAS_OFFERED
from .tiny import cache_root

__all__ = ["SHORT_HASH", "LoraFile", "addnet_hash", "find_loras"]

log = logging.getLogger("colabswarm.loras")

SHORT_HASH = 12  # hex digits A1111 writes in "Lora hashes"
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on a header
_NAME_RE = re.compile(LORA_NAME_PATTERN)
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_CACHE_FILE = "lora-hashes.json"
_CACHE_ENTRIES = 10_000


@dataclass(frozen=True)
class LoraFile:
    """One LoRA on this worker: its name, file and content hash (64 hex digits)."""

    name: str
    path: Path
    hash: str

    def matches(self, wanted: str) -> bool:
        """A job's hash: the full one, or at least A1111's 12-digit short hash of it."""
        return len(wanted) >= SHORT_HASH and self.hash.startswith(wanted.lower())


def _header_size(path: Path) -> int:
    """Check a file is a safetensors file (8-byte length, then a JSON header) and return the
    header's length; InvalidRequest saying what is wrong otherwise."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InvalidRequest(f"LoRA file {str(path)!r} is too short to be .safetensors.")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise InvalidRequest(f"LoRA file {str(path)!r} is not a valid .safetensors file.")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise InvalidRequest(f"Cannot read LoRA file {str(path)!r} ({exc.strerror}).") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(
            f"LoRA file {str(path)!r} is not a valid .safetensors file (unreadable header)."
        ) from None
    if not isinstance(header, dict) or not any(k != "__metadata__" for k in header):
        raise InvalidRequest(f"LoRA file {str(path)!r} holds no tensors.")
    return n


def addnet_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a safetensors file's bytes after its header: A1111's LoRA hash."""
    path = Path(path)
    n = _header_size(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _HashCache:
    """Known hashes by (absolute path, size, mtime in ns); a file that cannot be read or
    written just means hashing again."""

    def __init__(self) -> None:
        self.path = cache_root() / _CACHE_FILE
        self.known: dict[str, str] = {}
        self.changed = False
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                self.known = {k: v for k, v in data.items()
                              if isinstance(k, str) and isinstance(v, str) and _HASH_RE.match(v)}
        except (OSError, ValueError):
            pass

    @staticmethod
    def _key(path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def hash(self, path: Path) -> str:
        _header_size(path)  # a known file must still be a valid one
        key = self._key(path)
        found = self.known.get(key)
        if found is None:
            found = self.known[key] = addnet_hash(path)
            self.changed = True
        return found

    def save(self) -> None:
        if not self.changed:
            return
        entries = dict(list(self.known.items())[-_CACHE_ENTRIES:])
        tmp = self.path.with_name(f"{_CACHE_FILE}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, self.path)  # atomic: workers started together may race here
        except OSError as exc:
            log.info("could not keep LoRA hashes in %s (%s)", self.path, exc.strerror)
            tmp.unlink(missing_ok=True)


def _refuse_pickle(path: Path) -> None:
    raise InvalidRequest(
        f"Refusing LoRA {str(path)!r}: pickle formats (.ckpt/.pt/.bin) can run arbitrary code "
        "when loaded. Convert it to .safetensors (most LoRAs are published that way too)."
    )


def _check_name(path: Path) -> str:
    name = path.stem
    if len(name) > MAX_LORA_NAME or not _NAME_RE.match(name):
        raise InvalidRequest(
            f"Cannot offer LoRA {str(path)!r}: its name {name!r} must be 1-128 characters "
            "without ':', ',', '<', '>', quotes, slashes or control characters, and not start "
            "or end with a space (it is written as <lora:name:weight>). Rename the file."
        )
    return name


def find_loras(spec: str | os.PathLike[str] | list[str | os.PathLike[str]] | None
               ) -> dict[str, LoraFile]:
    """The owner's LoRAs by name: a list of .safetensors files and/or folders (searched
    recursively for *.safetensors; pickle files there are skipped with a log line)."""
    if spec is None:
        return {}
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    found: dict[str, LoraFile] = {}
    hashes = _HashCache()

    def add(path: Path) -> None:
        name = _check_name(path)
        if name in found:
            raise InvalidRequest(
                f"Two LoRA files are named {name!r}: {str(found[name].path)!r} and "
                f"{str(path)!r}. Rename one: a LoRA is asked for by its file name."
            )
        found[name] = LoraFile(name, path, hashes.hash(path))
        if len(found) > MAX_LORAS_OFFERED:
            raise InvalidRequest(
                f"More than {MAX_LORAS_OFFERED} LoRAs: offer a smaller folder or a list of files."
            )

    for item in items:
        path = Path(os.path.expanduser(os.fspath(item)))
        if path.is_dir():
            skipped = 0
            for p in sorted(path.rglob("*")):
                if not p.is_file():
                    continue
                if p.suffix.lower() == ".safetensors":
                    add(p)
                elif p.suffix.lower() in _PICKLE_SUFFIXES:
                    skipped += 1
            if skipped:
                log.warning("LoRA folder %s: skipped %d pickle file(s) (.ckpt/.pt/.bin); "
                            "only .safetensors files are offered", path, skipped)
        elif path.suffix.lower() in _PICKLE_SUFFIXES:
            _refuse_pickle(path)
        elif path.suffix.lower() != ".safetensors":
            raise InvalidRequest(
                f"A LoRA is a .safetensors file or a folder of them; got {str(path)!r}."
            )
        elif not path.is_file():
            raise InvalidRequest(f"No such LoRA file: {str(path)!r}.")
        else:
            add(path)
    hashes.save()
    return found
