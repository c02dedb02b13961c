"""Images to VAE latents and prompts to text embeddings: the work the latent cache does once."""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from models.components import SDComponents, generation_pipeline

log = logging.getLogger(__name__)


class ConditionEncoder:
    """Frozen VAE + text encoder of one checkpoint, on a chosen device and dtype."""

    def __init__(self, components: SDComponents) -> None:
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self._fingerprint_of = components.encoder_fingerprint
        self._fingerprint: str | None = None
        self._warned_truncation = False

    def fingerprint(self) -> str:
        """Digest of the encoders' configs and weights (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = self._fingerprint_of()
        return self._fingerprint

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ConditionEncoder":
        self.vae.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def pipeline(self, unet, scheduler):
        """A generation pipeline of these encoders with a (trained) ``unet``: validation and reports sample with it."""
        return generation_pipeline(self.vae, self.text_encoder, self.tokenizer, unet, scheduler)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Pixels in ``[-1, 1]`` of shape ``[B, 3, H, W]`` to scaled latents (posterior mean, deterministic)."""
        vae = self.vae
        dist = vae.encode(pixels.to(self.device, next(vae.parameters()).dtype)).latent_dist
        latents = dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Prompts to the text encoder's last hidden state ``[B, L, D]`` (SD 1.x and 2.x conditioning)."""
        tok = self.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        if not self._warned_truncation:
            too_long = [p for p in prompts if len(tok(p).input_ids) > tok.model_max_length]
            if too_long:
                self._warned_truncation = True
                log.warning(
                    "%d prompt(s) exceed the text encoder's %d-token limit and are truncated, e.g. %r",
                    len(too_long), tok.model_max_length, too_long[0][:80],
                )
        return self.text_encoder(ids.input_ids.to(self.device))[0].float()
