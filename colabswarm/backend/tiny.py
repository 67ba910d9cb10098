"""The built-in tiny random-weight Stable Diffusion pipelines: the offline default.

They have the real architecture (UNet, VAE with scale factor 8, CLIP text encoder and
tokenizer, Euler scheduler) at a size that runs in milliseconds on a CPU, so the demo and every
test exercise the real diffusers code without downloading weights. Built once per build seed,
saved with ``save_pretrained`` and loaded back with ``from_pretrained``: the same path a real
model folder takes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["TINY_MODELS", "build_tiny", "build_tiny_lora", "cache_root", "tiny_model_dir"]

TINY_MODELS = ("tiny", "tiny-xl")
_FORMAT = "3"  # bump when the configs below change, so stale caches are rebuilt


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _write_tokenizer(folder: Path) -> int:
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = ["t h", "th e</w>", "a n", "r e", "o n</w>"]
    vocab += [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def build_tiny(folder: str | os.PathLike[str], kind: str = "tiny", build_seed: int = 0) -> Path:
    """Build a tiny random-weight pipeline and save it as a diffusers folder."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    if kind not in TINY_MODELS:
        raise ValueError(f"Unknown tiny model {kind!r}; choose one of {TINY_MODELS}.")
    folder = Path(folder)
    xl = kind == "tiny-xl"
    with tempfile.TemporaryDirectory() as tmp:
        n_tokens = _write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(build_seed)
        text_cfg = dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=77, vocab_size=max(1000, n_tokens), projection_dim=32,
            bos_token_id=n_tokens - 2, eos_token_id=n_tokens - 1, pad_token_id=n_tokens - 1,
        )
        unet_extra: dict = {}
        if xl:
            unet_extra = dict(
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=32 + 6 * 8,
            )
        unet = UNet2DConditionModel(
            sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64 if xl else 32, attention_head_dim=4, **unet_extra,
        )
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, sample_size=64,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        )
        if xl:
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
    tmp_dir = folder.with_name(folder.name + f".tmp{os.getpid()}")
    pipe.save_pretrained(tmp_dir)
    (tmp_dir / "colabswarm-tiny.json").write_text(
        json.dumps({"kind": kind, "build_seed": build_seed, "format": _FORMAT})
    )
    try:
        os.replace(tmp_dir, folder)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp_dir, ignore_errors=True)
    return folder


def cache_root() -> Path:
    """colabswarm's cache folder: $COLABSWARM_CACHE, else $XDG_CACHE_HOME/colabswarm."""
    root = os.environ.get("COLABSWARM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "colabswarm"
    )
    return Path(root)


def tiny_model_dir(kind: str = "tiny", build_seed: int = 0, *, build: bool = True) -> Path:
    """The folder of a tiny model, built on first use and reused afterwards (with
    ``build=False`` its path only, which may not exist yet)."""
    folder = cache_root() / f"{kind}-seed{build_seed}-f{_FORMAT}"
    marker = folder / "colabswarm-tiny.json"
    if build and not marker.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        build_tiny(folder, kind, build_seed)
    return folder


_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _lora_pairs(model: object, targets: tuple[str, ...], rank: int, strength: float,
                gen: object, prefix: str = "") -> list[tuple[str, object, object]]:
    """(module name, A [rank x in], B [out x rank]) for every targeted Linear of a model."""
    import torch

    pairs = []
    for name, module in model.named_modules():  # type: ignore[attr-defined]
        if isinstance(module, torch.nn.Linear) and name.endswith(targets):
            down = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
            up = torch.randn(module.out_features, rank, generator=gen) * strength / rank**0.5
            pairs.append((prefix + name, down, up))
    return pairs


def build_tiny_lora(
    path: str | os.PathLike[str],
    kind: str = "tiny",
    seed: int = 0,
    *,
    rank: int = 4,
    strength: float = 1.0,
    text_encoder: bool = True,
    layout: str = "peft",
) -> Path:
    """Write a random LoRA for a tiny model as a .safetensors file, as trainers write them.

    ``layout="peft"`` is the diffusers/peft layout that diffusers' training scripts save
    (``unet.<module>.lora_A.weight``, ``text_encoder.<module>.lora_B.weight``, and
    ``text_encoder_2.`` for SDXL); ``layout="kohya"`` is the layout of kohya's sd-scripts, the
    one most LoRAs shared for A1111 use (``lora_unet_<module_with_underscores>.lora_down.weight``,
    ``.lora_up.weight``, ``.alpha``; SD 1.x only here). Text-encoder modules are named as in
    the files people share (``text_model.encoder.layers.N...``), whatever the installed
    transformers calls them. The weights are random (seeded), strong enough that weight 1
    changes the tiny model's images clearly.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    if layout not in ("peft", "kohya"):
        raise ValueError(f"Unknown LoRA layout {layout!r}; choose 'peft' or 'kohya'.")
    if layout == "kohya" and kind != "tiny":
        raise ValueError("The kohya layout is built for the SD 1.x tiny model only.")
    folder = tiny_model_dir(kind)
    gen = torch.Generator("cpu").manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    parts = [("unet", _lora_pairs(unet, _UNET_TARGETS, rank, strength, gen))]
    if text_encoder:
        encoders = ["text_encoder"] + (["text_encoder_2"] if kind == "tiny-xl" else [])
        for enc in encoders:
            model = CLIPTextModel.from_pretrained(folder / enc)
            inner = "" if hasattr(model, "text_model") else "text_model."
            parts.append((enc, _lora_pairs(model, _TEXT_TARGETS, rank, strength, gen, inner)))
    tensors: dict[str, object] = {}
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    for part, pairs in parts:
        for name, down, up in pairs:
            if layout == "peft":
                tensors[f"{part}.{name}.lora_A.weight"] = down.contiguous()
                tensors[f"{part}.{name}.lora_B.weight"] = up.contiguous()
            else:
                key = kohya_prefix[part] + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = down.contiguous()
                tensors[f"{key}.lora_up.weight"] = up.contiguous()
                tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"ss_output_name": path.stem} if layout == "kohya" else None
    save_file(tensors, str(path), metadata=metadata)  # type: ignore[arg-type]
    return path
