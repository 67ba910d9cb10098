"""Upscale models at full size on one device: seconds, peak GPU memory, tiled vs whole.

Builds random-weight models of the real default sizes (ESRGAN 64 filters x 23 blocks as in
4x-UltraSharp and RealESRGAN_x4plus; Real-ESRGAN compact 64 features x 32 convs as in
realesr-general-x4v3; SwinIR classical x4, 180-dim, 6 x 6 blocks, window 8) with spandrel's own
classes, saves them as .safetensors and runs colabswarm's upscaler on a --size px source, in
512 px windows (what a worker does; --tile) and in one pass, and prints time, peak CUDA
memory and how far each is from the model alone in float32 over the whole image (on CUDA the
worker runs float16 where spandrel says the model supports it). --small uses the test-sized
models, for a smoke run on a CPU.

    .venv/bin/python -m bench.upscale_models [--device cuda] [--size 1024] [--tile 512] [--small]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _models(small: bool) -> dict:
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.SwinIR import SwinIR

    if small:
        return {
            "esrgan-4x": lambda: ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4),
            "compact-4x": lambda: Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2,
                                          upscale=4),
            "swinir-4x": lambda: SwinIR(img_size=16, in_chans=3, embed_dim=12, depths=[2],
                                        num_heads=[2], window_size=4, mlp_ratio=2.0, upscale=4,
                                        img_range=1.0, upsampler="pixelshuffle"),
        }
    return {
        "esrgan-4x": lambda: ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4),
        "compact-4x": lambda: Compact(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=32,
                                      upscale=4),
        "swinir-4x": lambda: SwinIR(img_size=64, in_chans=3, embed_dim=180, depths=[6] * 6,
                                    num_heads=[6] * 6, window_size=8, mlp_ratio=2.0, upscale=4,
                                    img_range=1.0, upsampler="pixelshuffle"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cuda, cpu (default: cuda if there is one)")
    ap.add_argument("--size", type=int, default=1024, help="source side in pixels")
    ap.add_argument("--small", action="store_true", help="test-sized models (CPU smoke run)")
    ap.add_argument("--tile", type=int, default=512, help="window side, input pixels")
    args = ap.parse_args()
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from colabswarm.backend import upscalers as up

    up.import_spandrel()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), np.uint8))
    with tempfile.TemporaryDirectory() as folder:
        for name, make in _models(args.small).items():
            torch.manual_seed(0)
            save_file({k: v.contiguous() for k, v in make().state_dict().items()},
                      str(Path(folder) / f"{name}.safetensors"))
        print(f"device {device}, {args.size}x{args.size} source, x4")
        for name in up.upscaler_scales(folder):
            runs = {}
            for label, tile in (("windows", args.tile), ("one pass", 1 << 30)):
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                cache: dict = {}
                up.run_upscaler(src.crop((0, 0, 32, 32)), name, 4, device, folder, cache)
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = up.run_upscaler(src, name, 4, device, folder, cache, tile=tile)
                if cuda:
                    torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
                runs[label] = np.asarray(out, np.int16)
                print(f"  {name:11s} {label:8s} {time.perf_counter() - t0:7.2f} s, "
                      f"peak {peak:5.2f} GiB")
            # the float32 whole pass, the model alone
            desc = up._load_descriptor(Path(folder) / f"{name}.safetensors").to(device).eval()
            x = up._to_tensor(src)
            ref = np.asarray(up._to_image(up.run_tiled(desc, x, 4, 1 << 30, 0, device,
                                                       torch.float32)), np.int16)
            for label, arr in runs.items():
                d = np.abs(arr - ref)
                print(f"  {name:11s} {label:8s} vs float32 whole: max {d.max()}/255, "
                      f"mean {d.mean():.4f}, {(d > 2).mean():.3%} of values over 2/255")
            del desc


if __name__ == "__main__":
    main()
