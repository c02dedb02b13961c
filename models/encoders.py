"""Images to VAE latents and prompts to their conditioning tensors: the work the latent cache does once.

What a prompt becomes (and what the cache keeps per image) is the model family's (``models/families/``);
this class holds one checkpoint's frozen encoders and hands the data package what it asks for.
"""
from __future__ import annotations

import hashlib
import logging

import torch
from torch import Tensor

from models.families.base import Components, ImageGeometry

log = logging.getLogger(__name__)


class ConditionEncoder:
    """Frozen VAE + text encoder(s) of one checkpoint, on a chosen device and dtype."""

    def __init__(self, components: Components) -> None:
        self.components = components
        self.family = components.family
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self._fingerprint: str | None = None
        self._warned_truncation = False

    @property
    def prompt_keys(self) -> tuple[str, ...]:
        """The tensors one prompt becomes (the latent cache stores each)."""
        return self.family.prompt_keys

    @property
    def image_keys(self) -> tuple[str, ...]:
        """The tensors stored per image side besides its latents (SDXL: its time ids)."""
        return self.family.image_keys

    def fingerprint(self) -> str:
        """Digest of the encoders' configs and weights (computed once)."""
        if self._fingerprint is None:
            digest = self.components.encoder_fingerprint()
            kind = self.family.cache_tag(self.components)  # "" (SD: the empty prompt's encoding) keeps SD's keys
            self._fingerprint = hashlib.sha256(f"{digest}:{kind}".encode()).hexdigest()[:16] if kind else digest
        return self._fingerprint

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ConditionEncoder":
        self.vae.to(device=device, dtype=dtype)
        for _, encoder, _ in self.components.text_encoders():
            encoder.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def pipeline(self, unet, scheduler):
        """A generation pipeline of these encoders with a (trained) ``unet``: validation and reports sample with it."""
        return self.family.pipeline(self.components, unet, scheduler)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Pixels in ``[-1, 1]`` of shape ``[B, 3, H, W]`` to scaled latents (posterior mean, deterministic)."""
        vae = self.vae
        dist = vae.encode(pixels.to(self.device, next(vae.parameters()).dtype)).latent_dist
        latents = dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    def image_conditioning(self, geometry: ImageGeometry) -> dict[str, Tensor]:
        """The per-image tensors of :attr:`image_keys` for an image preprocessed with ``geometry``."""
        return self.family.image_conditioning(geometry)

    @torch.no_grad()
    def encode_prompt_tensors(self, prompts: list[str]) -> dict[str, Tensor]:
        """Prompts to one float tensor per :attr:`prompt_keys` (SD: the last hidden state ``[B, L, D]``)."""
        encoded = self.family.encode_prompts(self.components, prompts, self.device)
        # after encoding, as it always was: a fast tokenizer keeps its last call's padding in the state the
        # cache's fingerprint digests, and this check's unpadded calls leave it as a fresh tokenizer has it
        self._warn_truncation(prompts)
        return encoded

    @torch.no_grad()
    def unconditional_tensors(self) -> dict[str, Tensor]:
        """The family's unconditional prompt, one float tensor per :attr:`prompt_keys` (batch of one): what prompt
        dropout trains on (SD: the empty prompt's encoding; SDXL: zeros)."""
        tensors = {k: v.float() for k, v in self.family.unconditional(self.components, self.device).items()}
        for _, _, tokenizer in self.components.text_encoders():
            tokenizer("")  # an unpadded call leaves a fast tokenizer's state as a fresh one has it (see above)
        return tensors

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Prompts to their main conditioning tensor ``prompt_embeds`` ``[B, L, D]``."""
        return self.encode_prompt_tensors(prompts)["prompt_embeds"]

    def _warn_truncation(self, prompts: list[str]) -> None:
        if self._warned_truncation:
            return
        limit = min(tok.model_max_length for _, _, tok in self.components.text_encoders())
        too_long = [p for p in prompts if any(len(tok(p).input_ids) > tok.model_max_length
                                              for _, _, tok in self.components.text_encoders())]
        if too_long:
            self._warned_truncation = True
            log.warning("%d prompt(s) exceed the text encoder's %d-token limit and are truncated, e.g. %r",
                        len(too_long), limit, too_long[0][:80])
