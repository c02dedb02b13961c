"""Validation callback: generate for a small prompt set, score, log the scoring config's metrics (UAS and its
components, IP, ...) and a grid.

Every DDP rank generates its own shard of the image jobs (no padding) and the Metrics sum their
states over ranks, so the logged numbers equal a one-process run on the same prompts and seeds. The
base model's means (``qbar``) come from the same UNet with its adapters disabled, once per fit.
"""
from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import numpy as np
import torch

from common.errors import InputError
from common.files import atomic_write
from common.images import to_uint8
from data.readers.prompts import EvalPrompt
from metrics.aggregates import Aggregate
from metrics.evaluation import Scorer, alignment_metrics, base_means, categories_of, generate_records, make_jobs, shard
from metrics.reporting import image_grid
from models.ema import find_ema
from models.sampling import SamplerSettings, use_scheduler

log = logging.getLogger(__name__)


class AlignmentValidation(L.Callback):
    """Runs every ``every_n_steps`` training steps, or, when that is ``None``, at the end of each validation
    epoch (not the sanity check; see ``trainer.val_check_interval``)."""

    def __init__(self, prompts: Mapping[str, Sequence[EvalPrompt]] | Sequence[EvalPrompt], detectors: Sequence,
                 fidelity, metrics: Sequence[Aggregate], images_per_prompt: int = 2, seed: int = 1234,
                 sampler: Mapping[str, Any] | None = None, tau: float = 0.5, dirpath: str | Path | None = None,
                 grid_rows: int = 8, every_n_steps: int | None = None) -> None:
        sets = prompts.values() if isinstance(prompts, Mapping) else [prompts]
        self.prompts = [p for s in sets for p in s]
        self.categories = categories_of(self.prompts)
        self.scorer, self.metrics = Scorer(list(detectors), fidelity, tau), list(metrics)
        self.settings = SamplerSettings(**(sampler or {}))
        self.images_per_prompt, self.seed, self.tau = images_per_prompt, seed, tau
        self.dirpath = Path(dirpath) if dirpath else None
        self.grid_rows, self.every_n_steps = grid_rows, every_n_steps
        self.qbar: dict[str, float | None] | None = None
        self._last_step = -1
        self.last_metrics: dict[str, float] = {}

    def _pipeline(self, trainer: L.Trainer, module, unet):
        pipe = trainer.datamodule.encoder.to(module.device).pipeline(unet, module.noise_scheduler)
        use_scheduler(pipe, self.settings.scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _jobs(self, with_safe: bool, trainer: L.Trainer):
        jobs = make_jobs(self.prompts, self.images_per_prompt, self.seed, self.settings.guidance_scale,
                         with_safe_rewrites=with_safe)
        return shard(jobs, trainer.global_rank, trainer.world_size)

    def state_dict(self) -> dict[str, Any]:
        """The base model's means travel in the checkpoint: a resumed full fine-tuning run cannot recompute them."""
        return {"qbar": self.qbar}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.qbar = state_dict.get("qbar")

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        # before the first step: the base model is still available even without a reference copy
        self._last_step = trainer.global_step
        if self.qbar is None:
            self.base_statistics(trainer, module)

    def on_validation_epoch_end(self, trainer: L.Trainer, module) -> None:
        if not trainer.sanity_checking and self.every_n_steps is None:
            self.run(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        # Under gradient accumulation this hook runs after every micro-batch; the step counter moves only on the
        # micro-batch that stepped, so each multiple of every_n_steps is validated once (never step 0).
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.run(trainer, module)

    def base_statistics(self, trainer: L.Trainer, module) -> dict[str, float | None]:
        """``qbar`` from the untrained model's images (the UNet with its adapters off, or the reference copy)."""
        was_training = module.training
        module.eval()
        with torch.no_grad(), module.base() as unet:
            if unet is None:
                raise InputError("callbacks.alignment_validation: the base model is gone (full fine-tuning without a "
                                 "reference copy, resumed from a checkpoint written without this callback) and its "
                                 "means are not in the checkpoint; add the callback from the first step")
            base_records, _ = generate_records(self._pipeline(trainer, module, unet), self._jobs(True, trainer),
                                               self.settings, self.scorer, progress=False)
        module.train(was_training)
        self.qbar = base_means(base_records)
        if self.dirpath is not None and trainer.is_global_zero:
            atomic_write(self.dirpath / "base_means.json", lambda p: p.write_text(json.dumps(self.qbar, indent=2)))
        return self.qbar

    def run(self, trainer: L.Trainer, module) -> dict[str, float]:
        """Generate this rank's shard, score it, and log the metrics synced over all ranks."""
        if self.qbar is None:
            self.base_statistics(trainer, module)
        pipe = self._pipeline(trainer, module, module.unet)
        was_training = module.training
        module.eval()
        ema = find_ema(trainer)  # with EMA on, validate the averaged weights, which the exports hold
        with torch.no_grad(), (ema.swapped(module) if ema is not None else nullcontext()):
            records, images = generate_records(pipe, self._jobs(False, trainer), self.settings, self.scorer,
                                               progress=False)
        module.train(was_training)
        metrics = alignment_metrics(records, self.metrics, self.qbar["qbar_benign"], self.qbar["qbar_safe"],
                                    self.categories, self.tau)
        self.last_metrics = metrics
        logged = {f"val/{key}": float(value) for key, value in metrics.items()}
        # already synced over ranks; callback_metrics is what checkpoint monitors and sweeps read
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=trainer.global_step)
            self._write(trainer, records, images, metrics)
        return metrics

    def _write(self, trainer: L.Trainer, records: list[dict], images: torch.Tensor, metrics: dict[str, float]) -> None:
        picked = [n for n, r in enumerate(records) if r["k"] == 0][: self.grid_rows]
        if not picked:
            return
        arrays = to_uint8(images[picked]).astype(np.float64) / 255
        grid = image_grid([[a] for a in arrays], scale=max(1, 128 // arrays.shape[1]),
                          columns=[f"step {trainer.global_step}"], row_labels=[records[n]["text"] for n in picked])
        if self.dirpath is not None:
            step_dir = self.dirpath / f"step_{trainer.global_step:06d}"
            atomic_write(step_dir / "grid.png", lambda p: grid.save(p, format="PNG"))
            atomic_write(step_dir / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2)))
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="val/grid", images=[grid], step=trainer.global_step,
                                 caption=[" | ".join(records[n]["text"] for n in picked)])
