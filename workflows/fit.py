"""The runner of the tasks that fit a LightningModule (``align``, ``cost_model``): ``cfg.task.builder``
makes the module and its data; loggers and callbacks come from their config groups."""
from __future__ import annotations

import logging
import netrc
import os
from typing import Any

import lightning as L
from hydra.utils import get_method, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from omegaconf import DictConfig, OmegaConf

from workflows.config_checks import checkpoint_file

log = logging.getLogger("train")


def wandb_logged_in() -> bool:
    """True when wandb has credentials (env or ~/.netrc); checked without touching the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def build_loggers(cfg: DictConfig | None) -> list[Any] | bool:

    loggers = []
    for spec in (cfg or {}).values():
        spec = OmegaConf.to_container(spec, resolve=True)
        if spec.get("offline") == "auto":
            mode = os.environ.get("WANDB_MODE")
            spec["offline"] = mode in ("offline", "dryrun") if mode else not wandb_logged_in()
            if spec["offline"]:
                log.info("wandb: offline mode (not logged in); sync later with `wandb sync`")
        loggers.append(instantiate(spec))
    return loggers or False


def build_callbacks(cfg: DictConfig | None) -> list[Any]:

    return [instantiate(spec) for spec in (cfg or {}).values() if spec is not None]


def fit(cfg: DictConfig) -> dict[str, float]:
    """The runner of the tasks that fit a LightningModule: ``cfg.task.builder`` makes it and its data."""
    # callbacks and loggers first: a bad setting of theirs is found before the model loads
    loggers = build_loggers(cfg.get("logger"))
    callbacks = build_callbacks(cfg.get("callbacks"))
    if not loggers:  # logger=none: nothing to write learning rates to (Lightning would refuse the monitor)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress bar it was told to hide
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    module, datamodule = get_method(cfg.task.builder)(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks, default_root_dir=cfg.output_dir)
    checkpoint = checkpoint_file(cfg)  # ckpt_path=last_if_present without a checkpoint: a new run
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint) if checkpoint else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("finished at step %d; outputs in %s", trainer.global_step, cfg.output_dir)
    return metrics
