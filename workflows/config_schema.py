"""The config schema: the types of the ``model``, ``data`` and ``trainer`` groups and of ``evaluate.py``'s
top level, declared once as dataclasses in Hydra's ConfigStore.

Each group's base YAML lists its schema first in its defaults (``model/sd15.yaml``: ``- schema_model``), so
Hydra checks every value's type while it composes: ``data.batch_size=abc`` stops before anything runs.
Ranges and rules across keys are :mod:`workflows.config_checks`. Import this module (``train.py`` and
``evaluate.py`` do) before composing a config: it also registers ``${lookup:...}``, with which ``configs/train.yaml``
picks the data an objective needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class LoraSchema:
    rank: int = 8
    alpha: float = 8.0
    target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0


@dataclass
class LrSchedulerSchema:
    name: str = "constant_with_warmup"
    warmup_steps: int = 0


@dataclass
class SamplingSchema:
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str = "ddim"  # the family's default sampler (sampler.scheduler of evaluation, validation, builds)


@dataclass
class NoiseSamplingSchema:
    """How the flow-matching families draw noise levels and weight errors (models/families/flow.py)."""
    density: str = "logit_normal"  # uniform | logit_normal | mode
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"  # none | sigma_sqrt | cosmap (diffusers' compute_loss_weighting_for_sd3)


@dataclass
class ModelSchema:
    pretrained: str = MISSING
    family: str = "auto"  # auto (model_index.json's pipeline class) | sd | sdxl | sd3 | flux: models/families/
    family_options: Dict[str, Any] = field(default_factory=dict)  # the family's own settings (sd3: t5, max_sequence_length)
    revision: Optional[str] = None
    variant: Optional[str] = None
    vae: Optional[str] = None
    local_files_only: bool = False
    resolution: Optional[int] = None
    lora: Optional[LoraSchema] = field(default_factory=LoraSchema)
    adapter_name: str = "default"
    scale_lr: bool = False
    gradient_checkpointing: bool = False
    frozen_dtype: str = "float32"
    channels_last: bool = False
    compile: Any = False  # true, or a torch.compile mode name
    batch_reference: bool = False
    attention_backend: Optional[str] = None
    benign_anchor: float = 0.0
    t_min: int = 0
    t_max: Optional[int] = None
    noise_sampling: Optional[NoiseSamplingSchema] = None  # flow-matching families only
    optimizer: Dict[str, Any] = field(default_factory=dict)  # _target_ and the class's own arguments
    lr_scheduler: LrSchedulerSchema = field(default_factory=LrSchedulerSchema)
    sampling: SamplingSchema = field(default_factory=SamplingSchema)


@dataclass
class DataSchema:
    _target_: str = "data.datamodule.PreferenceDataModule"
    path: Optional[str] = MISSING
    reader: Any = MISSING
    resolution: Optional[int] = None
    batch_size: int = 4
    num_workers: int = 2
    categories: Optional[List[str]] = None
    keep_uncategorized: bool = False
    anchor_others: bool = False
    on_bad_sample: str = "error"
    allow_outside_paths: bool = False
    max_image_pixels: Optional[int] = 89_478_485
    max_aspect_ratio: Optional[float] = 8.0
    min_image_side: Optional[int] = 8
    condition_on: str = "unsafe"
    val_fraction: float = 0.01
    center_crop: bool = True
    random_flip: bool = True
    p_uncond: float = 0.0
    cache_dir: str = ".cache/latents"
    cache_dtype: str = "float16"
    encode_batch_size: int = 8
    encode_device: str = "auto"
    seed: int = 0
    local_files_only: bool = False
    cost_model: Optional[str] = None
    cost_scorer: Any = None


@dataclass
class TrainerSchema:
    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "auto"
    devices: Any = 1  # a count, "auto", or a list of device indices
    num_nodes: int = 1
    precision: str = "32-true"
    max_steps: int = 500
    max_epochs: Optional[int] = -1
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    log_every_n_steps: int = 10
    val_check_interval: Any = None
    check_val_every_n_epoch: Optional[int] = 1
    num_sanity_val_steps: int = 0
    enable_progress_bar: bool = True
    deterministic: Any = False
    benchmark: Optional[bool] = None
    use_distributed_sampler: bool = False
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    plugins: Any = None
    strategy: Any = "auto"


@dataclass
class SamplerSchema:
    scheduler: str = "ddim"
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    batch_size: int = 8
    height: Optional[int] = None
    width: Optional[int] = None
    dtype: str = "float32"


@dataclass
class EvalSchema:
    """``evaluate.py``'s top level (its ``model`` group has :class:`ModelSchema`)."""

    model: Any = MISSING
    prompts: Any = MISSING
    scoring: Any = MISSING
    task_name: str = "eval"
    lora: Optional[str] = None
    images_per_prompt: int = 4
    seed: int = 1234
    use_prompt_seeds: bool = False
    use_prompt_guidance: bool = False
    tau: float = 0.5
    sampler: SamplerSchema = field(default_factory=SamplerSchema)
    device: str = "auto"
    save_images: bool = True
    grid_rows: int = 16
    cache_dir: str = MISSING
    output_dir: str = MISSING


def lookup(key: Any, table: Any, default: Any) -> Any:
    """``${lookup:key,{k1:v1,k2:v2},default}``: the value ``table`` gives ``key``, else ``default``. The defaults list of
    ``configs/train.yaml`` chooses the data group with it from the objective's name: a choice that depends on another
    group's has to be an interpolation there, since Hydra takes no group override (``override /data: ...``) from
    a config it reached through one, such as a recipe."""
    return table.get(str(key), default) if isinstance(table, Mapping) else default


def register() -> None:
    """Put the schemas in Hydra's ConfigStore and the ``lookup`` resolver in OmegaConf (idempotent)."""
    OmegaConf.register_new_resolver("lookup", lookup, replace=True)
    store = ConfigStore.instance()
    store.store(group="model", name="schema_model", node=ModelSchema)
    store.store(group="data", name="schema_data", node=DataSchema)
    store.store(group="trainer", name="schema_trainer", node=TrainerSchema)
    store.store(name="schema_eval", node=EvalSchema)


register()
