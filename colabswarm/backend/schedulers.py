"""A1111 sampler names -> diffusers schedulers, one fresh scheduler per job.

The table follows diffusers' own mapping of A1111/k-diffusion samplers to its schedulers
("Karras" = ``use_karras_sigmas``, "SDE" = ``algorithm_type="sde-dpmsolver++"`` or the
Brownian-tree ``DPMSolverSDEScheduler``, "3M" = ``solver_order=3``). Every scheduler is built
from the loaded model's own scheduler config (its betas, prediction type, timestep spacing), so
"Euler" on SD 1.5 keeps SD 1.5's noise schedule.

Jobs never share scheduler state: each job gets a copy of a pristine scheduler kept per name
(building some, e.g. KDPM2, costs ~0.2 s; a copy costs well under a millisecond), and the
pipeline's own scheduler is put back when the job ends.

Same seed, same image with random noise per step: the pipelines pass each image's own
generator to ``scheduler.step``, and diffusers draws one noise tensor per image from its own
generator, so an image's noise does not depend on its neighbours in a batch. The Brownian-tree
sampler ("DPM++ SDE") seeds one tree per image with that image's seed, as A1111 does.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from ..errors import ModelNotAvailable
from ..samplers import DEFAULT_SAMPLER, SAMPLERS

__all__ = ["SCHEDULER_TABLE", "SchedulerBank", "available_samplers"]

_K = {"use_karras_sigmas": True}
_SDE = {"algorithm_type": "sde-dpmsolver++"}

# name -> (diffusers class, options over the model's own scheduler config)
SCHEDULER_TABLE: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", _K),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", _K),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", _SDE),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {**_SDE, **_K}),
    "DPM++ 2M SDE Heun": ("DPMSolverMultistepScheduler", {**_SDE, "solver_type": "heun"}),
    "DPM++ 2M SDE Heun Karras": ("DPMSolverMultistepScheduler",
                                 {**_SDE, "solver_type": "heun", **_K}),
    "DPM++ 3M SDE": ("DPMSolverMultistepScheduler", {**_SDE, "solver_order": 3}),
    "DPM++ 3M SDE Karras": ("DPMSolverMultistepScheduler", {**_SDE, "solver_order": 3, **_K}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", _K),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", _K),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", _K),
    # latents are not images in [-1, 1]: clipping them (these classes' default, which a model
    # whose own config comes from another class inherits) is wrong for latent diffusion
    "DDIM": ("DDIMScheduler", {"clip_sample": False}),
    "DDPM": ("DDPMScheduler", {"clip_sample": False}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
}
assert tuple(SCHEDULER_TABLE) == SAMPLERS, "samplers.SAMPLERS and this table must agree"

_BROWNIAN = "DPMSolverSDEScheduler"  # needs torchsde; seeds per image instead of generators
# torchsde's Brownian interval warns when diffusers asks for a time a float's rounding below
# its start (harmless, and on every DPM++ SDE step)
warnings.filterwarnings("ignore", message="Should have ta>=t0", category=UserWarning)


def _scheduler_class(name: str) -> Any | None:
    import diffusers

    cls_name = SCHEDULER_TABLE[name][0]
    if cls_name == _BROWNIAN:
        try:
            import torchsde  # noqa: F401
        except ImportError:
            return None
    return getattr(diffusers, cls_name, None)


def available_samplers() -> list[str]:
    """The sampler names this installation can run (the Brownian-tree ones need torchsde)."""
    return [name for name in SAMPLERS if _scheduler_class(name) is not None]


class SchedulerBank:
    """Pristine schedulers for one loaded model, built on first use, copied for each job."""

    def __init__(self, base_config: Any) -> None:
        self._base = dict(base_config)
        self._pristine: dict[str, Any] = {}
        self.names = available_samplers()

    def for_job(self, name: str | None, seeds: list[int]) -> Any:
        """A fresh scheduler for one job; ``name`` is canonical (None: the default)."""
        name = name or DEFAULT_SAMPLER
        pristine = self._pristine.get(name)
        if pristine is None:
            cls = _scheduler_class(name) if name in SCHEDULER_TABLE else None
            if cls is None:
                raise ModelNotAvailable(
                    f"This worker cannot run the sampler {name!r}; it has {self.names}."
                )
            with warnings.catch_warnings():  # config keys of the model's own class: expected
                warnings.simplefilter("ignore")
                pristine = cls.from_config(self._base, **SCHEDULER_TABLE[name][1])
            self._pristine[name] = pristine
        scheduler = copy.deepcopy(pristine)
        if type(scheduler).__name__ == _BROWNIAN:
            # one Brownian tree per image, seeded with its seed (diffusers' BatchedBrownianTree
            # takes a list): the image's noise is its own, alone or in any batch
            scheduler.noise_sampler_seed = list(seeds)
        return scheduler
