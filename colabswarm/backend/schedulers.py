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
from collections import OrderedDict
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
        # (name, steps, device) -> a copy with its timesteps set (for_job)
        self._prepared: OrderedDict[tuple[str, int, str], Any] = OrderedDict()
        self.names = available_samplers()

    def for_job(self, name: str | None, seeds: list[int], *, steps: int | None = None,
                device: Any = None) -> Any:
        """A fresh scheduler for one job; ``name`` is canonical (None: the default).

        With ``steps`` and ``device``, its timesteps are already set for them (kept per
        sampler, steps and device), so the pipeline's ``set_timesteps(steps, device=device)``
        finds nothing to do, and where the class has a begin index it is set to the one its
        first ``step`` would look up on the device: no copy to the GPU and no read back at
        the start of a job (both wait for the GPU to finish the job before). A call with
        anything else sets the timesteps as the class always does."""
        name = name or DEFAULT_SAMPLER
        if steps is not None and device is not None:
            key = (name, int(steps), str(device))
            prepared = self._prepared.get(key)
            if prepared is None:
                prepared = self._prepare(self._pristine_for(name), int(steps), device)
                self._prepared[key] = prepared
                while len(self._prepared) > _MAX_PREPARED:
                    self._prepared.popitem(last=False)
            self._prepared.move_to_end(key)
            scheduler = copy.deepcopy(prepared)
            _keep_timesteps(scheduler, int(steps), device)
        else:
            scheduler = copy.deepcopy(self._pristine_for(name))
        if type(scheduler).__name__ == _BROWNIAN:
            # one Brownian tree per image, seeded with its seed (diffusers' BatchedBrownianTree
            # takes a list): the image's noise is its own, alone or in any batch
            scheduler.noise_sampler_seed = list(seeds)
        return scheduler

    def _pristine_for(self, name: str) -> Any:
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
        return pristine

    @staticmethod
    def _prepare(pristine: Any, steps: int, device: Any) -> Any:
        """A copy of ``pristine`` with its timesteps set for ``steps`` on ``device`` and, where
        the class has one, its begin index: the index its first step would find for the first
        timestep (``index_for_timestep``, asked of a CPU copy, so nothing waits)."""
        prepared = copy.deepcopy(pristine)
        prepared.set_timesteps(steps, device=device)
        find = getattr(prepared, "index_for_timestep", None)
        if callable(find) and callable(getattr(prepared, "set_begin_index", None)):
            timesteps = prepared.timesteps.detach().to("cpu")
            try:
                first = int(find(timesteps[0], timesteps))
            except (TypeError, ValueError, IndexError, RuntimeError):
                return prepared  # a class that looks its index up otherwise: it does so
            prepared.set_begin_index(first)
        return prepared


_MAX_PREPARED = 32


def _keep_timesteps(scheduler: Any, steps: int, device: Any) -> None:
    """The pipeline's ``set_timesteps(steps, device=device)`` on this prepared copy leaves it
    as it is (it already is what that call makes); any other call runs the class's own."""
    import torch

    own = scheduler.set_timesteps
    want = torch.device(device)

    def set_timesteps(num_inference_steps: Any = None, device: Any = None, **kw: Any) -> Any:
        if (not kw and num_inference_steps == steps and device is not None
                and torch.device(device) == want):
            return None
        scheduler.__dict__.pop("set_timesteps", None)  # from now on the class's own
        return own(num_inference_steps, device=device, **kw)

    object.__setattr__(scheduler, "set_timesteps", set_timesteps)
