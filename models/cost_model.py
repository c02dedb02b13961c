"""The safety cost model (docs/methods/cost-model.md): a frozen CLIP image encoder and a small MLP adapter to one scalar.

``C(x) > 0`` means harmful; ``sigmoid(C(x))`` is the probability that ``x`` is harmful. Only the adapter
trains, on encoder features computed once (``data/cost_features.py`` caches them). A saved cost model is
``adapter.safetensors`` plus ``cost_model.json`` (the encoder to load, the feature size, the adapter
shape); loading it against another encoder is refused. :class:`CostModelModule` trains the adapter on cached
encoder features.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC
from transformers import CLIPImageProcessor

from alignment.cost_loss import cost_model_loss
from common.errors import InputError
from common.files import atomic_write
from common.images import to_uint8
from models.clip import load_clip_vision
from models.hub import load_error

log = logging.getLogger(__name__)

CONFIG_NAME = "cost_model.json"
WEIGHTS_NAME = "adapter.safetensors"


class CostAdapter(nn.Module):
    """``g_phi``: normalized features -> scalar cost."""

    def __init__(self, feature_dim: int, hidden: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.feature_dim, self.hidden, self.dropout = feature_dim, hidden, dropout
        self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(nn.functional.normalize(features.float(), dim=-1)).squeeze(-1)


class ImageFeatures:
    """Frozen CLIP image features (``image_embeds``) of images ``[N, 3, H, W]`` in [0, 1]."""

    def __init__(self, encoder: str | Path, device: str | torch.device = "cpu", local_files_only: bool = False) -> None:
        self.name = str(encoder)
        try:
            self.model = load_clip_vision(encoder, local_files_only=local_files_only).eval().to(device)
            self.processor = CLIPImageProcessor.from_pretrained(str(encoder), local_files_only=local_files_only)
        except (OSError, ValueError) as error:
            raise load_error("CLIP image encoder", encoder, error, local_files_only) from None
        self.model.requires_grad_(False)
        self.dim = int(self.model.config.projection_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, images: Tensor | Sequence) -> Tensor:
        if isinstance(images, Tensor):
            images = list(to_uint8(images))
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return self.model(pixel_values=pixels).image_embeds.float().cpu()


class SafetyCostModel(nn.Module):
    """Encoder features -> cost. ``cost(images)`` runs both; ``forward(features)`` the adapter alone."""

    def __init__(self, features: ImageFeatures, adapter: CostAdapter) -> None:
        super().__init__()
        if adapter.feature_dim != features.dim:
            raise InputError(f"cost model: adapter expects {adapter.feature_dim}-d features, encoder "
                             f"{features.name} gives {features.dim}-d (a cost model for another encoder?)")
        self.features, self.adapter = features, adapter

    def forward(self, features: Tensor) -> Tensor:
        return self.adapter(features)

    @torch.no_grad()
    def cost(self, images: Tensor | Sequence) -> Tensor:
        return self.adapter(self.features(images).to(next(self.adapter.parameters()).device)).cpu()

    def probability(self, images: Tensor | Sequence) -> Tensor:
        """``sigmoid(C(x))``: the cost model as an unsafe-probability detector (docs/evaluation.md)."""
        return torch.sigmoid(self.cost(images))

    def save(self, directory: str | Path, encoder_reference: str | None = None) -> Path:
        """Atomic: files are written under temporary names and renamed."""
        directory = Path(directory)
        config = {"encoder": encoder_reference or self.features.name, "feature_dim": self.adapter.feature_dim,
                  "hidden": self.adapter.hidden, "format": "t2i-safety-align cost model v1"}
        state = {k: v.detach().cpu().contiguous() for k, v in self.adapter.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"config": json.dumps(config)}))
        atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2)))
        return directory

    @classmethod
    def load(cls, directory: str | Path, encoder: str | Path | None = None,
             device: str | torch.device = "cpu", local_files_only: bool = False) -> "SafetyCostModel":
        """``encoder`` overrides the saved one (a local copy of the same CLIP); a relative saved
        encoder path is resolved against ``directory`` (the shipped toy model uses ``../clip``)."""

        directory = Path(directory).expanduser()
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise InputError(f"cost model {directory}: no {CONFIG_NAME} (a directory saved by `train.py task=cost_model`)")
        try:
            config = json.loads(config_path.read_text())
            feature_dim, hidden, saved_encoder = int(config["feature_dim"]), int(config["hidden"]), str(config["encoder"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise InputError(f"{config_path}: expected keys encoder, feature_dim, hidden ({error})") from None
        if encoder is None:
            local = (directory / saved_encoder)
            encoder = local.resolve() if not Path(saved_encoder).is_absolute() and local.exists() else saved_encoder
        features = ImageFeatures(encoder, device, local_files_only)
        adapter = CostAdapter(feature_dim, hidden)
        try:
            state = load_file(str(directory / WEIGHTS_NAME))
        except (FileNotFoundError, SafetensorError, OSError) as error:
            raise InputError(f"{directory / WEIGHTS_NAME}: cannot read cost model weights ({error})") from None
        try:
            adapter.load_state_dict(state)
        except RuntimeError as error:
            raise InputError(f"{directory / WEIGHTS_NAME}: weights do not fit {CONFIG_NAME} ({str(error).splitlines()[0]})") from None
        return cls(features, adapter.to(device).eval())


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
