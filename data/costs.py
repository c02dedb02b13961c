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

from data.pairs import PreferencePair, describe

log = logging.getLogger(__name__)


def _cost_model_digest(directory: Path) -> str:
    from models.cost_model import CONFIG_NAME, WEIGHTS_NAME

    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        path = directory / name
        digest.update(path.read_bytes() if path.is_file() else b"missing")
    return digest.hexdigest()


def attach_costs(pairs: Sequence[PreferencePair], cost_model: str | Path, cache_dir: str | Path,
                 batch_size: int = 64) -> Path:
    """Set ``cost_w``/``cost_l`` on every pair (``cost_l`` only when it has a loser); returns the cache file."""
    from safetensors.torch import load_file, save_file

    from data.cost_data import encode_images
    from metrics.reporting import atomic_write
    from models.cost_model import SafetyCostModel

    directory = Path(cost_model).expanduser()
    digest = hashlib.sha256(_cost_model_digest(directory).encode())
    for p in pairs:
        digest.update(f"{describe(p.image_w)}|{describe(p.image_l) if p.image_l is not None else ''}".encode())
    path = Path(cache_dir) / f"costs_{digest.hexdigest()[:20]}.safetensors"
    if path.is_file():
        costs = load_file(str(path))
        log.info("cost cache hit: %s", path)
    else:
        model = SafetyCostModel.load(directory)
        sources = [p.source for p in pairs]
        with torch.no_grad():
            cost_w = model(encode_images(model.features, [p.image_w for p in pairs], sources, batch_size, "costs (winners)"))
            losers = [i for i, p in enumerate(pairs) if p.image_l is not None]
            cost_l = torch.full((len(pairs),), float("nan"))
            if losers:
                cost_l[losers] = model(encode_images(model.features, [pairs[i].image_l for i in losers],
                                                     [sources[i] for i in losers], batch_size, "costs (losers)"))
        costs = {"cost_w": cost_w.float().contiguous(), "cost_l": cost_l.float().contiguous()}
        atomic_write(path, lambda tmp: save_file(costs, str(tmp)))
    for i, p in enumerate(pairs):
        p.extras["cost_w"] = float(costs["cost_w"][i])
        if p.image_l is not None:
            p.extras["cost_l"] = float(costs["cost_l"][i])
    return path
