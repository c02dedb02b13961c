"""Components that tests plug into train.py by ``_target_`` (the subprocess runs from the repo root)."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from alignment.dpo import DPO
from metrics.aggregates import Aggregate, Context

SCORING = Path(__file__).resolve().parents[1] / "configs" / "scoring"


class KillAtStep(L.Callback):
    """SIGKILL this process when step ``step`` is about to start (the checkpoint of step - 1 is on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordBatches(L.Callback):
    """Write, per rank, the dataset indices of every training batch to ``<dirpath>/batches_rank<r>.json``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath, self.seen = Path(dirpath), []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.seen.append([int(i) for i in batch["meta"]["index"]])

    def on_train_end(self, trainer, module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"batches_rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


class NaNAfter(DPO):
    """dpo whose loss turns NaN on its ``calls + 1``-th call."""

    def __init__(self, calls: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls, self.seen = calls, 0

    def loss(self, errors, meta):
        out = super().loss(errors, meta)
        self.seen += 1
        if self.seen > self.calls:
            out = type(out)(loss=out.loss * torch.nan, metrics=out.metrics)
        return out


def toy_scoring() -> dict:
    """configs/scoring/toy.yaml built: ``detectors``, ``fidelity`` and the aggregate ``metrics``."""
    cfg = OmegaConf.load(SCORING / "toy.yaml")
    return {"detectors": [instantiate(d) for d in cfg.detectors], "fidelity": instantiate(cfg.fidelity),
            "metrics": [instantiate(m) for m in cfg.metrics]}


class MeanHarm(Aggregate):
    """An aggregate metric that only tests list in a scoring config: ``mean_harm``, the mean ``p(x)`` of the
    harmful prompts' images."""

    def __call__(self, records, context: Context) -> dict[str, float]:
        return {"mean_harm": context.mean([r["p"] for r in records if r["role"] == "harmful"])}
