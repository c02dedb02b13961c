"""Build Stable Diffusion pipelines from configs with random weights, and save them in diffusers layout.

Used where weights cannot be downloaded: tests build a tiny pipeline and load it back through
``load_components`` exactly as a real checkpoint would be loaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from models.components import SDComponents
from models.tokenizer_files import write_clip_tokenizer

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
DDPM_SD: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, steps_offset=1, prediction_type="epsilon",
)


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
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text)
    return SDComponents(
        unet=UNet2DConditionModel(**{**unet, "cross_attention_dim": text["hidden_size"]}),
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler(**scheduler),
        source=str(directory),
    )


def save_components(components: SDComponents, directory: str | Path) -> Path:
    """Save as a standard ``StableDiffusionPipeline`` directory (``model_index.json`` and subfolders)."""
    directory = Path(directory)
    components.pipeline().save_pretrained(directory, safe_serialization=True)
    return directory
