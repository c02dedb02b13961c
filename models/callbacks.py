"""Callbacks that export what the training module learned in formats other tools load."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from models.alignment_module import AlignmentModule
from models.lora_io import save_unet_lora

log = logging.getLogger(__name__)


class LoraExportCallback(L.Callback):
    """With every checkpoint, write the LoRA as ``<dirpath>/step_<n>/pytorch_lora_weights.safetensors``.

    At the end of training the final adapter also goes to ``<dirpath>/final/`` (or, for full
    fine-tuning, the UNet to ``<dirpath>/../unet`` with ``save_pretrained``).
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def _export(self, module: AlignmentModule, name: str) -> Path:
        return save_unet_lora(module.unet, self.dirpath / name, module.adapter_name)

    def on_save_checkpoint(self, trainer: L.Trainer, module: AlignmentModule, checkpoint: dict) -> None:
        if trainer.is_global_zero and module.uses_lora:
            self._export(module, f"step_{trainer.global_step:06d}")

    def on_train_end(self, trainer: L.Trainer, module: AlignmentModule) -> None:
        if not trainer.is_global_zero:
            return
        if module.uses_lora:
            path = self._export(module, "final")
        else:
            path = self.dirpath.parent / "unet"
            module.unet.save_pretrained(path)
        log.info("exported trained weights: %s", path)
