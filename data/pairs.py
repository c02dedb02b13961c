"""The preference pair record every reader produces, and image loading/preprocessing."""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from data.errors import InputError

ImageRef = Union[str, Path, bytes]


@dataclass
class PreferencePair:
    """``prompt`` with preferred image ``image_w`` and rejected ``image_l``.

    ``image_l`` is ``None`` for image-caption sets (``sft``). ``safe_prompt`` is the minimal safe
    rewrite of a harmful prompt (SafetyDPO, faithfulness metric); ``extras`` holds per-pair numbers
    such as precomputed costs. ``source`` says where the pair came from, for error messages.
    """

    prompt: str
    image_w: ImageRef
    image_l: ImageRef | None = None
    safe_prompt: str | None = None
    categories: tuple[str, ...] = ()
    extras: dict[str, float] = field(default_factory=dict)
    source: str = ""


def describe(ref: ImageRef) -> str:
    """A stable description of an image for cache fingerprints: file identity, or a digest of its bytes."""
    if isinstance(ref, bytes):
        return "sha1:" + hashlib.sha1(ref).hexdigest()
    stat = os.stat(ref)
    return f"{os.fspath(ref)}:{stat.st_size}:{stat.st_mtime_ns}"


def load_rgb(ref: ImageRef, source: str) -> Image.Image:
    """Open an image (path or encoded bytes) as 8-bit RGB, with a one-line error naming ``source``."""
    name = "<bytes>" if isinstance(ref, bytes) else os.fspath(ref)
    try:
        image = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
        image.load()
    except FileNotFoundError:
        raise InputError(f"{source}: image file not found: {name}") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(f"{source}: cannot read image {name}: {err}") from None
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / peak * 255).round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def preprocess(image: Image.Image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop to a square, scale to ``[-1, 1]``, ``[3, H, W]``."""
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = image.size
    left = (w - resolution) // 2 if center_crop else 0
    top = (h - resolution) // 2 if center_crop else 0
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return array / 127.5 - 1.0
