"""The model-family interface: everything that differs between diffusion architectures (which parts load, how
prompts become conditioning, what the latent cache keeps, how the denoiser is called and trained, which pipeline
samples) behind one abstract class, so the trainer, the data package and the workflows never ask which model
they hold.

A family is a stateless strategy object; the loaded weights are a :class:`Components`. Families are chosen by
``model.family`` or by the checkpoint's ``model_index.json`` (``models.families.family_for``).
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from torch import Tensor

from common.errors import InputError
from data.pairs import ImageGeometry


@dataclass
class Components:
    """The loaded parts of one checkpoint. ``unet`` is the trained denoiser (a UNet, or the transformer of the
    flow-matching families); ``text_encoder_2``/``tokenizer_2`` (SDXL, SD 3, FLUX) and ``text_encoder_3``/
    ``tokenizer_3`` (SD 3's T5) are set by families with more text encoders."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    source: str
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    family: "ModelFamily | None" = None
    text_encoder_3: Any = None
    tokenizer_3: Any = None

    def __post_init__(self) -> None:
        if self.family is None:  # in-memory components built without a family (tests, the toy world): SD 1.x/2.x
            self.family = FAMILIES[DEFAULT_FAMILY]

    @property
    def resolution(self) -> int:
        """Native image size (the family's: by default the denoiser's sample size times the VAE's downsampling)."""
        return self.family.native_resolution(self)

    def text_encoders(self) -> list[tuple[str, Any, Any]]:
        """``(name, encoder, tokenizer)`` of every text encoder present."""
        pairs = [("text_encoder", self.text_encoder, self.tokenizer), ("text_encoder_2", self.text_encoder_2, self.tokenizer_2),
                 ("text_encoder_3", self.text_encoder_3, self.tokenizer_3)]
        return [(n, e, t) for n, e, t in pairs if e is not None]

    def encoder_fingerprint(self) -> str:
        """A digest of the VAE, the text encoders (configs and weights) and the tokenizers (vocabulary, merges,
        special tokens, length): keys caches of their outputs."""
        digest = hashlib.sha256()
        encoders = self.text_encoders()
        for _, _, tokenizer in encoders:
            digest.update(tokenizer_fingerprint(tokenizer).encode())
        for name, model in [("vae", self.vae)] + [(n, e) for n, e, _ in encoders]:
            digest.update(name.encode())
            digest.update(json.dumps(_jsonable(model.config), sort_keys=True, default=str).encode())
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    digest.update(pname.encode())
                    digest.update(f"{p.double().sum().item():.10e}{p.double().abs().sum().item():.10e}".encode())
        return digest.hexdigest()[:16]

    def pipeline(self, unet: Any = None, scheduler: Any = None):
        """The family's generation pipeline over these components (no safety checker: our metrics judge safety)."""
        return self.family.pipeline(self, unet or self.unet, scheduler or self.noise_scheduler)


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


def _jsonable(config) -> dict:
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in items.items() if not k.startswith("_")}


class ModelFamily(ABC):
    """One architecture family. Subclasses set the class attributes and implement the abstract methods.

    Batches name their tensors: every key of :attr:`prompt_keys` per pair (the prompt's conditioning), and
    ``<key>_w`` / ``<key>_l`` for every key of :attr:`image_keys` (per image side, e.g. SDXL's time ids).
    """

    #: ``model.family`` value
    name: ClassVar[str]
    #: ``_class_name`` values of ``model_index.json`` that select this family
    pipeline_classes: ClassVar[tuple[str, ...]]
    #: the diffusers pipeline class that samples and whose ``save_lora_weights`` writes LoRA exports
    pipeline_type: ClassVar[type]
    #: the per-prompt tensors the latent cache stores and batches carry (the first is the main one)
    prompt_keys: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    #: the per-image-side tensors the latent cache stores (from each image's :class:`ImageGeometry`)
    image_keys: ClassVar[tuple[str, ...]] = ()
    #: the denoiser's subfolder in the checkpoint and attribute of the pipeline (LoRA keys start with it)
    denoiser_name: ClassVar[str] = "unet"
    #: the denoiser's diffusers model class
    denoiser_type: ClassVar[type]
    #: whether LoRA exports add the kohya-ss file (its key scheme is the UNet's module paths)
    kohya_export: ClassVar[bool] = True
    #: the ``sampler.scheduler`` names this family samples with
    sampling_schedulers: ClassVar[tuple[str, ...]] = ("ddim", "dpm", "euler")

    def native_resolution(self, components: Components) -> int:
        """Image size the checkpoint was trained at: the denoiser's sample size times the VAE's downsampling."""
        return int(components.unet.config.sample_size) * 2 ** (len(components.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ loading
    @abstractmethod
    def load(self, pretrained: str, revision: str | None, variant: str | None, vae: str | None,
             local_files_only: bool, options: Mapping[str, Any] | None = None) -> Components:
        """The checkpoint's parts this family trains with (frozen encoders in eval mode); ``options`` are
        ``model.family_options`` (:func:`family_options` checks them against the family's own)."""

    def cache_tag(self, components: Components) -> str:
        """What else than the encoders' weights decides a prompt's tensors, digested into latent cache keys
        ("" keeps the keys of SD's caches)."""
        return self.unconditional_kind

    # ------------------------------------------------------------ conditioning
    @abstractmethod
    def encode_prompts(self, components: Components, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        """Prompts to a dict with one float tensor per :attr:`prompt_keys`, batch first."""

    #: how :meth:`unconditional` is made, digested into latent cache keys ("" for the empty prompt's encoding)
    unconditional_kind: ClassVar[str] = ""

    def unconditional(self, components: Components, device: torch.device) -> dict[str, Tensor]:
        """The unconditional prompt's tensors (batch of one) that prompt dropout (``data.p_uncond``) trains on,
        as the family's pipeline conditions unconditional guidance: the empty prompt's encoding by default."""
        return self.encode_prompts(components, [""], device)

    def image_conditioning(self, geometry: ImageGeometry) -> dict[str, Tensor]:
        """One tensor per :attr:`image_keys` from an image's preprocessing geometry (none by default)."""
        return {}

    @abstractmethod
    def conditioning(self, batch: Mapping[str, Any], sides: tuple[str, ...]) -> dict[str, Tensor]:
        """The denoiser's conditioning for the rows ``torch.cat([latents_<side> for side in sides])`` of a batch."""

    # ---------------------------------------------------------------- training
    def check_scheduler(self, scheduler: Any) -> None:
        """Refuse a training scheduler this family cannot build targets with (any by default)."""
        return None

    def check_noise_sampling(self, noise_sampling: Mapping[str, Any] | None) -> None:
        """Refuse ``model.noise_sampling`` settings this family does not train with (only ``None`` by default)."""
        if noise_sampling:
            raise InputError(f"model.noise_sampling: the {self.name} family draws integer timesteps uniformly "
                             "(model.t_min/t_max); noise-level sampling is for the flow-matching families (sd3, flux)")

    def draw_timesteps(self, scheduler: Any, shape: torch.Size, t_min: int, t_max: int,
                       noise_sampling: Mapping[str, Any] | None = None, generator: torch.Generator | None = None,
                       device: torch.device | None = None) -> Tensor:
        """One training timestep per row of latents of ``shape``, in ``[t_min, t_max]`` of the scheduler's
        training steps: uniform integers by default (on the host with ``generator``, else on ``device``)."""
        if generator is not None:
            return torch.randint(t_min, t_max + 1, (shape[0],), generator=generator)
        return torch.randint(t_min, t_max + 1, (shape[0],), device=device)

    def error_weights(self, t: Tensor, noise_sampling: Mapping[str, Any] | None = None) -> Tensor | None:
        """Per-sample weights of the squared errors at timesteps ``t`` (``None``: all ones)."""
        return None

    @abstractmethod
    def noisy_and_target(self, scheduler: Any, latents: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The denoiser's input at timestep indices ``t`` and the float32 regression target it is trained on."""

    @abstractmethod
    def predict(self, denoiser: Any, noisy: Tensor, t: Tensor, conditioning: Mapping[str, Tensor]) -> Tensor:
        """The denoiser's float32 prediction (same layout as the target)."""

    # ---------------------------------------------------------------- sampling
    @abstractmethod
    def pipeline(self, components: Components, denoiser: Any, scheduler: Any):
        """A diffusers generation pipeline over ``components`` with ``denoiser`` and ``scheduler``."""

    def sampling_scheduler(self, name: str, config: Mapping[str, Any]) -> Any:
        """The scheduler ``sampler.scheduler=name`` samples with, on the checkpoint's noise schedule ``config``."""
        if name not in self.sampling_schedulers:
            raise InputError(f"sampler.scheduler: the {self.name} family samples with one of "
                             f"{', '.join(self.sampling_schedulers)}, got {name!r}")
        return SAMPLING_SCHEDULERS[name].from_config(config)

    def call_kwargs(self, pipe: Any) -> dict[str, Any]:
        """Arguments every sampling call of the family's pipeline passes (none by default)."""
        return {}

    def initial_latents(self, pipe: Any, seeds: list[int], height: int | None, width: int | None) -> Tensor:
        """The starting noise of each image, from a generator seeded by its own seed, in the layout the
        pipeline's ``latents=`` argument takes (batch-size invariant sampling)."""
        denoiser, factor = getattr(pipe, self.denoiser_name), pipe.vae_scale_factor
        h = (height or denoiser.config.sample_size * factor) // factor
        w = (width or denoiser.config.sample_size * factor) // factor
        return torch.stack([torch.randn((denoiser.config.in_channels, h, w), generator=torch.Generator().manual_seed(int(s)))
                            for s in seeds])


#: the names ``sampler.scheduler`` takes and their diffusers classes; each family says which it samples with
SAMPLING_SCHEDULERS: dict[str, type] = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler,
                                        "euler": EulerDiscreteScheduler}
#: every family by ``name``; each family module registers its own (``models/families/__init__.py`` imports them all)
FAMILIES: dict[str, ModelFamily] = {}
DEFAULT_FAMILY = "sd"


def register(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.name] = family
    return family


def family_of_pipeline(pipe: Any) -> ModelFamily:
    """The family whose pipeline class ``pipe`` is (SD's for an unknown class)."""
    name = type(pipe).__name__
    return next((f for f in FAMILIES.values() if name in f.pipeline_classes), FAMILIES[DEFAULT_FAMILY])


def family_options(options: Mapping[str, Any] | None, known: Mapping[str, Any], family: str) -> dict[str, Any]:
    """``model.family_options`` over a family's defaults ``known``; an unknown key is one line naming it."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = f"takes {', '.join(sorted(known))}" if known else "takes none"
        raise InputError(f"model.family_options: the {family} family {takes}, not {', '.join(unknown)}")
    return {**known, **options}


def freeze(*parts: torch.nn.Module | None) -> None:
    """Frozen parts of a loaded model, in float32 as diffusers loads the denoiser and the VAE. transformers loads a
    text encoder in its checkpoint's dtype (float16 for SD 3's and FLUX's), and a pipeline takes its latents' dtype
    from the prompt embeddings; ``model.frozen_dtype`` lowers the precision afterwards, for every part alike."""
    for part in parts:
        if part is not None:
            part.requires_grad_(False).eval().float()


def repeat_cond(cond: Mapping[str, Tensor], copies: int) -> dict[str, Tensor]:
    """Each tensor of ``cond`` repeated ``copies`` times along the batch."""
    return {k: v.repeat(copies, *([1] * (v.ndim - 1))) for k, v in cond.items()}


def unknown_family(name: str, known: list[str]) -> InputError:
    return InputError(f"model.family: expected auto or one of {', '.join(known)}, got {name!r}")
