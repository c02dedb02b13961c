"""The preference pair record every reader produces, and image loading/preprocessing."""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import InputError

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


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on an image's size, read from its header before any pixel is decoded.

    ``max_pixels`` (``data.max_image_pixels``, default PIL's own limit) refuses decompression bombs: a
    small file that claims a huge size and would take gigabytes to decode. ``max_aspect_ratio`` and
    ``min_side`` refuse degenerate images (banners, slivers, icons) that the square center crop turns into a few
    stretched pixels. ``None`` turns a bound off.
    """

    max_pixels: int | None = 89_478_485
    max_aspect_ratio: float | None = 8.0
    min_side: int | None = 8

    def __post_init__(self) -> None:
        for key, value, least in (("max_image_pixels", self.max_pixels, 1), ("max_aspect_ratio", self.max_aspect_ratio, 1),
                                  ("min_image_side", self.min_side, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < least):
                raise InputError(f"data.{key}: expected null or a number >= {least}, got {value!r}")

    def problem(self, width: int, height: int) -> str | None:
        """What is wrong with a ``width`` x ``height`` image, naming the config key that bounds it, or ``None``."""
        if self.max_pixels is not None and width * height > self.max_pixels:
            return (f"{width}x{height} = {width * height} pixels, above data.max_image_pixels={self.max_pixels} "
                    "(a decompression bomb?)")
        if self.min_side is not None and min(width, height) < self.min_side:
            return f"{width}x{height} pixels, a side below data.min_image_side={self.min_side}"
        ratio = max(width, height) / max(1, min(width, height))
        if self.max_aspect_ratio is not None and ratio > self.max_aspect_ratio:
            return f"{width}x{height} pixels, aspect ratio {ratio:.1f} above data.max_aspect_ratio={self.max_aspect_ratio:g}"
        return None


#: ``load_rgb``'s bounds when its caller gives none: decompression bombs only (PIL's pixel limit).
PIXELS_ONLY = ImageLimits(max_aspect_ratio=None, min_side=None)


@contextmanager
def pil_pixel_limit(limit: int | None) -> Iterator[None]:
    """PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) set to ``limit`` within this block, then restored.

    :func:`load_rgb` opens an image with PIL's check off (``None``) and checks the header's size against its
    :class:`ImageLimits` itself, so the error names the configured limit and the pixels are never decoded;
    it then decodes with PIL's check at the configured limit, for the frames PIL sizes while decoding (GIF,
    ICO). PIL only warns between once and twice its limit: that warning is silenced here.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def load_rgb(ref: ImageRef, source: str, limits: ImageLimits = PIXELS_ONLY) -> Image.Image:
    """Open an image (path or encoded bytes) as 8-bit RGB, with a one-line error naming ``source``.

    The size in the header is checked against ``limits`` before the pixels are decoded.
    """
    name = "<bytes>" if isinstance(ref, bytes) else os.fspath(ref)
    try:
        with pil_pixel_limit(None):
            image = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
        problem = limits.problem(*image.size)
        if problem:
            image.close()
            raise InputError(f"{source}: image {name} is {problem}")
        with pil_pixel_limit(limits.max_pixels):
            image.load()
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{source}: image file not found: {name}") from None
    except Image.DecompressionBombError as err:
        raise InputError(f"{source}: image {name} holds a frame above data.max_image_pixels={limits.max_pixels} "
                         f"({one_line(err)})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise InputError(f"{source}: cannot read image {name}: {one_line(err)}") from None
    try:
        return _to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"{source}: cannot convert image {name} (mode {image.mode}) to RGB: {one_line(err)}") from None


def one_line(err: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(err).split()) or type(err).__name__


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / peak * 255).round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageGeometry:
    """How :func:`preprocess` turned an image into its training crop, ``(height, width)`` and ``(top, left)``
    pairs: the image's ``original_size``, the crop's ``crop_top_left`` corner in the resized image, the crop's
    ``target_size`` and the ``resized_size`` it was cut from. SDXL conditions on the first three."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    resized_size: tuple[int, int]

    def flipped(self) -> "ImageGeometry":
        """The geometry of the mirrored crop: the same crop cut from the mirrored resized image."""
        left = self.resized_size[1] - self.crop_top_left[1] - self.target_size[1]
        return replace(self, crop_top_left=(self.crop_top_left[0], left))


def square_geometry(resolution: int) -> ImageGeometry:
    """The geometry of an image that was already the target square (stands in for an unreadable image)."""
    size = (resolution, resolution)
    return ImageGeometry(size, (0, 0), size, size)


def preprocess(image: Image.Image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop to a square, scale to ``[-1, 1]``, ``[3, H, W]``."""
    return preprocess_with_geometry(image, resolution, center_crop)[0]


def preprocess_with_geometry(image: Image.Image, resolution: int,
                             center_crop: bool = True) -> tuple[torch.Tensor, ImageGeometry]:
    """:func:`preprocess`, and the :class:`ImageGeometry` of the crop it made."""
    w, h = image.size
    original = (h, w)
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = image.size
    left = (w - resolution) // 2 if center_crop else 0
    top = (h - resolution) // 2 if center_crop else 0
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    geometry = ImageGeometry(original, (top, left), (resolution, resolution), (h, w))
    return array / 127.5 - 1.0, geometry
