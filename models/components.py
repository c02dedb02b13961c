"""Load the parts of a diffusion checkpoint that training needs, by hub id or local directory.

Which parts load is the model family's (``models/families/``): chosen by ``model.family`` or by the
checkpoint's ``model_index.json``. Components load one by one (as the diffusers training examples do) so
that no safety checker or feature extractor is downloaded.
"""
from __future__ import annotations

from pathlib import Path

from common.errors import InputError
from models.families import family_for
from models.families.base import Components, tokenizer_fingerprint
from models.families.sd import generation_pipeline

# SD 1.x/2.x components are the generic ones with one text encoder (the name callers have always used)
SDComponents = Components

__all__ = ["Components", "SDComponents", "generation_pipeline", "load_components", "load_model",
           "tokenizer_fingerprint"]


def load_model(model_cfg) -> Components:
    """``load_components`` from a ``model`` config group (``pretrained``, ``family``, ``revision``, ``vae``, ...)."""
    m = model_cfg
    options = m.get("family_options")
    return load_components(m.pretrained, revision=m.revision, variant=m.variant, vae=m.vae,
                           local_files_only=m.local_files_only, family=m.get("family", "auto"),
                           family_options=dict(options) if options else None)


def load_components(
    pretrained: str,
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
    local_files_only: bool = False,
    family: str | None = "auto",
    family_options: dict | None = None,
) -> Components:
    """Load the denoiser, VAE, text encoder(s), tokenizer(s) and the DDPM training scheduler.

    ``pretrained`` is a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local directory
    in diffusers layout; ``vae`` optionally replaces the checkpoint's VAE (e.g. a fine-tuned one);
    ``family`` (``model.family``) names the model family, or ``auto`` reads it from ``model_index.json``;
    ``family_options`` (``model.family_options``) are the family's own settings (SD 3: ``t5``, ...).
    """
    local = Path(pretrained).expanduser()
    chosen = family_for(str(local) if local.exists() else pretrained, family, revision=revision,
                        local_files_only=local_files_only)
    if local.exists():
        denoiser = chosen.denoiser_name
        if not (local / denoiser / "config.json").is_file():
            raise InputError(f"model.pretrained={pretrained}: expected a diffusers pipeline directory with {denoiser}/config.json")
        pretrained = str(local)
    return chosen.load(pretrained, revision=revision, variant=variant, vae=vae, local_files_only=local_files_only,
                       options=family_options)
