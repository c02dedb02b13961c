"""Stable Diffusion 3/3.5: an MMDiT transformer (``SD3Transformer2DModel``) on 16-channel latents, conditioned on
two CLIP text encoders with projection and a T5 encoder, as ``StableDiffusion3Pipeline.encode_prompt`` builds it:
both CLIP penultimate hidden states concatenated along the features, zero-padded to T5's width and followed by
T5's tokens along the sequence (``prompt_embeds``); the two CLIP pooled projections concatenated
(``pooled_projections``). Without T5 (``model.family_options.t5=false``) its tokens are zeros, as the pipeline
does when it has no third encoder.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from torch import Tensor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from models.families.base import Components, family_options, freeze, register
from models.families.flow import FlowMatchingFamily
from models.families.sd import load_vae, token_ids
from models.hub import load_error

OPTIONS = {"t5": True, "max_sequence_length": 256}


def t5_states(encoder: Any, tokenizer: Any, prompts: list[str], device: torch.device, width: int) -> Tensor:
    """T5's last hidden state for prompts padded to the tokenizer's length; zeros of ``width`` without T5."""
    length = tokenizer.model_max_length
    if encoder is None:
        return torch.zeros(len(prompts), length, width, device=device)
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids
    return encoder(ids.to(device))[0].float()


class SD3Family(FlowMatchingFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    pipeline_type = StableDiffusion3Pipeline
    denoiser_type = SD3Transformer2DModel

    def load(self, pretrained: str, revision: str | None, variant: str | None, vae: str | None,
             local_files_only: bool, options: Mapping[str, Any] | None = None) -> Components:
        opts = family_options(options, OPTIONS, self.name)
        common = dict(revision=revision, local_files_only=local_files_only)
        try:
            transformer = SD3Transformer2DModel.from_pretrained(pretrained, subfolder="transformer", variant=variant,
                                                                **common)
            vae_model = load_vae(pretrained, vae, variant, common)
            encoders = [CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder=f"text_encoder{suffix}",
                                                                    variant=variant, **common) for suffix in ("", "_2")]
            tokenizers = [CLIPTokenizer.from_pretrained(pretrained, subfolder=f"tokenizer{suffix}", **common)
                          for suffix in ("", "_2")]
            t5 = T5EncoderModel.from_pretrained(pretrained, subfolder="text_encoder_3", variant=variant, **common) \
                if opts["t5"] else None
            t5_tokenizer = T5Tokenizer.from_pretrained(pretrained, subfolder="tokenizer_3", **common)
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained, subfolder="scheduler", **common)
        except (OSError, ValueError) as err:
            raise load_error("model.pretrained", pretrained, err, local_files_only) from None
        t5_tokenizer.model_max_length = int(opts["max_sequence_length"])  # the T5 tokens trained and sampled with
        freeze(vae_model, *encoders, t5)
        return Components(transformer, vae_model, encoders[0], tokenizers[0], scheduler, source=pretrained,
                          text_encoder_2=encoders[1], tokenizer_2=tokenizers[1], family=self,
                          text_encoder_3=t5, tokenizer_3=t5_tokenizer)

    def cache_tag(self, components: Components) -> str:
        t5 = "t5" if components.text_encoder_3 is not None else "no-t5"
        return f"{t5}:{components.tokenizer_3.model_max_length}"

    def encode_prompts(self, components: Components, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        """``prompt_embeds`` ``[B, 77 + T5 length, T5 width]`` and ``pooled_prompt_embeds`` ``[B, P1 + P2]``."""
        hidden, pooled = [], []
        for encoder, tokenizer in ((components.text_encoder, components.tokenizer),
                                   (components.text_encoder_2, components.tokenizer_2)):
            out = encoder(token_ids(tokenizer, prompts, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            pooled.append(out[0].float())
        clip = torch.cat(hidden, dim=-1)
        width = components.unet.config.joint_attention_dim
        t5 = t5_states(components.text_encoder_3, components.tokenizer_3, prompts, device, width)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def predict(self, denoiser: Any, noisy: Tensor, t: Tensor, conditioning: Mapping[str, Tensor]) -> Tensor:
        timestep = t * 1000.0  # the transformer embeds s x num_train_timesteps, as the pipeline's timesteps
        return denoiser(hidden_states=noisy, timestep=timestep, encoder_hidden_states=conditioning["encoder_hidden_states"],
                        pooled_projections=conditioning["pooled_projections"], return_dict=False)[0].float()

    def pipeline(self, components: Components, denoiser: Any, scheduler: Any) -> StableDiffusion3Pipeline:
        return StableDiffusion3Pipeline(
            transformer=denoiser, scheduler=scheduler, vae=components.vae,
            text_encoder=components.text_encoder, tokenizer=components.tokenizer,
            text_encoder_2=components.text_encoder_2, tokenizer_2=components.tokenizer_2,
            text_encoder_3=components.text_encoder_3, tokenizer_3=components.tokenizer_3)

    def call_kwargs(self, pipe: Any) -> dict[str, Any]:
        return {"max_sequence_length": pipe.tokenizer_3.model_max_length}


SD3_FAMILY = register(SD3Family())
