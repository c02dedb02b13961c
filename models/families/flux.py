"""FLUX.1: a rectified-flow transformer (``FluxTransformer2DModel``) on 2 x 2-packed latents with rotary image and
text position ids, conditioned on T5's hidden states (``prompt_embeds``) and CLIP's pooled output
(``pooled_prompt_embeds``), as ``FluxPipeline.encode_prompt`` builds them. Guidance-distilled checkpoints (dev)
embed a guidance value (``model.family_options.guidance``, the training scripts' 3.5). Noise levels shift with
the image's token count, as the checkpoint's scheduler does (``use_dynamic_shifting``).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from common.errors import InputError
from models.families.base import Components, family_options, freeze, register
from models.families.flow import FlowMatchingFamily
from models.families.sd import load_vae, token_ids
from models.families.sd3 import t5_states
from models.hub import load_error

OPTIONS = {"t5": True, "max_sequence_length": 512, "guidance": 3.5}


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    pipeline_type = FluxPipeline
    denoiser_type = FluxTransformer2DModel

    def __init__(self, guidance: float = OPTIONS["guidance"]) -> None:
        self.guidance = float(guidance)  # used only by transformers with guidance_embeds (dev)

    def load(self, pretrained: str, revision: str | None, variant: str | None, vae: str | None,
             local_files_only: bool, options: Mapping[str, Any] | None = None) -> Components:
        opts = family_options(options, OPTIONS, self.name)
        if not opts["t5"]:
            raise InputError("model.family_options.t5=false: FLUX conditions on T5's states and cannot drop them "
                             "(SD 3 can: model=sd3)")
        common = dict(revision=revision, local_files_only=local_files_only)
        try:
            transformer = FluxTransformer2DModel.from_pretrained(pretrained, subfolder="transformer", variant=variant,
                                                                 **common)
            vae_model = load_vae(pretrained, vae, variant, common)
            clip = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", variant=variant, **common)
            tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **common)
            t5 = T5EncoderModel.from_pretrained(pretrained, subfolder="text_encoder_2", variant=variant, **common)
            t5_tokenizer = T5Tokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **common)
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained, subfolder="scheduler", **common)
        except (OSError, ValueError) as err:
            raise load_error("model.pretrained", pretrained, err, local_files_only) from None
        t5_tokenizer.model_max_length = int(opts["max_sequence_length"])
        freeze(vae_model, clip, t5)
        return Components(transformer, vae_model, clip, tokenizer, scheduler, source=pretrained, text_encoder_2=t5,
                          tokenizer_2=t5_tokenizer, family=type(self)(guidance=opts["guidance"]))

    def native_resolution(self, components: Components) -> int:
        """FLUX's pipelines default to 128 x 128 latents (1024 px with its VAE)."""
        return 128 * 2 ** (len(components.vae.config.block_out_channels) - 1)

    def cache_tag(self, components: Components) -> str:
        return f"t5:{components.tokenizer_2.model_max_length}"

    def encode_prompts(self, components: Components, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        """T5's last hidden state ``[B, L, D]`` and CLIP's pooled output ``[B, P]``."""
        pooled = components.text_encoder(token_ids(components.tokenizer, prompts, device), output_hidden_states=False)
        t5 = t5_states(components.text_encoder_2, components.tokenizer_2, prompts, device,
                       components.unet.config.joint_attention_dim)
        return {"prompt_embeds": t5, "pooled_prompt_embeds": pooled.pooler_output.float()}

    def shift(self, scheduler: Any, sigmas: Tensor, shape: torch.Size) -> Tensor:
        """The resolution-dependent shift: ``mu`` linear in the image's token count between the scheduler's
        base and max sequence lengths, ``s' = e^mu / (e^mu + 1/s - 1)``; the constant shift without dynamic shifting."""
        config = scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return super().shift(scheduler, sigmas, shape)
        tokens = (shape[-2] // 2) * (shape[-1] // 2)
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        mu = config.base_shift + slope * (tokens - config.base_image_seq_len)
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))

    def predict(self, denoiser: Any, noisy: Tensor, t: Tensor, conditioning: Mapping[str, Tensor]) -> Tensor:
        """Pack the latents into 2 x 2 patches with their position ids, run the transformer at noise level ``t``
        (with the guidance value where it embeds one) and unpack the velocity."""
        b, c, h, w = noisy.shape
        text = conditioning["encoder_hidden_states"]
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = torch.full((b,), self.guidance, device=noisy.device) if denoiser.config.guidance_embeds else None
        out = denoiser(hidden_states=packed, timestep=t, guidance=guidance, encoder_hidden_states=text,
                       pooled_projections=conditioning["pooled_projections"], txt_ids=text_ids, img_ids=image_ids,
                       return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h, w, vae_scale_factor=1).float()  # sizes already in latents

    def pipeline(self, components: Components, denoiser: Any, scheduler: Any) -> FluxPipeline:
        return FluxPipeline(scheduler=scheduler, vae=components.vae, text_encoder=components.text_encoder,
                            tokenizer=components.tokenizer, text_encoder_2=components.text_encoder_2,
                            tokenizer_2=components.tokenizer_2, transformer=denoiser)

    def call_kwargs(self, pipe: Any) -> dict[str, Any]:
        return {"max_sequence_length": pipe.tokenizer_2.model_max_length}

    def initial_latents(self, pipe: Any, seeds: list[int], height: int | None, width: int | None) -> Tensor:
        """Per-seed noise ``[C, H, W]`` (``H`` the latent height rounded to the 2 x 2 packing), packed as
        ``FluxPipeline`` takes ``latents=``."""
        factor = pipe.vae_scale_factor
        h = 2 * (int(height or pipe.default_sample_size * factor) // (factor * 2))
        w = 2 * (int(width or pipe.default_sample_size * factor) // (factor * 2))
        c = pipe.transformer.config.in_channels // 4
        noise = torch.stack([torch.randn((c, h, w), generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        return FluxPipeline._pack_latents(noise, len(seeds), c, h, w)


FLUX_FAMILY = register(FluxFamily())
