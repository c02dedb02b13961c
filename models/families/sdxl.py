"""Stable Diffusion XL: a UNet conditioned on two CLIP text encoders' penultimate hidden states (concatenated
along the features), the second encoder's pooled projection (``text_embeds``) and six ``time_ids`` per image:
its original size, the crop's top-left corner and the target size, as ``StableDiffusionXLPipeline`` builds them.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from models.families.base import Components, ImageGeometry, family_options, freeze, register
from models.families.sd import NoisePredictionFamily, load_vae, token_ids
from models.hub import load_error


def time_ids(geometry: ImageGeometry) -> Tensor:
    """``original_size + crop_top_left + target_size`` (heights before widths, top before left), float32."""
    return torch.tensor([*geometry.original_size, *geometry.crop_top_left, *geometry.target_size], dtype=torch.float32)


class SDXLFamily(NoisePredictionFamily):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    pipeline_type = StableDiffusionXLPipeline
    denoiser_type = UNet2DConditionModel
    prompt_keys = ("prompt_embeds", "pooled_prompt_embeds")
    image_keys = ("time_ids",)

    def load(self, pretrained: str, revision: str | None, variant: str | None, vae: str | None,
             local_files_only: bool, options: Mapping[str, Any] | None = None) -> Components:
        family_options(options, {}, self.name)
        common = dict(revision=revision, local_files_only=local_files_only)
        try:
            unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", variant=variant, **common)
            vae_model = load_vae(pretrained, vae, variant, common)
            text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", variant=variant, **common)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder_2",
                                                                         variant=variant, **common)
            tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **common)
            tokenizer_2 = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **common)
            # the checkpoint ships a sampling scheduler (Euler); training reads its noise schedule as DDPM's
            scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **common)
        except (OSError, ValueError) as err:
            raise load_error("model.pretrained", pretrained, err, local_files_only) from None
        freeze(vae_model, text_encoder, text_encoder_2)
        return Components(unet, vae_model, text_encoder, tokenizer, scheduler, source=pretrained,
                          text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, family=self)

    def encode_prompts(self, components: Components, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        """Both encoders' penultimate hidden states concatenated ``[B, L, D1 + D2]`` and the second encoder's
        pooled projection ``[B, P]``."""
        hidden, pooled = [], None
        for _, encoder, tokenizer in components.text_encoders():
            out = encoder(token_ids(tokenizer, prompts, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0]
        return {"prompt_embeds": torch.cat(hidden, dim=-1).float(), "pooled_prompt_embeds": pooled.float()}

    unconditional_kind = "zeros"

    def unconditional(self, components: Components, device: torch.device) -> dict[str, Tensor]:
        """Zeros for the prompt and pooled embeddings: ``StableDiffusionXLPipeline``'s unconditional prompt
        (``force_zeros_for_empty_prompt=True``, as SDXL was trained to drop its prompts)."""
        return {k: torch.zeros_like(v) for k, v in self.encode_prompts(components, [""], device).items()}

    def image_conditioning(self, geometry: ImageGeometry) -> dict[str, Tensor]:
        return {"time_ids": time_ids(geometry)}

    def conditioning(self, batch: Mapping[str, Any], sides: tuple[str, ...]) -> dict[str, Tensor]:
        copies = len(sides)
        return {
            "encoder_hidden_states": batch["prompt_embeds"].repeat(copies, 1, 1),
            "text_embeds": batch["pooled_prompt_embeds"].repeat(copies, 1),
            "time_ids": torch.cat([batch[f"time_ids_{side}"] for side in sides]),
        }

    def predict(self, denoiser: Any, noisy: Tensor, t: Tensor, conditioning: Mapping[str, Tensor]) -> Tensor:
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        return denoiser(noisy, t, encoder_hidden_states=conditioning["encoder_hidden_states"],
                        added_cond_kwargs=added, return_dict=False)[0].float()

    def pipeline(self, components: Components, denoiser: Any, scheduler: Any) -> StableDiffusionXLPipeline:
        return StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=denoiser, scheduler=scheduler,
            add_watermarker=False)


SDXL_FAMILY = register(SDXLFamily())
