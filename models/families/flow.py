"""Rectified-flow families (SD 3/3.5, FLUX): a transformer trained to predict the velocity ``eps - x_0`` at
``x_s = (1 - s) x_0 + s eps`` for a noise level ``s`` in (0, 1) (docs/methods/flow-matching.md).

Timesteps here are noise levels ``s`` (float32), drawn as the families train them: a density on (0, 1)
(``uniform``, ``logit_normal`` or ``mode``, diffusers' ``compute_density_for_timestep_sampling``), restricted to
``[t_min, t_max + 1) / N`` of the scheduler's ``N`` training steps, then shifted by the family (SD 3: the
scheduler's constant ``shift``; FLUX: a shift that grows with the image's token count). Errors may be weighted
per sample by diffusers' SD 3 schemes (``sigma_sqrt``, ``cosmap``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from torch import Tensor

from common.errors import InputError
from models.families.base import ModelFamily

DENSITIES = ("uniform", "logit_normal", "mode")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
#: model.noise_sampling when a config gives none (SD 3's and FLUX's training scripts' defaults)
DEFAULT_NOISE_SAMPLING = {"density": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
                          "weighting": "none"}


def noise_settings(noise_sampling: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**DEFAULT_NOISE_SAMPLING, **(noise_sampling or {})}


class FlowMatchingFamily(ModelFamily):
    """Families trained on the rectified flow: velocity targets, continuous noise levels."""

    denoiser_name = "transformer"
    #: the text states and the pooled text embedding, passed as ``encoder_hidden_states`` and ``pooled_projections``
    prompt_keys = ("prompt_embeds", "pooled_prompt_embeds")
    kohya_export = False  # kohya-ss names these models' layers by their original (non-diffusers) module paths
    sampling_schedulers = ("euler",)

    def check_scheduler(self, scheduler: Any) -> None:
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise InputError(f"the {self.name} family trains on a flow-matching schedule: expected the checkpoint's "
                             f"FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")

    def sampling_scheduler(self, name: str, config: Mapping[str, Any]) -> Any:
        if name not in self.sampling_schedulers:
            raise InputError(f"sampler.scheduler: the {self.name} family samples with its flow-matching Euler "
                             f"scheduler (sampler.scheduler=euler), got {name!r}")
        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def check_noise_sampling(self, noise_sampling: Mapping[str, Any] | None) -> None:
        settings = noise_settings(noise_sampling)
        if settings["density"] not in DENSITIES:
            raise InputError(f"model.noise_sampling.density: expected one of {', '.join(DENSITIES)}, "
                             f"got {settings['density']!r}")
        if settings["weighting"] not in WEIGHTINGS:
            raise InputError(f"model.noise_sampling.weighting: expected one of {', '.join(WEIGHTINGS)}, "
                             f"got {settings['weighting']!r}")
        if settings["logit_std"] <= 0:
            raise InputError(f"model.noise_sampling.logit_std: expected a number > 0, got {settings['logit_std']}")

    def shift(self, scheduler: Any, sigmas: Tensor, shape: torch.Size) -> Tensor:
        """The family's noise-level shift of uniform-time levels ``sigmas`` for latents of ``shape``: the
        scheduler's constant ``shift`` (``s' = shift s / (1 + (shift - 1) s)``)."""
        shift = float(scheduler.config.shift)
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def draw_timesteps(self, scheduler: Any, shape: torch.Size, t_min: int, t_max: int,
                       noise_sampling: Mapping[str, Any] | None = None, generator: torch.Generator | None = None,
                       device: torch.device | None = None) -> Tensor:
        s = noise_settings(noise_sampling)
        u = compute_density_for_timestep_sampling(
            s["density"], int(shape[0]), logit_mean=s["logit_mean"], logit_std=s["logit_std"],
            mode_scale=s["mode_scale"], device="cpu" if generator is not None else (device or "cpu"), generator=generator)
        n = scheduler.config.num_train_timesteps
        # u in [0, 1) -> [t_min, t_max + 1) / n, kept off 0 (no noise) where the density reaches it
        u = (t_min + u.float().clamp(0, 1) * (t_max + 1 - t_min)) / n
        u = u.clamp(min=1.0 / n, max=1.0)
        return self.shift(scheduler, u, shape).float()

    def error_weights(self, t: Tensor, noise_sampling: Mapping[str, Any] | None = None) -> Tensor | None:
        scheme = noise_settings(noise_sampling)["weighting"]
        if scheme == "none":
            return None
        return compute_loss_weighting_for_sd3(scheme, t).float()

    def conditioning(self, batch: Mapping[str, Any], sides: tuple[str, ...]) -> dict[str, Tensor]:
        copies = len(sides)
        return {"encoder_hidden_states": batch["prompt_embeds"].repeat(copies, 1, 1),
                "pooled_projections": batch["pooled_prompt_embeds"].repeat(copies, 1)}

    def noisy_and_target(self, scheduler: Any, latents: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        s = t.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        return (1 - s) * latents + s * noise, (noise - latents).float()
