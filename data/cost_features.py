"""Training data of the safety cost model: frozen-encoder features of harmful/safe pairs, cached once.

Any pair reader with safety pairs works (CoProV2, the toy world, JSONL): the rejected image is the
harmful one (label +1), the preferred one safe (label -1), so pairs give both the contrastive and the
anchoring term. Features are computed once per (encoder, images) and stored as safetensors.
"""
from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from common.errors import InputError
from common.files import atomic_write
from data.pairs import PreferencePair, describe, load_rgb
from data.readers.base import PairReader
from data.resumable_sampler import ResumableSampler, distributed_rank

log = logging.getLogger(__name__)


def encode_images(features, refs: list, sources: list[str], batch_size: int = 64, desc: str = "encoding") -> torch.Tensor:
    """Features of images given as paths or bytes, in batches, with progress."""
    out = []
    for start in tqdm(range(0, len(refs), batch_size), desc=desc, unit="batch", disable=len(refs) <= batch_size):
        images = [np.asarray(load_rgb(r, s)) for r, s in zip(refs[start:start + batch_size], sources[start:start + batch_size])]
        out.append(features(images))
    return torch.cat(out) if out else torch.zeros(0, features.dim)


def cached_pair_features(features, pairs: list[PreferencePair], cache_dir: Path, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(harmful [N, D], safe [N, D])`` for the pairs, from ``cache_dir`` when already computed."""
    if any(p.image_l is None for p in pairs):
        bad = next(p for p in pairs if p.image_l is None)
        raise InputError(f"{bad.source}: the cost model needs harmful/safe pairs, this record has one image")
    digest = hashlib.sha256(features.name.encode())
    for p in pairs:
        digest.update(f"{describe(p.image_l)}|{describe(p.image_w)}".encode())
    path = Path(cache_dir) / f"cost_features_{digest.hexdigest()[:20]}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        return tensors["harmful"], tensors["safe"]
    sources = [p.source for p in pairs]
    harmful = encode_images(features, [p.image_l for p in pairs], sources, batch_size, "encoding harmful images")
    safe = encode_images(features, [p.image_w for p in pairs], sources, batch_size, "encoding safe images")
    atomic_write(path, lambda tmp: save_file({"harmful": harmful.contiguous(), "safe": safe.contiguous()}, str(tmp)))
    return harmful, safe


class CostFeatureDataModule(L.LightningDataModule):
    """Batches ``(harmful features, safe features)``; held out: ``val_reader``'s pairs, else a random
    ``val_fraction`` of the pairs."""

    def __init__(self, reader: PairReader | Callable[[str], PairReader], features, path: str | None = None,
                 val_reader: PairReader | None = None, val_fraction: float = 0.1, batch_size: int = 64,
                 cache_dir: str | Path = ".cache/latents", encode_batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.reader = reader if isinstance(reader, PairReader) else reader(path)
        self.val_reader, self.features = val_reader, features
        self.val_fraction, self.batch_size, self.seed = val_fraction, batch_size, seed
        self.cache_dir, self.encode_batch_size = Path(cache_dir), encode_batch_size
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        pairs = self.reader.read()
        harmful, safe = cached_pair_features(self.features, pairs, self.cache_dir, self.encode_batch_size)
        if self.val_reader is not None:
            val_h, val_s = cached_pair_features(self.features, self.val_reader.read(), self.cache_dir, self.encode_batch_size)
            train_idx = list(range(len(pairs)))
        else:
            order = list(range(len(pairs)))
            random.Random(self.seed).shuffle(order)
            k = round(self.val_fraction * len(order))
            val_idx, train_idx = sorted(order[:k]), sorted(order[k:])
            val_h, val_s = harmful[val_idx], safe[val_idx]
        if not train_idx or len(val_h) == 0:
            raise InputError(f"cost model data: need training and held-out pairs, got {len(train_idx)} and {len(val_h)}")
        self.train_set = TensorDataset(harmful[train_idx], safe[train_idx])
        self.val_set = TensorDataset(val_h, val_s)
        log.info("cost model data: %d training pairs, %d held-out pairs", len(self.train_set), len(self.val_set))

    def train_dataloader(self) -> DataLoader:
        """Each DDP rank its own shard (``trainer.use_distributed_sampler`` is off, see data/resumable_sampler.py)."""
        rank, world = distributed_rank()
        sampler = ResumableSampler(len(self.train_set), seed=self.seed, rank=rank, world_size=world)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        rank, world = distributed_rank()
        sampler = ResumableSampler(len(self.val_set), shuffle=False, rank=rank, world_size=world, even=False)
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 256), sampler=sampler)
