"""Shapes compiled ahead of time: a restarted worker loads them without tracing.

A restart from inductor's caches still made dynamo trace the UNet and the VAE decoder again,
once per shape (6-7 s per SD 1.5 shape, 15 s for SDXL on the device hosts), so two shapes took
25.8-33.4 s. torch's AOT precompile (``torch.compile(fn, fullgraph=True).aot_compile(...)``,
experimental; torch 2.11 asks for ``torch._dynamo.config.enable_aot_compile``) returns one
call's traced and compiled function with its kernels, which pickles to bytes and loads in
another process without tracing (docs/BENCHMARKS.md, "Shapes loaded ahead-of-time compiled").

This module owns that torch API and the file format; ``compiled.Compiler`` decides when.

- **What is compiled.** One call of a module's ``forward`` (the UNet's or the decoder's) with
  its inputs: the function serves calls whose inputs have those shapes, strides, dtypes and
  devices (the caller's own key says when). Only tensor guards are kept (torch cannot save the
  others: module identity, globals); the caller calls it only for its own key, on the module it
  was compiled for, whose parameters it reads at each call.
- **A file** holds every compiled call of one shape: a pickled dict with the format, the torch
  version and, per call, the module's name, the caller's key and torch's bytes. Files come from
  the owner's own compile cache folder, which is code anyway (docs/SECURITY.md).
- **Anything this torch cannot do** is an ``Unavailable`` (never a decision on message text):
  the caller then compiles as before.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any

__all__ = ["ENV", "FORMAT", "Entry", "Unavailable", "call", "compile_call", "dumps", "loads",
           "supported"]

ENV = "COLABSWARM_COMPILE_AOT"  # "off": trace every shape as before (benchmarks' A/B)
FORMAT = 1
SUFFIX = ".aot"
_SAVABLE_BACKENDS = ("inductor", "aot_eager")  # AOTAutograd's, which torch can serialize

Entry = tuple[str, Any, Any]  # (module name, the caller's key, the compiled function)


class Unavailable(RuntimeError):
    """This torch (or this call) cannot be compiled ahead of time; compile as before."""


def supported() -> bool:
    """Whether this torch has AOT precompile and the owner has not turned it off."""
    if os.environ.get(ENV, "").strip().lower() in ("off", "0", "no", "false"):
        return False
    try:
        from torch._dynamo.aot_compile import AOTCompiledFunction  # noqa: F401
    except ImportError:
        return False
    return True


def _enable() -> None:
    import torch._dynamo.config as dcfg

    if hasattr(dcfg, "enable_aot_compile"):  # torch 2.11: off unless asked for
        dcfg.enable_aot_compile = True


def _tensor_guards(entries: Any) -> list[bool]:
    """Keep the input tensors' guards only (see the module docstring)."""
    import torch

    keep = getattr(torch.compiler, "keep_tensor_guards_unsafe", None)
    if keep is not None:
        return list(keep(entries))
    return [getattr(e, "guard_type", "") == "TENSOR_MATCH" and not getattr(e, "is_global", True)
            for e in entries]


def _external(fn: Callable[..., Any]) -> dict[str, Any]:
    """fn and every function it wraps, named for the pickler: diffusers wraps the UNet's
    forward in a decorator of the same qualified name, which pickle cannot find by name."""
    chain = [fn]
    while getattr(chain[-1], "__wrapped__", None) is not None and len(chain) < 8:
        chain.append(chain[-1].__wrapped__)
    return {f"forward{i}": f for i, f in enumerate(chain)}


def compile_call(forward: Callable[..., Any], mode: str, backend: str | None, module: Any,
                 args: tuple, kwargs: dict) -> Any:
    """Compile ``forward(module, *args, **kwargs)`` ahead of time (traces and compiles now).
    ``mode``: 'reduce-overhead' (CUDA graphs) or 'default'; ``backend``: a dynamo backend
    instead of inductor (CPU tests: 'aot_eager'). Raises ``Unavailable`` where torch lacks it
    or cannot save this call; a graph break is raised as torch raises it."""
    import torch

    if backend and backend not in _SAVABLE_BACKENDS:
        raise Unavailable(f"torch cannot save what the {backend!r} backend compiles")
    _enable()
    options: dict[str, Any] = {"guard_filter_fn": _tensor_guards}
    if backend:
        fn = torch.compile(forward, backend=backend, fullgraph=True, dynamic=False,
                           options=options)
    else:
        if mode == "reduce-overhead":
            options["triton.cudagraphs"] = True  # what that mode sets
        fn = torch.compile(forward, fullgraph=True, dynamic=False, options=options)
    aot = getattr(fn, "aot_compile", None)
    if aot is None:
        raise Unavailable("this torch has no aot_compile")
    from torch._dynamo.exc import PackageError  # in every torch that has aot_compile

    try:
        return aot(((module, *args), kwargs))
    except PackageError as exc:  # a guard torch cannot save
        raise Unavailable(f"torch cannot save this call: {type(exc).__name__}") from exc


def call(compiled: Any, module: Any, args: tuple, kwargs: dict) -> Any:
    """Run one compiled call (its guards are the caller's key; see the module docstring)."""
    fn = getattr(compiled, "fn", None)
    if fn is None:  # pragma: no cover - a torch whose function keeps no .fn
        return compiled(module, *args, **kwargs)
    return fn(module, *args, **kwargs)


def dumps(entries: list[Entry], forwards: dict[str, Callable[..., Any]]) -> bytes:
    """One shape's compiled calls as a file's bytes. Raises ``Unavailable`` when torch cannot
    serialize one of them."""
    import torch
    from torch._dynamo.aot_compile import AOTCompiledFunction

    calls = []
    for name, key, compiled in entries:
        try:
            data = AOTCompiledFunction.serialize(compiled, _external(forwards[name]))
        except (pickle.PicklingError, RuntimeError, TypeError, AttributeError) as exc:
            raise Unavailable(f"torch cannot save the {name}: {type(exc).__name__}") from exc
        calls.append((name, key, data.serialized_data))
    return pickle.dumps({"format": FORMAT, "torch": torch.__version__, "calls": calls},
                        protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes, forwards: dict[str, Callable[..., Any]],
          modes: dict[str, str]) -> list[Entry]:
    """A file's compiled calls, loaded (no tracing), each module's in its compile mode
    (``modes``: name -> 'reduce-overhead' or 'default'). Raises ``Unavailable`` for a file of
    another format or torch, or one that does not load.

    CUDA graphs: torch decides whether a loaded function records them from inductor's global
    setting at load time, not from the options it was compiled with (its own comment in
    ``deserialize_bundled_cache_entry``: precompile never calls compile_fx, which sets it). A
    restarted SD 1.5 worker whose files were loaded without it made 2.6 img/s at batch 1
    instead of 7.0 (docs/BENCHMARKS.md), so the setting is the module's mode while it loads."""
    import torch
    import torch._inductor.config as icfg
    from torch._dynamo.aot_compile import AOTCompiledFunction

    _enable()
    try:
        held = pickle.loads(data)  # noqa: S301 - the owner's own cache folder (module docstring)
    except Exception as exc:  # noqa: BLE001 - any bad file: compile instead
        raise Unavailable(f"not a compiled-shape file ({type(exc).__name__})") from exc
    if not isinstance(held, dict) or held.get("format") != FORMAT \
            or held.get("torch") != torch.__version__:
        raise Unavailable("a compiled-shape file of another format or torch")
    out: list[Entry] = []
    for name, key, blob in held.get("calls", ()):
        if name not in forwards:
            raise Unavailable(f"a compiled-shape file for an unknown module {name!r}")
        graphs = modes.get(name) == "reduce-overhead"
        try:
            # inference mode: as every call is made (its guards are built so)
            with icfg.patch({"triton.cudagraphs": graphs}), torch.inference_mode():
                compiled = AOTCompiledFunction.deserialize(
                    blob, external_closure_data=_external(forwards[name]))
        except Exception as exc:  # noqa: BLE001 - any failure: compile instead
            raise Unavailable(f"the {name} did not load ({type(exc).__name__})") from exc
        out.append((name, key, compiled))
    return out
