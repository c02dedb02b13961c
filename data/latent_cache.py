"""VAE latents and text embeddings computed once and stored in safetensors, so a step runs only the UNet.

A cache lives in ``<cache_dir>/<key>/`` where the key digests everything its contents depend on:
the encoders' weights, the dataset's images and prompts, the resolution and the preprocessing. Any
change gives a new key (a miss) rather than silently stale latents. Files are written to a
temporary name and renamed, so an interrupted build never leaves a half-written cache behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Protocol, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from common.errors import InputError
from data.pairs import (
    ImageGeometry,
    ImageLimits,
    PreferencePair,
    describe,
    load_rgb,
    one_line,
    preprocess_with_geometry,
    square_geometry,
)

log = logging.getLogger(__name__)
CACHE_VERSION = 1
CACHE_FILE = "latents.safetensors"


class LatentEncoder(Protocol):
    """What the cache needs of a model's frozen encoders (``models.encoders.ConditionEncoder`` is one).

    A prompt becomes one tensor per name of ``prompt_keys`` (the first, ``prompt_embeds``, is the main one);
    an image, its latents and one tensor per name of ``image_keys`` made from its preprocessing geometry.
    """

    prompt_keys: tuple[str, ...]
    image_keys: tuple[str, ...]

    @property
    def device(self) -> torch.device: ...

    def fingerprint(self) -> str: ...

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "LatentEncoder": ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_prompt_tensors(self, prompts: list[str]) -> dict[str, torch.Tensor]: ...

    def image_conditioning(self, geometry: ImageGeometry) -> dict[str, torch.Tensor]: ...

    def unconditional_tensors(self) -> dict[str, torch.Tensor]: ...


def uncond_key(name: str) -> str:
    """The cache's name for the empty prompt's ``name`` tensor (``uncond_embeds`` for ``prompt_embeds``)."""
    return "uncond_embeds" if name == "prompt_embeds" else f"uncond_{name}"


def dataset_fingerprint(pairs: Sequence[PreferencePair]) -> str:
    digest = hashlib.sha256()
    for p in pairs:
        parts = [p.prompt, describe(p.image_w), describe(p.image_l) if p.image_l is not None else "-"]
        digest.update("\x1f".join(parts).encode() + b"\x1e")
    return digest.hexdigest()[:16]


def cache_key(encoder_fingerprint: str, pairs: Sequence[PreferencePair], resolution: int,
              center_crop: bool, flip: bool, dtype: str, limits: ImageLimits | None = None) -> str:
    """The cache's folder name; ``limits`` (when given) is part of it, as it decides which pairs are valid."""
    spec = dict(version=CACHE_VERSION, encoders=encoder_fingerprint, data=dataset_fingerprint(pairs),
                resolution=resolution, center_crop=center_crop, flip=flip, dtype=dtype)
    if limits is not None:
        spec["image_limits"] = [limits.max_pixels, limits.max_aspect_ratio, limits.min_side]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def build_cache(directory: Path, pairs: Sequence[PreferencePair], encoder: LatentEncoder, resolution: int,
                center_crop: bool, flip: bool, dtype: torch.dtype, batch_size: int = 8, skip_bad: bool = False,
                limits: ImageLimits = ImageLimits()) -> Path:  # noqa: B008 - a frozen dataclass
    """Encode every pair (and its mirror image when ``flip``) and every distinct prompt; write atomically.

    An unreadable image, or one outside ``limits`` (checked before decoding), stops the build with its
    one-line error, or with ``skip_bad`` marks the pair invalid (``valid`` row 0, its error in the metadata)
    and stores zeros in its place.
    """
    has_losers = all(p.image_l is not None for p in pairs)
    sides = ["w", "l"] if has_losers else ["w"]
    mirrors = [""] + (["_flip"] if flip else [])
    image_keys = ["latents", *encoder.image_keys]
    chunks: dict[str, list[torch.Tensor]] = {f"{k}_{s}{m}": [] for k in image_keys for s in sides for m in mirrors}
    valid = torch.ones(len(pairs), dtype=torch.uint8)
    errors: list[str] = []

    def pixels_of(index: int, pair: PreferencePair, side: str) -> tuple[torch.Tensor, ImageGeometry]:
        try:
            image = load_rgb(getattr(pair, f"image_{side}"), pair.source, limits)
            return preprocess_with_geometry(image, resolution, center_crop)
        except InputError as error:
            if not skip_bad:
                raise
            valid[index] = 0
            errors.append(str(error))
            return torch.zeros(3, resolution, resolution), square_geometry(resolution)

    def add_image_tensors(side: str, mirror: str, geometries: list[ImageGeometry]) -> None:
        if encoder.image_keys:  # e.g. SDXL's time ids, kept in float32 (sizes above 2048 are not exact in half)
            rows = [encoder.image_conditioning(g.flipped() if mirror else g) for g in geometries]
            for key in encoder.image_keys:
                chunks[f"{key}_{side}{mirror}"].append(torch.stack([r[key] for r in rows]).float().cpu())

    for start in tqdm(range(0, len(pairs), batch_size), desc="Caching latents", unit="batch"):
        batch = pairs[start:start + batch_size]
        for side in sides:
            loaded = [pixels_of(start + k, p, side) for k, p in enumerate(batch)]
            pixels, geometries = torch.stack([x for x, _ in loaded]), [g for _, g in loaded]
            chunks[f"latents_{side}"].append(encoder.encode_images(pixels).to(dtype).cpu())
            add_image_tensors(side, "", geometries)
            if flip:
                chunks[f"latents_{side}_flip"].append(encoder.encode_images(pixels.flip(-1)).to(dtype).cpu())
                add_image_tensors(side, "_flip", geometries)
    prompts = list(dict.fromkeys(p.prompt for p in pairs))
    lookup = {prompt: i for i, prompt in enumerate(prompts)}
    encoded = [encoder.encode_prompt_tensors(prompts[i:i + batch_size])
               for i in tqdm(range(0, len(prompts), batch_size), desc="Caching text embeddings", unit="batch")]
    empty = encoder.unconditional_tensors()  # the family's: SD the empty prompt, SDXL zeros
    tensors = {k: torch.cat(v).contiguous() for k, v in chunks.items()}
    for key in encoder.prompt_keys:
        tensors[key] = torch.cat([e[key].to(dtype).cpu() for e in encoded]).contiguous()
        tensors[uncond_key(key)] = empty[key].to(dtype).cpu().contiguous()
    tensors["prompt_index"] = torch.tensor([lookup[p.prompt] for p in pairs], dtype=torch.int64)
    tensors["valid"] = valid

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{CACHE_FILE}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata={"pairs": str(len(pairs)), "version": str(CACHE_VERSION),
                                           "errors": json.dumps(errors[:20]),
                                           "prompt_keys": json.dumps(list(encoder.prompt_keys)),
                                           "image_keys": json.dumps(list(encoder.image_keys))})
    os.replace(tmp, directory / CACHE_FILE)
    log.info("latent cache written: %s (%d pairs, %d prompts)", directory, len(pairs), len(prompts))
    return directory / CACHE_FILE


class CacheReader:
    """Lazy, per-process reader of one cache file (safetensors handles cannot cross a fork).

    A file that cannot be read (truncated, overwritten, written by another program) is refused in one line
    naming it and the fix: delete its folder, and the next run rebuilds it.
    """

    def __init__(self, file: Path) -> None:
        self.file = file
        self._handle = None
        self._pid = None
        try:
            with safe_open(str(file), framework="pt") as f:
                self.keys = set(f.keys())
                missing = sorted({"prompt_index", "uncond_embeds", "prompt_embeds", "latents_w"} - self.keys)
                if missing:
                    raise ValueError(f"no tensor(s) {missing}")
                metadata = f.metadata() or {}
                #: per-prompt and per-image-side tensor names (a cache from before families: SD's only)
                self.prompt_keys: list[str] = json.loads(metadata.get("prompt_keys", '["prompt_embeds"]'))
                self.image_keys: list[str] = json.loads(metadata.get("image_keys", "[]"))
                missing = sorted({uncond_key(k) for k in self.prompt_keys} - self.keys)
                if missing:
                    raise ValueError(f"no tensor(s) {missing}")
                self.prompt_index = f.get_tensor("prompt_index")
                #: the empty prompt's tensors, by prompt key
                self.uncond_tensors = {k: f.get_tensor(uncond_key(k))[0] for k in self.prompt_keys}
                self.uncond = self.uncond_tensors["prompt_embeds"]
                self.valid = f.get_tensor("valid").bool() if "valid" in self.keys else torch.ones(len(self.prompt_index), dtype=torch.bool)
                self.errors: list[str] = json.loads(metadata.get("errors", "[]"))
        except (SafetensorError, OSError, ValueError, RuntimeError, IndexError) as err:
            raise InputError(f"{file}: cannot read the latent cache ({one_line(err)}); it is truncated or corrupt: "
                             f"delete {file.parent} and rerun to rebuild it") from None

    def _open(self):
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = safe_open(str(self.file), framework="pt"), os.getpid()
        return self._handle

    def row(self, name: str, index: int) -> torch.Tensor:
        return self._open().get_slice(name)[index : index + 1][0]

    def __getstate__(self):
        return {**self.__dict__, "_handle": None, "_pid": None}
