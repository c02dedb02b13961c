"""``task=cost_model``: the safety cost model's adapter, trained on the pairs of the chosen ``data`` group."""
from __future__ import annotations

import logging
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from data.cost_features import CostFeatureDataModule
from models.cost_model import CostModelModule, ImageFeatures

log = logging.getLogger(__name__)


def build_cost_model(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule]:
    """The cost model trains on the pairs of the chosen ``data`` group (its reader and path)."""
    c = cfg.cost_model
    features = ImageFeatures(c.encoder, local_files_only=cfg.model.get("local_files_only", False))
    reader: Any = instantiate(cfg.data.reader)
    val_reader = instantiate(c.val_reader) if c.get("val_reader") is not None else None
    datamodule = CostFeatureDataModule(reader, features, path=cfg.data.get("path"), val_reader=val_reader,
                                       val_fraction=c.val_fraction, batch_size=c.batch_size,
                                       cache_dir=cfg.data.cache_dir, seed=cfg.seed)
    module = CostModelModule(features, hidden=c.hidden, dropout=c.dropout, lambda_a=c.lambda_a, margin=c.margin,
                             lr=c.lr, weight_decay=c.weight_decay, save_dir=c.save_dir,
                             encoder_reference=c.get("encoder_reference"))
    return module, datamodule
