"""Full-size Stable Diffusion pipelines with random weights, for benchmarks with no downloads.

The modules have the published SD 1.5 and SDXL base architectures (UNet, VAE, CLIP text
encoders), so a pipeline call does the same arithmetic as the real model; only the weights are
random. The tokenizer is colabswarm's tiny one (about 518 tokens): every prompt is still padded
to 77 tokens, so the text encoders' compute is unchanged, and the embedding tables keep the real
vocabulary size (49408) so memory matches too.

Weights are initialised on the GPU when there is one (about a second for SD 1.5, instead of tens
of seconds on a CPU), cast to the requested dtype and saved with ``save_pretrained`` as
safetensors, so a worker loads the folder through its ordinary "diffusers folder" path.

    python -m bench.fullsize sd15 /tmp/sd15-random            # build one folder
    python -m bench.fullsize sdxl /tmp/sdxl-random --dtype fp16
    python -m bench.fullsize sd15 /tmp/x --scale tiny          # CPU smoke check, small widths
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["build_sd15", "build_sdxl", "sd15_configs", "sdxl_configs"]

CLIP_VOCAB = 49408

# Scaled-down widths for a CPU smoke check of the code paths (same block layout, tiny widths).
_TINY = {"unet_ch": (32, 32, 64, 64), "xl_ch": (32, 64, 64), "vae_ch": (8, 8, 16, 16),
         "groups": 8, "vae_groups": 4}


def _scheduler_config() -> dict[str, Any]:
    return dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )


def _vae_config(scale: str, sample_size: int, scaling_factor: float) -> dict[str, Any]:
    tiny = scale == "tiny"
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=_TINY["vae_ch"] if tiny else (128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=_TINY["vae_groups"] if tiny else 32, act_fn="silu",
        sample_size=sample_size, scaling_factor=scaling_factor,
    )


def _clip_config(
    n_tokens: int, hidden: int, intermediate: int, layers: int, heads: int, act: str,
    projection_dim: int, scale: str,
) -> dict[str, Any]:
    if scale == "tiny":
        hidden, intermediate, layers, heads = 32, 64, 2, 4
        projection_dim = 32
    return dict(
        vocab_size=CLIP_VOCAB, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
        hidden_act=act, projection_dim=projection_dim, layer_norm_eps=1e-5,
        bos_token_id=n_tokens - 2, eos_token_id=n_tokens - 1, pad_token_id=n_tokens - 1,
    )


def sd15_configs(n_tokens: int, scale: str = "full") -> dict[str, dict[str, Any]]:
    """UNet, VAE and text-encoder configs of SD 1.5 (scale 'tiny': same layout, tiny widths)."""
    tiny = scale == "tiny"
    unet = dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=_TINY["unet_ch"] if tiny else (320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32 if tiny else 768, attention_head_dim=8,
        norm_num_groups=_TINY["groups"] if tiny else 32, act_fn="silu", downsample_padding=1,
        flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
    )
    text = _clip_config(n_tokens, 768, 3072, 12, 12, "quick_gelu", 768, scale)
    return {"unet": unet, "vae": _vae_config(scale, 512, 0.18215), "text": text}


def sdxl_configs(n_tokens: int, scale: str = "full") -> dict[str, dict[str, Any]]:
    """UNet, VAE and both text-encoder configs of SDXL base 1.0."""
    tiny = scale == "tiny"
    text = _clip_config(n_tokens, 768, 3072, 12, 12, "quick_gelu", 768, scale)
    text2 = _clip_config(n_tokens, 1280, 5120, 32, 20, "gelu", 1280, scale)
    cross = text["hidden_size"] + text2["hidden_size"]  # 768 + 1280 = 2048
    time_dim = 8 if tiny else 256
    unet = dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=_TINY["xl_ch"] if tiny else (320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2) if tiny else (1, 2, 10),
        attention_head_dim=(2, 4, 4) if tiny else (5, 10, 20),
        cross_attention_dim=cross, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=text2["projection_dim"] + 6 * time_dim,
        norm_num_groups=_TINY["groups"] if tiny else 32, act_fn="silu",
        flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5,
    )
    return {"unet": unet, "vae": _vae_config(scale, 1024, 0.13025), "text": text, "text2": text2}


def _tokenizer() -> tuple[Any, int]:
    from transformers import CLIPTokenizer

    from colabswarm.backend.tiny import _write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        n_tokens = _write_tokenizer(Path(tmp))
        tok = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77
        )
    return tok, n_tokens


def _init_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    return {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}[dtype]


def _save(pipe: Any, folder: Path, meta: dict[str, Any]) -> Path:
    """Save to a temporary sibling, then rename: a half-written folder never looks complete."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "colabswarm-fullsize.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def _params(*modules: Any) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def build_sd15(
    folder: str | os.PathLike[str], dtype: Any = "fp16", *, device: str | None = None,
    scale: str = "full", seed: int = 0,
) -> Path:
    """Build a random-weight SD 1.5 pipeline and save it as a diffusers folder (safetensors)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    t0 = time.perf_counter()
    dev, dt = _init_device(device), _dtype(dtype)
    tok, n_tokens = _tokenizer()
    cfg = sd15_configs(n_tokens, scale)
    torch.manual_seed(seed)
    with torch.device(dev):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
    for m in (unet, vae, text):
        m.to(dt).eval()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
        scheduler=EulerDiscreteScheduler(**_scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    meta = {"kind": "sd15", "scale": scale, "dtype": str(dt), "seed": seed,
            "params": {"unet": _params(unet), "vae": _params(vae), "text": _params(text)}}
    out = _save(pipe, Path(folder), meta)
    del pipe, unet, vae, text
    _free(dev)
    meta["build_s"] = round(time.perf_counter() - t0, 2)
    print(f"built sd15 ({scale}) in {meta['build_s']}s on {dev}: {meta['params']} -> {out}",
          flush=True)
    return out


def build_sdxl(
    folder: str | os.PathLike[str], dtype: Any = "fp16", *, device: str | None = None,
    scale: str = "full", seed: int = 0,
) -> Path:
    """Build a random-weight SDXL base pipeline and save it as a diffusers folder."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    t0 = time.perf_counter()
    dev, dt = _init_device(device), _dtype(dtype)
    tok, n_tokens = _tokenizer()
    cfg = sdxl_configs(n_tokens, scale)
    torch.manual_seed(seed)
    with torch.device(dev):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
        text2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text2"]))
    for m in (unet, vae, text, text2):
        m.to(dt).eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=EulerDiscreteScheduler(**_scheduler_config()),
    )
    meta = {"kind": "sdxl", "scale": scale, "dtype": str(dt), "seed": seed,
            "params": {"unet": _params(unet), "vae": _params(vae), "text": _params(text),
                       "text2": _params(text2)}}
    out = _save(pipe, Path(folder), meta)
    del pipe, unet, vae, text, text2
    _free(dev)
    meta["build_s"] = round(time.perf_counter() - t0, 2)
    print(f"built sdxl ({scale}) in {meta['build_s']}s on {dev}: {meta['params']} -> {out}",
          flush=True)
    return out


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=["sd15", "sdxl"])
    p.add_argument("folder")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--device", default=None, help="where to initialise (default: cuda if any)")
    p.add_argument("--scale", default="full", choices=["full", "tiny"])
    args = p.parse_args(argv)
    build = build_sd15 if args.kind == "sd15" else build_sdxl
    build(args.folder, args.dtype, device=args.device, scale=args.scale)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
