"""Seeded, batched image generation with a diffusers pipeline.

Each image's initial latent comes from its own ``torch.Generator`` seeded by that image's seed, so the
same (prompt, seed) gives the same image whatever the batch size or the number of processes.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from common import dtypes
from models.families.base import SAMPLING_SCHEDULERS, family_of_pipeline

# the names sampler.scheduler takes; each model family says which it samples with (flow matching: euler)
SCHEDULERS = SAMPLING_SCHEDULERS


@dataclass(frozen=True)
class SamplerSettings:
    scheduler: str = "ddim"
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    batch_size: int = 8
    height: int | None = None
    width: int | None = None
    dtype: str = "float32"  # the pipeline's dtype where the caller moves it (evaluate.py); bfloat16 is ~4x on GPUs

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"sampler.scheduler: expected one of {sorted(SCHEDULERS)}, got {self.scheduler!r}")
        dtypes.torch_dtype(self.dtype, "sampler.dtype")

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtypes.DTYPES[self.dtype]  # a known name: __post_init__ checked it


def use_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for ``name`` (as its model family samples with it), keeping its trained
    noise schedule."""
    pipe.scheduler = family_of_pipeline(pipe).sampling_scheduler(name, pipe.scheduler.config)


def denoiser_of(pipe):
    return getattr(pipe, family_of_pipeline(pipe).denoiser_name)


def initial_latents(pipe, seeds: Sequence[int], height: int | None = None, width: int | None = None) -> Tensor:
    return family_of_pipeline(pipe).initial_latents(pipe, list(seeds), height, width)


def mixed_precision(pipe):
    """Autocast to the denoiser's dtype when its (frozen) weights are in lower precision than the text encoder's
    outputs, as during training with ``model.frozen_dtype=bfloat16``; otherwise nothing."""
    denoiser_dtype = denoiser_of(pipe).dtype
    if denoiser_dtype == pipe.text_encoder.dtype or denoiser_dtype not in (torch.bfloat16, torch.float16):
        return nullcontext()
    return torch.autocast(pipe.device.type, dtype=denoiser_dtype)


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], settings: SamplerSettings,
             guidance: Sequence[float] | None = None, progress: bool = True) -> Tensor:
    """``[N, 3, H, W]`` images in [0, 1]; consecutive images with the same guidance share a batch."""
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
    guidance = list(guidance) if guidance is not None else [settings.guidance_scale] * len(prompts)
    batches, start = [], 0
    while start < len(prompts):
        end = start + 1
        while end < len(prompts) and end - start < settings.batch_size and guidance[end] == guidance[start]:
            end += 1
        batches.append((start, end))
        start = end
    # the size the latents were drawn at (packed latents, as FLUX's, do not carry it)
    size = {k: v for k, v in (("height", settings.height), ("width", settings.width)) if v is not None}
    out = []
    for start, end in tqdm(batches, desc="generating", unit="batch", disable=not progress or len(batches) < 2):
        latents = initial_latents(pipe, seeds[start:end], settings.height, settings.width)
        autocast = mixed_precision(pipe)
        # under autocast the latents (and the scheduler's arithmetic on them) stay float32
        dtype = torch.float32 if isinstance(autocast, torch.autocast) else denoiser_of(pipe).dtype
        with autocast:
            images = pipe(list(prompts[start:end]), latents=latents.to(pipe.device, dtype),
                          num_inference_steps=settings.num_inference_steps, guidance_scale=guidance[start],
                          output_type="pt", **size, **family_of_pipeline(pipe).call_kwargs(pipe)).images
        out.append(images.float().cpu())
    if not out:
        return torch.zeros(0, 3, 1, 1)
    return torch.cat(out)
