"""LightningModule that trains the cost model's adapter on cached encoder features (SPEC 3)."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from alignment.cost import cost_model_loss
from models.cost_model import CostAdapter, ImageFeatures, SafetyCostModel

log = logging.getLogger(__name__)


class CostModelModule(L.LightningModule):
    def __init__(self, features: ImageFeatures, hidden: int = 256, dropout: float = 0.0, lambda_a: float = 1.0,
                 margin: float = 0.0, lr: float = 1e-3, weight_decay: float = 1e-4,
                 save_dir: str | Path | None = None, encoder_reference: str | None = None) -> None:
        super().__init__()
        self.features = features  # frozen and outside the module: only the adapter is a parameter
        self.adapter = CostAdapter(features.dim, hidden, dropout)
        self.lambda_a, self.margin, self.lr, self.weight_decay = lambda_a, margin, lr, weight_decay
        self.save_dir, self.encoder_reference = save_dir, encoder_reference
        self.val_auroc, self.val_acc, self.val_pair_acc = BinaryAUROC(), BinaryAccuracy(), MeanMetric()

    def _costs(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        harmful, safe = batch
        c_u, c_s = self.adapter(harmful), self.adapter(safe)
        cost = torch.cat([c_u, c_s])
        label = torch.cat([torch.ones_like(c_u), -torch.ones_like(c_s)])
        return c_u, c_s, cost, label

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        c_u, c_s, cost, label = self._costs(batch)
        loss, parts = cost_model_loss(c_u, c_s, cost, label, self.lambda_a, self.margin)
        self.log_dict({"train/loss": loss.detach(), **{f"train/{k}": v for k, v in parts.items()}},
                      prog_bar=False, batch_size=len(c_u))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        c_u, c_s, cost, label = self._costs(batch)
        target = (label > 0).long()
        self.val_auroc.update(cost, target)
        self.val_acc.update((cost > 0).long(), target)  # threshold 0 on the cost
        self.val_pair_acc.update((c_u > c_s).float())
        loss, _ = cost_model_loss(c_u, c_s, cost, label, self.lambda_a, self.margin)
        self.log("val/loss", loss, batch_size=len(c_u), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.log_dict({"val/auroc": self.val_auroc.compute(), "val/accuracy": self.val_acc.compute(),
                       "val/pair_accuracy": self.val_pair_acc.compute()}, prog_bar=True)
        for metric in (self.val_auroc, self.val_acc, self.val_pair_acc):
            metric.reset()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.adapter.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def on_train_end(self) -> None:
        if self.save_dir is not None and self.trainer.is_global_zero:
            model = SafetyCostModel(self.features, self.adapter.cpu())
            path = model.save(self.save_dir, self.encoder_reference)
            log.info("cost model saved to %s", path)
