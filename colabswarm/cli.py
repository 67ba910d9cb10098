"""`python -m colabswarm worker|demo`: the terminal face for Runpod, servers and CI.

`worker --guest alice:20` adds a named guest token (here: 20 images per hour) and prints its
share string after the owner's; `--guests-file F` keeps guests across restarts (mode 0600);
`--idle-stop 30m` stops the worker once no controller has contacted it for that long.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

__all__ = ["main"]


def _worker(args: argparse.Namespace) -> int:
    from .backend.serve import parse_duration, start_worker
    from .errors import ColabSwarmError
    from .protocol import Limits

    if args.gpus:
        return _serve_gpus(args)
    try:
        token = _token(args)
        guests = [_guest_spec(g) for g in args.guest or []]
        idle_stop = parse_duration(args.idle_stop)
    except ColabSwarmError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    limits = Limits()
    if args.max_pixels:
        limits.max_pixels = args.max_pixels
    if args.max_steps:
        limits.max_steps = args.max_steps
    for key in ("max_connections", "header_timeout_s", "idle_timeout_s", "stall_timeout_s"):
        value = getattr(args, key)
        if value is not None:
            if value <= 0:
                print(f"error: --{key.removesuffix('_s').replace('_', '-')} must be > 0",
                      file=sys.stderr, flush=True)
                return 2
            setattr(limits, key, value)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"colabswarm worker: loading {', '.join(args.model)} ...", flush=True)
    try:
        handle = start_worker(
            model=args.model, tunnel=args.tunnel, host=args.host, port=args.port,
            token=token, name=args.name, limits=limits, device=args.device,
            allow_downloads=args.allow_downloads, device_map=args.device_map,
            upscalers_dir=args.upscalers_dir, simulate_speed=args.simulate_speed,
            simulate_step_seconds=args.simulate_step_seconds,
            simulate_load_seconds=args.simulate_load_seconds,
            tunnel_deadline_s=args.tunnel_deadline, guests_file=args.guests_file,
            idle_stop=idle_stop,
            loras=(args.lora or []) + ([args.loras_dir] if args.loras_dir else []) or None,
            lora_cache=args.lora_cache, compile=args.compile,
            compile_batches=args.compile_batches, compile_sizes=args.compile_sizes,
            compile_cache=args.compile_cache, text_cache_mb=args.text_cache_mb,
        )
    except ColabSwarmError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        for name, limits in guests:
            if name in handle.guests():  # kept in the guests file: same token, these limits
                if limits is not None:
                    handle.update_guest(name, **limits)
            else:
                handle.add_guest(name, **(limits or {}))
    except ColabSwarmError as exc:
        handle.stop()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    info = handle.info()
    print(f"colabswarm worker {info.name} on {info.device} ({info.gpu_name or 'no GPU'}), "
          f"models {info.models}, listening on {handle.local_url}", flush=True)
    if args.simulate_speed is not None:
        print(f"BENCH MODE: simulated engine at speed x{args.simulate_speed:g}", flush=True)
    elif info.compile is not None:
        print(f"compile: {info.compile.mode} ({info.compile.detail or info.compile.state})",
              flush=True)
    print("Share string (paste it into the controller; it holds the secret token):", flush=True)
    print(handle.share, flush=True)
    for name, limits in handle.guests().items():
        print(f"guest {name} ({_limits_line(limits)}): {handle.guest_share(name)}", flush=True)
    if idle_stop is not None:
        print(f"idle stop: this worker stops itself once no controller has contacted it for "
              f"{args.idle_stop}", flush=True)
    try:
        while not stop.wait(1.0):
            if handle.tunnel is not None and not handle.tunnel_alive:
                print("tunnel died; reopening ...", flush=True)
                try:
                    print(handle.reopen(), flush=True)
                except ColabSwarmError as exc:
                    print(f"error: {exc}", file=sys.stderr, flush=True)
            if args.parent_pid and not _alive(args.parent_pid):
                print("controller went away; stopping", flush=True)
                return 0
            if not handle.running:
                if handle.stopped_reason:
                    print(f"stopped: {handle.stopped_reason}", flush=True)
                    return 0
                print("error: the server stopped", file=sys.stderr, flush=True)
                return 1
    finally:
        handle.stop()
        print("colabswarm worker stopped", flush=True)
    return 0


def _serve_gpus(args: argparse.Namespace) -> int:
    """`worker --gpus all`: one process per GPU, each printing its own share string."""
    from .swarm.local import start_local_workers

    if args.guest or args.guests_file:
        print("error: --guest and --guests-file are per worker: with --gpus, start each GPU's "
              "worker yourself (CUDA_VISIBLE_DEVICES=N python -m colabswarm worker --guest ...)",
              file=sys.stderr, flush=True)
        return 2
    gpus = "all" if args.gpus == "all" else [int(g) for g in args.gpus.split(",")]
    extra: list[str] = ["--tunnel", args.tunnel, "--host", args.host]
    if args.simulate_speed is not None:
        extra += ["--simulate-speed", str(args.simulate_speed)]
    for lora in args.lora or []:
        extra += ["--lora", lora]
    if args.loras_dir:
        extra += ["--loras-dir", args.loras_dir]
    extra += ["--lora-cache", str(args.lora_cache)]
    if args.idle_stop is not None:
        extra += ["--idle-stop", args.idle_stop]
    extra += ["--compile", args.compile, "--compile-batches", args.compile_batches]
    if args.compile_sizes:
        extra += ["--compile-sizes", args.compile_sizes]
    if args.compile_cache:
        extra += ["--compile-cache", args.compile_cache]
    extra += ["--text-cache-mb", str(args.text_cache_mb)]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    group = start_local_workers(gpus, args.model, extra_args=extra)
    try:
        for w in group:
            print(f"{w.name} (pid {w.pid}):", flush=True)
            print(w.share, flush=True)
        while not stop.wait(1.0):
            for w in group.crashed():
                if w.returncode == 0:  # stopped itself (idle stop): not a crash
                    continue
                print(f"{w.name} exited with code {w.returncode}; restarting", flush=True)
                print(w.restart(), flush=True)
            if all(w.returncode == 0 for w in group):
                print("every worker stopped itself (idle stop)", flush=True)
                return 0
    finally:
        group.stop()
    return 0


def _token(args: argparse.Namespace) -> str | None:
    """The owner's token: --token=T, --token-file F (first line), or $COLABSWARM_TOKEN; None for
    a fresh random one. The file and the variable keep it out of the process list and shell
    history, and work for tokens that start with '-' (which argparse reads as an option unless
    written --token=-abc)."""
    from .errors import ColabSwarmError
    from .protocol import TOKEN_ENV

    given = [(what, v) for what, v in (("--token", args.token), ("--token-file", args.token_file))
             if v is not None]
    if len(given) > 1:
        raise ColabSwarmError("Give the token once: --token or --token-file, not both.")
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                text = f.readline().strip()
        except OSError as exc:
            raise ColabSwarmError(
                f"Cannot read the token file {args.token_file!r} ({exc.strerror}); write the "
                "token on its first line, or pass --token=... instead.") from None
        if not text:
            raise ColabSwarmError(f"The token file {args.token_file!r} is empty.")
        return text
    if args.token is not None:
        return args.token
    # taken out of the environment, so the tunnel program and other children do not inherit it
    return os.environ.pop(TOKEN_ENV, None) or None


_GUEST_KEYS = ("images_per_hour", "max_pixels", "max_steps", "max_images", "max_queued",
               "weight")


def _guest_spec(text: str) -> tuple[str, dict[str, float | int] | None]:
    """`alice`, `alice:20` (images per hour) or `alice:images_per_hour=20,max_steps=30,...`
    -> (name, limits or None for none given)."""
    from .errors import ColabSwarmError

    name, _, rest = text.partition(":")
    if not rest:
        return name, None
    if "=" not in rest:
        if not rest.isdigit():
            raise ColabSwarmError(
                f"--guest {text!r}: after the name comes the images per hour (alice:20) or "
                f"key=value pairs (alice:images_per_hour=20,max_steps=30); keys: "
                f"{', '.join(_GUEST_KEYS)}.")
        return name, {"images_per_hour": int(rest)}
    limits: dict[str, float | int] = {}
    for part in rest.split(","):
        key, _, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if key not in _GUEST_KEYS:
            raise ColabSwarmError(f"--guest {text!r}: unknown limit {key!r}; the limits are "
                                  f"{', '.join(_GUEST_KEYS)}.")
        try:
            limits[key] = float(value) if key == "weight" else int(value)
        except ValueError:
            raise ColabSwarmError(f"--guest {text!r}: {key} needs a number (got "
                                  f"{value!r}).") from None
    return name, limits


def _limits_line(limits: object) -> str:
    values = limits.model_dump()  # type: ignore[attr-defined]
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
             if v is not None and not (k == "weight" and v == 1.0)
             and not (k == "max_queued" and v == 16)]
    return ", ".join(parts) or "no limits of its own"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return os.getppid() == pid


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(workers=args.workers, images=args.images, out=args.out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m colabswarm", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="serve a model to the swarm")
    # also after 'worker' (local workers pass their options there); SUPPRESS: no default that
    # would overwrite a -v given before the command
    w.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log at INFO level")
    w.add_argument("--model", action="append", default=None,
                   help="'tiny', a hub id, a diffusers folder or a .safetensors file; repeatable")
    w.add_argument("--tunnel", choices=["none", "cloudflare", "ngrok"], default="none")
    w.add_argument("--host", default="127.0.0.1")
    w.add_argument("--port", type=int, default=7801)
    w.add_argument("--token", default=None,
                   help="secret token, 16-256 of A-Z a-z 0-9 - _ (default: a new random one); "
                        "write --token=-abc for one that starts with '-', or use --token-file "
                        "or $COLABSWARM_TOKEN to keep it off the command line")
    w.add_argument("--token-file", default=None,
                   help="read the secret token from the first line of this file")
    w.add_argument("--name", default=None)
    w.add_argument("--device", default=None, help="cuda, cuda:1, cpu, mps (default: best found)")
    w.add_argument("--gpus", default=None, help="'all' or '0,1': one worker process per GPU")
    w.add_argument("--device-map", default=None,
                   help="'balanced' to split one pipeline over all visible GPUs")
    w.add_argument("--allow-downloads", action="store_true",
                   help="let token holders ask for hub models this worker does not have")
    w.add_argument("--upscalers-dir", default=None, help="folder of ESRGAN-family upscalers")
    w.add_argument("--lora", action="append", default=None, metavar="FILE",
                   help="a .safetensors LoRA to offer, asked for by its file name; repeatable")
    w.add_argument("--loras-dir", default=None, metavar="FOLDER",
                   help="offer every .safetensors LoRA in this folder (and its subfolders)")
    w.add_argument("--lora-cache", type=int, default=4, metavar="N",
                   help="LoRAs kept loaded between jobs (default 4)")
    w.add_argument("--compile", default="auto",
                   choices=["auto", "off", "reduce-overhead", "default"],
                   help="torch.compile the UNet and VAE decoder in the background while "
                        "serving: auto (default) = on for CUDA GPUs of compute capability 8.0+ "
                        "with 4+ CPU cores, reduce-overhead = with CUDA graphs, default = "
                        "without, off")
    w.add_argument("--compile-batches", default="1,2,4,8", metavar="N,N,...",
                   help="batch sizes compiled at each image size (default 1,2,4,8; capped by "
                        "the worker's max images per job)")
    w.add_argument("--compile-sizes", default=None, metavar="WxH,...",
                   help="image sizes compiled at start (default: the model's own, 512x512 or "
                        "1024x1024), e.g. 512x512,576x576 to add upscale tiles; other sizes are "
                        "compiled when a job asks for them")
    w.add_argument("--compile-cache", default=None, metavar="FOLDER",
                   help="keep compiled artifacts here so a restart skips most of the compile "
                        "(default: colabswarm's cache folder); a folder only you can write to")
    w.add_argument("--text-cache-mb", type=float, default=64.0, metavar="MIB",
                   help="device memory kept for the text encoders' answers to recent prompts, "
                        "so a repeated prompt is not encoded again (default 64; 0 = off)")
    w.add_argument("--max-pixels", type=int, default=None)
    w.add_argument("--max-steps", type=int, default=None)
    from .protocol import Limits

    d0 = Limits()
    w.add_argument("--max-connections", dest="max_connections", type=int, default=None,
                   help="open HTTP connections at once; more are refused with 429 "
                        f"(default {d0.max_connections})")
    w.add_argument("--header-timeout", dest="header_timeout_s", type=float, default=None,
                   help="seconds a connection has to send a request's headers "
                        f"(default {d0.header_timeout_s:g})")
    w.add_argument("--idle-timeout", dest="idle_timeout_s", type=float, default=None,
                   help="seconds an idle kept-alive connection stays open "
                        f"(default {d0.idle_timeout_s:g})")
    w.add_argument("--stall-timeout", dest="stall_timeout_s", type=float, default=None,
                   help="seconds a request body (or an answer) may make no progress "
                        f"(default {d0.stall_timeout_s:g})")
    w.add_argument("--guest", action="append", default=None, metavar="NAME[:LIMITS]",
                   help="add a guest token (repeatable): NAME, NAME:IMAGES_PER_HOUR, or "
                        "NAME:images_per_hour=20,max_pixels=262144,max_steps=30,max_images=4,"
                        "max_queued=16,weight=1; its share string is printed after yours")
    w.add_argument("--guests-file", default=None,
                   help="keep guests (names, tokens, limits) in this file across restarts; "
                        "written with mode 0600, refused if others can read it")
    w.add_argument("--idle-stop", default=None, metavar="DURATION",
                   help="stop the worker (and its tunnel) when no controller has contacted it "
                        "for this long: 30m, 1h, 90s (default: off)")
    w.add_argument("--tunnel-deadline", type=float, default=60.0)
    w.add_argument("--parent-pid", type=int, default=None,
                   help="exit when this process goes away (set by start_local_workers)")
    w.add_argument("--simulate-speed", type=float, default=None,
                   help="BENCH ONLY: sleep instead of denoising, at this relative speed")
    w.add_argument("--simulate-step-seconds", type=float, default=0.1,
                   help="BENCH ONLY: seconds per step per megapixel at speed 1, batch 1")
    w.add_argument("--simulate-load-seconds", type=float, default=0.0,
                   help="BENCH ONLY: seconds the simulated engine takes to switch models")
    w.set_defaults(func=_worker)
    d = sub.add_parser("demo", help="a local swarm of tiny-model workers, end to end")
    d.add_argument("--workers", type=int, default=3)
    d.add_argument("--images", type=int, default=12)
    d.add_argument("--out", default="outputs/demo")
    d.set_defaults(func=_demo)
    return p


def _glue_values(argv: list[str]) -> list[str]:
    """`--token -abc` as `--token=-abc`: argparse would read a value that starts with '-' as an
    option and stop with "expected one argument"."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in ("--token", "--token-file") and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_glue_values(sys.argv[1:] if argv is None else list(argv)))
    if getattr(args, "model", "x") is None:
        args.model = ["tiny"]
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return int(args.func(args) or 0)
