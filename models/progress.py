"""The training progress bar, counted in optimizer steps out of ``trainer.max_steps``.

Training here is bounded by steps (``max_epochs: -1``), where Lightning's bars count the batches of the
current epoch and title it ``Epoch 45/-2``. This bar spans the whole run: ``step 120/500`` whatever the
epoch, the gradient accumulation or a resume; with no ``max_steps`` it is Lightning's per-epoch bar.
"""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, with its training bar in optimizer steps when ``trainer.max_steps`` is set."""

    @staticmethod
    def _by_steps(trainer: L.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def _show(self, trainer: L.Trainer, module: L.LightningModule | None = None) -> None:
        bar = self.train_progress_bar
        if bar.disable:
            return
        bar.n = trainer.global_step
        bar.set_description(f"step (epoch {trainer.current_epoch})")
        if module is not None:
            bar.set_postfix(self.get_metrics(trainer, module), refresh=False)
        bar.refresh()

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._by_steps(trainer):
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # once per run: the bar is not reset at epoch boundaries
            bar.reset(total=trainer.max_steps)
        self._show(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._by_steps(trainer):
            return super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        if self._should_update(trainer.global_step, self.train_progress_bar.total):
            self._show(trainer, module)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self._by_steps(trainer):
            return super().on_train_epoch_end(trainer, module)
        self._show(trainer, module)
