"""``task=align``: a preference objective on a diffusion model, fitted by ``workflows.fit.fit``.

``build_alignment`` reads and screens every pair, loads the model, and returns the LightningModule and its
DataModule.
"""
from __future__ import annotations

import logging

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from alignment.base import Objective
from common.errors import InputError
from models.alignment_module import AlignmentModule, check_batch_reference, check_frozen_dtype
from models.attention_backend import check_attention_backend
from models.components import load_model
from models.encoders import ConditionEncoder
from models.optimizers import check_optimizer

log = logging.getLogger(__name__)


def build_alignment(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule]:
    objective = instantiate(cfg.objective)
    if not isinstance(objective, Objective):
        raise InputError(f"objective._target_: {cfg.objective._target_} is not a subclass of alignment.base.Objective")
    log.info("objective: %r", objective)
    m = cfg.model
    if cfg.data.get("anchor_others") and not m.get("benign_anchor", 0.0):
        raise InputError("data.anchor_others: needs model.benign_anchor > 0, the weight that holds the anchor "
                         "pairs at the reference (they get no objective loss)")
    # settings the module checks too, checked here before a real checkpoint takes minutes to load
    check_attention_backend(m.get("attention_backend"))
    check_batch_reference(m.get("batch_reference", False), m.lora, m.gradient_checkpointing)
    check_frozen_dtype(m.frozen_dtype, m.lora, cfg.trainer.get("precision", "32-true"))
    check_optimizer(m.get("optimizer"))
    # Every row is read and checked before the model loads; reading never moves the global random state
    # (the LoRA initialization below draws from it).
    datamodule = instantiate(cfg.data)
    with torch.random.fork_rng(devices=[]):
        datamodule.pairs  # noqa: B018 - reads and screens every row
        datamodule.selected_indices()  # data.categories against the categories the data has
    components = load_model(m)
    datamodule.encoder = ConditionEncoder(components)
    # data.resolution (default: model.resolution) or the model's native size
    datamodule.resolution = int(cfg.data.get("resolution") or m.resolution or components.resolution)
    module = AlignmentModule(
        components.unet, components.noise_scheduler, objective,
        lora=OmegaConf.to_container(m.lora) if m.lora is not None else None,
        adapter_name=m.adapter_name,
        optimizer=OmegaConf.to_container(m.optimizer), lr_scheduler=OmegaConf.to_container(m.lr_scheduler),
        t_min=m.t_min, t_max=m.t_max, gradient_checkpointing=m.gradient_checkpointing, frozen_dtype=m.frozen_dtype,
        seed=cfg.seed, channels_last=m.get("channels_last", False), compile=m.get("compile", False),
        benign_anchor=m.get("benign_anchor", 0.0), batch_reference=m.get("batch_reference", False),
        attention_backend=m.get("attention_backend"), scale_lr=m.get("scale_lr", False), base_model=str(m.pretrained),
        family=components.family,
        noise_sampling=OmegaConf.to_container(m.noise_sampling) if m.get("noise_sampling") else None,
    )
    return module, datamodule
