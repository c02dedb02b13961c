"""Build Stable Diffusion pipelines from configs with random weights, and save them in diffusers layout.

Used where weights cannot be downloaded: tests build a tiny pipeline and load it back through
``load_components`` exactly as a real checkpoint would be loaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from models.components import SDComponents
from models.families.base import Components
from models.families.flux import FLUX_FAMILY
from models.families.sd3 import SD3_FAMILY
from models.families.sdxl import SDXL_FAMILY
from models.tokenizer_files import write_clip_tokenizer, write_t5_tokenizer

TINY_UNET: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
TINY_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    norm_num_groups=32, sample_size=16,
)
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
)
# The Stable Diffusion 1.5 architecture (published config values of its unet/, vae/ and text_encoder/),
# for benchmarks: compute does not depend on the weights, so random ones measure the real thing.
SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512,
)
SD15_TEXT: dict[str, Any] = dict(  # CLIP ViT-L/14 text tower (the vocabulary follows the tokenizer written)
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
    hidden_act="quick_gelu", projection_dim=768,
)
# A tiny SDXL UNet: conditioned on both text encoders' hidden states (concatenated: 2 x 32 features), the second's
# pooled projection (32) and six time ids of addition_time_embed_dim each (6 x 8 + 32 = 80 added-embedding inputs).
TINY_SDXL_UNET: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
    addition_embed_type="text_time", addition_time_embed_dim=8, norm_num_groups=32,
)
# The SDXL base 1.0 architecture (published config values of its unet/, vae/, text_encoder/ and text_encoder_2/), for
# benchmarks; build_sdxl_components derives cross_attention_dim (768 + 1280 = 2048) and the added-embedding input
# (6 x 256 + 1280 = 2816) from the text encoders, as the published UNet config has them.
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, norm_num_groups=32,
)
SDXL_VAE: dict[str, Any] = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025}
SDXL_TEXT: dict[str, Any] = {k: v for k, v in SD15_TEXT.items() if k != "projection_dim"}  # CLIP ViT-L/14
SDXL_TEXT_2: dict[str, Any] = dict(  # OpenCLIP ViT-bigG/14 text tower, with a 1280 projection (projection_dim)
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
    hidden_act="gelu",
)
SDXL_PROJECTION = 1280
# A tiny SD 3 MMDiT: two joint blocks (the last has no text output projection) over 2 x 2 patches; its text width (joint_attention_dim) is T5's, its pooled
# input the two CLIP projections (2 x 32), as build_sd3_components derives them.
TINY_SD3_TRANSFORMER: dict[str, Any] = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, caption_projection_dim=32, pos_embed_max_size=32,
)
TINY_T5: dict[str, Any] = dict(d_model=64, d_ff=64, d_kv=16, num_layers=1, num_heads=4, relative_attention_num_buckets=8)
FLOW_SD3: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0)
# A tiny FLUX transformer: one double-stream and one single-stream block; rotary axes (4, 6, 6) over 16-wide heads.
TINY_FLUX_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    axes_dims_rope=(4, 6, 6),
)
# FLUX.1's scheduler: the shift follows the image's token count (256 .. 4096 tokens: 0.5 .. 1.15)
FLOW_FLUX: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                 max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
DDPM_SD: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, steps_offset=1, prediction_type="epsilon",
)


def clip_config(tokenizer, spec: dict[str, Any], **extra) -> CLIPTextConfig:
    """A CLIP text config for ``spec`` whose vocabulary and special tokens are ``tokenizer``'s."""
    return CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **spec, **extra)


def build_components(
    directory: str | Path,
    unet: dict[str, Any] = TINY_UNET,
    vae: dict[str, Any] = TINY_VAE,
    text: dict[str, Any] = TINY_TEXT,
    scheduler: dict[str, Any] = DDPM_SD,
    words: list[str] = (),
    seed: int = 0,
) -> SDComponents:
    """Random-weight components from configs; the tokenizer is written for ``words`` into ``directory``."""
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(Path(directory) / "tokenizer", words, model_max_length=text["max_position_embeddings"])
    return SDComponents(
        unet=UNet2DConditionModel(**{**unet, "cross_attention_dim": text["hidden_size"]}),
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(clip_config(tokenizer, text)),
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler(**scheduler),
        source=str(directory),
    )


def save_components(components: SDComponents, directory: str | Path) -> Path:
    """Save as the family's standard pipeline directory (``model_index.json`` and subfolders)."""
    directory = Path(directory)
    components.pipeline().save_pretrained(directory, safe_serialization=True)
    return directory


def build_sdxl_components(
    directory: str | Path,
    unet: dict[str, Any] = TINY_SDXL_UNET,
    vae: dict[str, Any] = TINY_VAE,
    text: dict[str, Any] = TINY_TEXT,
    text_2: dict[str, Any] = TINY_TEXT,
    projection_dim: int = 32,
    words: list[str] = (),
    seed: int = 0,
) -> Components:
    """Random-weight SDXL components: two CLIP text encoders (the second with a ``projection_dim`` projection),
    tokenizers for ``words`` written into ``directory``, and the UNet's cross-attention and added-embedding
    sizes derived from them; the sampling scheduler is Euler, as SDXL ships."""
    torch.manual_seed(seed)
    directory = Path(directory)
    tokenizer = write_clip_tokenizer(directory / "tokenizer", words, model_max_length=text["max_position_embeddings"])
    tokenizer_2 = write_clip_tokenizer(directory / "tokenizer_2", words, model_max_length=text_2["max_position_embeddings"])

    time_ids = 6 * unet["addition_time_embed_dim"]
    return Components(
        unet=UNet2DConditionModel(**{**unet, "cross_attention_dim": text["hidden_size"] + text_2["hidden_size"],
                                     "projection_class_embeddings_input_dim": time_ids + projection_dim}),
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(clip_config(tokenizer, text)),
        tokenizer=tokenizer,
        noise_scheduler=EulerDiscreteScheduler(**{k: v for k, v in DDPM_SD.items() if k != "clip_sample"},
                                               timestep_spacing="leading"),
        source=str(directory),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer_2, text_2, projection_dim=projection_dim)),
        tokenizer_2=tokenizer_2,
        family=SDXL_FAMILY,
    )


def t5_model(tokenizer, spec: dict[str, Any]) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, **spec))


def build_sd3_components(
    directory: str | Path,
    transformer: dict[str, Any] = TINY_SD3_TRANSFORMER,
    vae: dict[str, Any] = TINY_VAE,
    text: dict[str, Any] = TINY_TEXT,
    t5: dict[str, Any] | None = TINY_T5,
    projection_dim: int | tuple[int, int] = 32,
    max_sequence_length: int = 16,
    words: list[str] = (),
    seed: int = 0,
    text_2: dict[str, Any] | None = None,
    t5_width: int | None = None,
) -> Components:
    """Random-weight SD 3 components: two CLIP text encoders (``text``, ``text_2``: the same by default) with
    ``projection_dim`` projections (one for both, or one each), a T5 encoder (``t5=None``: none, its tokens zeros
    of ``t5_width``), tokenizers for ``words`` written into ``directory``; the transformer's text width is T5's
    and its pooled input the two projections; a VAE with SD 3's shift and scale."""
    torch.manual_seed(seed)
    directory = Path(directory)
    specs = [text, text_2 or text]
    projections = projection_dim if isinstance(projection_dim, tuple) else (projection_dim, projection_dim)
    tokenizers = [write_clip_tokenizer(directory / f"tokenizer{s}", words, model_max_length=spec["max_position_embeddings"])
                  for s, spec in zip(("", "_2"), specs)]
    t5_tokenizer = write_t5_tokenizer(directory / "tokenizer_3", words, model_max_length=max_sequence_length)
    width = t5["d_model"] if t5 else (t5_width or TINY_T5["d_model"])
    encoders = [CLIPTextModelWithProjection(clip_config(tok, spec, projection_dim=proj))
                for tok, spec, proj in zip(tokenizers, specs, projections)]
    t5_encoder = t5_model(t5_tokenizer, t5) if t5 else None
    for part in (*encoders, t5_encoder):  # frozen and in eval mode, as the family loads them (T5 has dropout)
        if part is not None:
            part.requires_grad_(False).eval()
    return Components(
        unet=SD3Transformer2DModel(**{**transformer, "in_channels": vae["latent_channels"],
                                      "out_channels": vae["latent_channels"], "joint_attention_dim": width,
                                      "pooled_projection_dim": sum(projections)}),
        vae=AutoencoderKL(**{"shift_factor": 0.0609, "scaling_factor": 1.5305, **vae}),
        text_encoder=encoders[0], tokenizer=tokenizers[0],
        noise_scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SD3),
        source=str(directory),
        text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
        text_encoder_3=t5_encoder, tokenizer_3=t5_tokenizer,
        family=SD3_FAMILY,
    )


def build_flux_components(
    directory: str | Path,
    transformer: dict[str, Any] = TINY_FLUX_TRANSFORMER,
    vae: dict[str, Any] = TINY_VAE,
    text: dict[str, Any] = TINY_TEXT,
    t5: dict[str, Any] = TINY_T5,
    guidance_embeds: bool = True,
    max_sequence_length: int = 16,
    words: list[str] = (),
    seed: int = 0,
) -> Components:
    """Random-weight FLUX components: CLIP (pooled) and T5 text encoders with tokenizers for ``words`` written
    into ``directory``, a transformer on 2 x 2-packed latents (``guidance_embeds``: a dev-style guidance
    embedding), a VAE with FLUX's shift and scale, FLUX's resolution-dependent scheduler."""
    torch.manual_seed(seed)
    directory = Path(directory)
    tokenizer = write_clip_tokenizer(directory / "tokenizer", words, model_max_length=text["max_position_embeddings"])
    t5_tokenizer = write_t5_tokenizer(directory / "tokenizer_2", words, model_max_length=max_sequence_length)
    clip = CLIPTextModel(clip_config(tokenizer, text))
    t5_encoder = t5_model(t5_tokenizer, t5)
    for part in (clip, t5_encoder):
        part.requires_grad_(False).eval()
    return Components(
        unet=FluxTransformer2DModel(**{**transformer, "in_channels": 4 * vae["latent_channels"],
                                       "joint_attention_dim": t5["d_model"], "pooled_projection_dim": text["hidden_size"],
                                       "guidance_embeds": guidance_embeds}),
        vae=AutoencoderKL(**{**vae, "shift_factor": 0.1159, "scaling_factor": 0.3611}),
        text_encoder=clip, tokenizer=tokenizer,
        noise_scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_FLUX),
        source=str(directory),
        text_encoder_2=t5_encoder, tokenizer_2=t5_tokenizer,
        family=FLUX_FAMILY,
    )
