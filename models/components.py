"""Load the parts of a Stable Diffusion checkpoint that training needs, by hub id or local directory.

Components load one by one (as the diffusers training examples do) so that no safety checker or
feature extractor is downloaded, and so SDXL's second text encoder can be added without changing
callers.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from common.errors import InputError
from models.hub import load_error


@dataclass
class SDComponents:
    """A Stable Diffusion checkpoint, split into what the trainer and the encoders use."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    source: str

    @property
    def resolution(self) -> int:
        """Native image size: UNet sample size times the VAE's downsampling factor."""
        return int(self.unet.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encoder_fingerprint(self) -> str:
        """A digest of the VAE, the text encoder (configs and weights) and the tokenizer (vocabulary, merges,
        special tokens, length): keys caches of their outputs."""
        digest = hashlib.sha256()
        digest.update(tokenizer_fingerprint(self.tokenizer).encode())
        for name, model in (("vae", self.vae), ("text_encoder", self.text_encoder)):
            digest.update(name.encode())
            digest.update(json.dumps(_jsonable(model.config), sort_keys=True, default=str).encode())
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    digest.update(pname.encode())
                    digest.update(f"{p.double().sum().item():.10e}{p.double().abs().sum().item():.10e}".encode())
        return digest.hexdigest()[:16]

    def pipeline(self, unet: UNet2DConditionModel | None = None, scheduler=None) -> StableDiffusionPipeline:
        """A generation pipeline over these components (no safety checker: our metrics judge safety)."""
        return generation_pipeline(self.vae, self.text_encoder, self.tokenizer, unet or self.unet,
                                   scheduler or self.noise_scheduler)


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything that decides a tokenizer's ids: vocabulary, BPE merges, special tokens,
    maximum length and padding side."""
    merges = getattr(tokenizer, "bpe_ranks", None)  # slow tokenizers; fast ones serialize their whole pipeline
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "merges": sorted((" ".join(pair), rank) for pair, rank in merges.items()) if merges else None,
        "backend": backend.to_str() if backend is not None else None,
        "special": sorted(str(t) for t in tokenizer.all_special_tokens),
        "max_length": tokenizer.model_max_length,
        "padding_side": tokenizer.padding_side,
        "lower": getattr(tokenizer, "do_lower_case", None),
    }
    return hashlib.sha256(json.dumps(spec, default=str).encode()).hexdigest()


def generation_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    """``StableDiffusionPipeline`` over given parts, without safety checker or feature extractor."""
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _jsonable(config) -> dict:
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in items.items() if not k.startswith("_")}


def load_model(model_cfg) -> SDComponents:
    """``load_components`` from a ``model`` config group (``pretrained``, ``revision``, ``variant``, ``vae``, ...)."""
    m = model_cfg
    return load_components(m.pretrained, revision=m.revision, variant=m.variant, vae=m.vae,
                           local_files_only=m.local_files_only)


def load_components(
    pretrained: str,
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
    local_files_only: bool = False,
) -> SDComponents:
    """Load UNet, VAE, text encoder, tokenizer and the DDPM training scheduler.

    ``pretrained`` is a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local directory
    in diffusers layout; ``vae`` optionally replaces the checkpoint's VAE (e.g. a fine-tuned one).
    """
    local = Path(pretrained).expanduser()
    if local.exists():
        if not (local / "unet" / "config.json").is_file():
            raise InputError(f"model.pretrained={pretrained}: expected a diffusers pipeline directory with unet/config.json")
        pretrained = str(local)
    common = dict(revision=revision, local_files_only=local_files_only)
    try:
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", variant=variant, **common)
        vae_model = (
            AutoencoderKL.from_pretrained(vae, **common)
            if vae
            else AutoencoderKL.from_pretrained(pretrained, subfolder="vae", variant=variant, **common)
        )
        text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", variant=variant, **common)
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **common)
        scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **common)
    except (OSError, ValueError) as err:
        raise load_error("model.pretrained", pretrained, err, local_files_only) from None
    for part in (vae_model, text_encoder):
        part.requires_grad_(False).eval()
    return SDComponents(unet, vae_model, text_encoder, tokenizer, scheduler, source=pretrained)
