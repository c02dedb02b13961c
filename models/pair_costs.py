"""Safety costs of a dataset's images, computed once by a cost model and cached beside the latents.

Each pair gets ``extras["cost_w"]`` and ``extras["cost_l"]``, which reach objectives as batch metadata
(``scdpo``'s safety margin). The cache key digests the cost model's files and every image.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from common.files import atomic_write
from data.cost_features import encode_images
from data.pairs import ImageRef, PreferencePair, describe
from models.cost_model import CONFIG_NAME, WEIGHTS_NAME, SafetyCostModel

log = logging.getLogger(__name__)


def _cost_model_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        path = directory / name
        digest.update(path.read_bytes() if path.is_file() else b"missing")
    return digest.hexdigest()


def image_costs(images: Sequence[ImageRef], sources: Sequence[str], cost_model: str | Path, cache_dir: str | Path,
                batch_size: int = 64, what: str = "costs", local_files_only: bool = False) -> torch.Tensor:
    """``C(x)`` of every image, ``[N]``, computed once per (cost model, images) and cached in ``cache_dir``."""


    directory = Path(cost_model).expanduser()
    digest = hashlib.sha256(_cost_model_digest(directory).encode())
    for image in images:
        digest.update(f"{describe(image)}|".encode())
    path = Path(cache_dir) / f"costs_{digest.hexdigest()[:20]}.safetensors"
    if path.is_file():
        log.info("cost cache hit: %s", path)
        return load_file(str(path))["cost"]
    model = SafetyCostModel.load(directory, local_files_only=local_files_only)
    with torch.no_grad():
        costs = model(encode_images(model.features, list(images), list(sources), batch_size, what)).float().contiguous()
    atomic_write(path, lambda tmp: save_file({"cost": costs}, str(tmp)))
    return costs


def attach_costs(pairs: Sequence[PreferencePair], cost_model: str | Path, cache_dir: str | Path,
                 batch_size: int = 64, local_files_only: bool = False) -> None:
    """Set ``cost_w``/``cost_l`` on every pair (``cost_l`` only when it has a loser)."""
    losers = [i for i, p in enumerate(pairs) if p.image_l is not None]
    images = [p.image_w for p in pairs] + [pairs[i].image_l for i in losers]
    sources = [p.source for p in pairs] + [pairs[i].source for i in losers]
    costs = image_costs(images, sources, cost_model, cache_dir, batch_size, "costs", local_files_only).tolist()
    for i, p in enumerate(pairs):
        p.extras["cost_w"] = costs[i]
    for k, i in enumerate(losers):
        pairs[i].extras["cost_l"] = costs[len(pairs) + k]
