"""Stable Diffusion 1.x/2.x: a UNet conditioned on one CLIP text encoder's last hidden state, trained with
epsilon or v-prediction targets of the DDPM schedule."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from common.errors import InputError
from models.families.base import Components, ModelFamily, family_options, freeze, register
from models.hub import load_error

PREDICTION_TYPES = ("epsilon", "v_prediction")


def token_ids(tokenizer, prompts: list[str], device: torch.device) -> Tensor:
    """Prompts padded and truncated to the tokenizer's maximum length, as the diffusers pipelines tokenize them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return ids.input_ids.to(device)


def load_vae(pretrained: str, vae: str | None, variant: str | None, common: dict[str, Any]) -> AutoencoderKL:
    """The checkpoint's VAE, or ``vae`` (a hub id or directory) in its place."""
    if vae:
        return AutoencoderKL.from_pretrained(vae, **common)
    return AutoencoderKL.from_pretrained(pretrained, subfolder="vae", variant=variant, **common)


class NoisePredictionFamily(ModelFamily):
    """UNet families trained on the DDPM forward process: epsilon or v-prediction targets, integer timesteps."""

    def check_scheduler(self, scheduler: Any) -> None:
        kind = scheduler.config.prediction_type
        if kind not in PREDICTION_TYPES:
            raise InputError(f"scheduler prediction_type: expected epsilon or v_prediction, got {kind!r}")

    def noisy_and_target(self, scheduler: Any, latents: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        noisy = scheduler.add_noise(latents, noise, t)
        epsilon = scheduler.config.prediction_type == "epsilon"
        return noisy, (noise if epsilon else scheduler.get_velocity(latents, noise, t)).float()


class SDFamily(NoisePredictionFamily):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    pipeline_type = StableDiffusionPipeline
    denoiser_type = UNet2DConditionModel
    prompt_keys = ("prompt_embeds",)

    def load(self, pretrained: str, revision: str | None, variant: str | None, vae: str | None,
             local_files_only: bool, options: Mapping[str, Any] | None = None) -> Components:
        family_options(options, {}, self.name)
        common = dict(revision=revision, local_files_only=local_files_only)
        try:
            unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", variant=variant, **common)
            vae_model = load_vae(pretrained, vae, variant, common)
            text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", variant=variant, **common)
            tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **common)
            scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **common)
        except (OSError, ValueError) as err:
            raise load_error("model.pretrained", pretrained, err, local_files_only) from None
        freeze(vae_model, text_encoder)
        return Components(unet, vae_model, text_encoder, tokenizer, scheduler, source=pretrained, family=self)

    def encode_prompts(self, components: Components, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        """The text encoder's last hidden state ``[B, L, D]``."""
        ids = token_ids(components.tokenizer, prompts, device)
        return {"prompt_embeds": components.text_encoder(ids)[0].float()}

    def conditioning(self, batch: Mapping[str, Any], sides: tuple[str, ...]) -> dict[str, Tensor]:
        return {"encoder_hidden_states": batch["prompt_embeds"].repeat(len(sides), 1, 1)}

    def predict(self, denoiser: Any, noisy: Tensor, t: Tensor, conditioning: Mapping[str, Tensor]) -> Tensor:
        return denoiser(noisy, t, encoder_hidden_states=conditioning["encoder_hidden_states"], return_dict=False)[0].float()

    def pipeline(self, components: Components, denoiser: Any, scheduler: Any) -> StableDiffusionPipeline:
        return generation_pipeline(components.vae, components.text_encoder, components.tokenizer, denoiser, scheduler)


def generation_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    """``StableDiffusionPipeline`` over given parts, without safety checker or feature extractor."""
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


SD_FAMILY = register(SDFamily())
