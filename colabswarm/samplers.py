"""Sampler names as Stable Diffusion users know them (A1111/SwarmUI), and clip skip's meaning.

Torch-free: the controller, the panels and the worker all use these names, and only the worker
maps them to diffusers schedulers (``backend/schedulers.py``). A name is written into a PNG's
``parameters`` exactly as it appears in ``SAMPLERS`` ("Sampler: DPM++ 2M Karras"), which is how
A1111 writes it and how A1111, civitai and other readers look it up.

``canonical_sampler`` accepts the spellings people paste from other tools: any case, ``_`` or
``-`` for spaces, k-diffusion's ``k_`` prefix (``k_euler_a``, ``k_dpmpp_2m``), ComfyUI's names
(``euler_ancestral``, ``dpm_2``, ``uni_pc``, ``dpmpp_2m_sde_gpu``) and ``dpmpp`` for ``DPM++``
(``dpmpp_2m_karras``).
"""

from __future__ import annotations

import re

from .errors import InvalidRequest

__all__ = [
    "DEFAULT_SAMPLER",
    "MAX_CLIP_SKIP",
    "SAMPLERS",
    "STOCHASTIC_SAMPLERS",
    "UNET_CALLS_PER_STEP",
    "canonical_sampler",
    "diffusers_clip_skip",
]

# Every A1111 sampler that diffusers has a scheduler for, in A1111's menu order where it has
# one. Left out, because diffusers has no scheduler that does what the name says: "DPM++ 2S a"
# (ancestral single-step), "DPM fast", "DPM adaptive", "Restart"; and "LCM", which needs an
# LCM model or LoRA to make anything but noise.
SAMPLERS: tuple[str, ...] = (
    "Euler",
    "Euler a",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ SDE",
    "DPM++ SDE Karras",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Karras",
    "DPM++ 2M SDE Heun",
    "DPM++ 2M SDE Heun Karras",
    "DPM++ 3M SDE",
    "DPM++ 3M SDE Karras",
    "DPM2",
    "DPM2 Karras",
    "DPM2 a",
    "DPM2 a Karras",
    "Heun",
    "LMS",
    "LMS Karras",
    "DDIM",
    "DDPM",
    "PLMS",
    "UniPC",
    "DEIS",
)
DEFAULT_SAMPLER = "Euler"
# samplers that draw fresh noise at every step (from each image's own generator on the worker)
STOCHASTIC_SAMPLERS: frozenset[str] = frozenset({
    "Euler a", "DPM++ SDE", "DPM++ SDE Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras",
    "DPM++ 2M SDE Heun", "DPM++ 2M SDE Heun Karras", "DPM++ 3M SDE", "DPM++ 3M SDE Karras",
    "DPM2 a", "DPM2 a Karras", "DDPM",
})
# second-order samplers run the UNet twice per step (once on the last step): twice the time
UNET_CALLS_PER_STEP: dict[str, int] = {
    name: 2 if name.startswith(("Heun", "DPM2", "DPM++ SDE")) else 1 for name in SAMPLERS
}
MAX_CLIP_SKIP = 12  # A1111's slider: CLIP ViT-L has 12 layers
_MAX_NAME = 64

_NOT_IN_DIFFUSERS = {
    "dpmpp2sa": "DPM++ 2S a", "dpmpp2sakarras": "DPM++ 2S a Karras", "dpmfast": "DPM fast",
    "dpmadaptive": "DPM adaptive", "restart": "Restart", "lcm": "LCM",
}


def _key(name: str) -> str:
    """The spelling-free form of a sampler name: 'K_DPMPP_2M_Karras' -> 'dpmpp2mkarras'."""
    s = name.strip().lower()
    s = re.sub(r"^k[_\s]", "", s)
    s = s.replace("++", "pp").replace("ancestral", " a")
    s = re.sub(r"[\s_\-.]+", "", s)
    return s.removesuffix("gpu")  # ComfyUI's "dpmpp_2m_sde_gpu": the same sampler


_BY_KEY: dict[str, str] = {_key(name): name for name in SAMPLERS}
# other tools' names for the same samplers: diffusers' PNDM (run as PLMS, as SD's own config
# does), ComfyUI's UniPC variant name
_BY_KEY.update({_key(alias): name for alias, name in (("PNDM", "PLMS"), ("uni_pc_bh2", "UniPC"))})


def canonical_sampler(name: str) -> str:
    """The canonical (A1111) spelling of a sampler name; InvalidRequest listing the valid names
    when it is none of them."""
    if not isinstance(name, str) or not name.strip() or len(name) > _MAX_NAME:
        raise InvalidRequest(
            f"A sampler is named by text of 1-{_MAX_NAME} characters, such as 'DPM++ 2M Karras'; "
            f"choose one of: {', '.join(SAMPLERS)}."
        )
    key = _key(name)
    found = _BY_KEY.get(key)
    if found is not None:
        return found
    if key in _NOT_IN_DIFFUSERS:
        raise InvalidRequest(
            f"{_NOT_IN_DIFFUSERS[key]!r} is an A1111 sampler that diffusers has no scheduler for;"
            f" choose one of: {', '.join(SAMPLERS)}."
        )
    raise InvalidRequest(f"Unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}.")


def diffusers_clip_skip(clip_skip: int, sdxl: bool) -> int | None:
    """diffusers' ``clip_skip`` pipeline argument for an A1111 "Clip skip" value.

    A1111 counts from 1 (1 = the text encoder's last layer, 2 = the one before it, with the
    final layer norm applied as usual); diffusers counts layers skipped (None = last layer,
    1 = the one before it), so for SD 1.x/2.x it is ``clip_skip - 1``. SDXL pipelines already
    take the penultimate layer when diffusers gets None, and A1111 leaves SDXL at that layer
    whatever "Clip skip" says: here 1 and 2 both mean the model's own layer (so an SDXL image
    A1111 wrote with "Clip skip: 2" is made the same way), and N >= 3 takes the N-th layer from
    the end (diffusers' ``N - 2``).
    """
    if not 1 <= clip_skip <= MAX_CLIP_SKIP:
        raise InvalidRequest(f"clip skip must be 1-{MAX_CLIP_SKIP} (1 = no skip), got {clip_skip}.")
    skipped = clip_skip - (2 if sdxl else 1)
    return skipped if skipped > 0 else None
