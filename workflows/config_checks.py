"""The validation pass: ranges, rules across keys, input paths, output directories and a resumed checkpoint's
compatibility, checked before anything loads, encodes or trains.

Types are checked earlier, when Hydra composes the config (:mod:`workflows.config_schema`). Every problem is an
:class:`InputError` of one line naming the key, what was found and what was expected.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import typing
from pathlib import Path
from typing import Any, Iterable

import torch
from diffusers.optimization import SchedulerType
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.connector import _PRECISION_INPUT_STR
from omegaconf import DictConfig, ListConfig, OmegaConf

from common.checkpoint_io import read_checkpoint
from common.dtypes import DTYPES
from common.errors import InputError
from data.datamodule import CONDITIONS
from data.readers.base import path_problem
from models.alignment_module import check_batch_reference, check_frozen_dtype
from models.attention_backend import check_attention_backend
from models.families import FAMILIES, family_for
from models.hub import pretrained_file, unet_config_digest
from models.lora_io import read_lora
from models.optimizers import check_optimizer
from models.sampling import SCHEDULERS

log = logging.getLogger(__name__)

ABSENT = object()
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")
ENCODE_DEVICES = ("auto", "cpu", "cuda", "mps")
ALIGNMENT_BUILDER = "workflows.align.build_alignment"
LAST = "last"
LAST_IF_PRESENT = "last_if_present"
# Objectives that are a workflow of several fits, not one: the task that runs them, and the objective that is one
# fit of the same loss. Every other objective runs under task=align (`train.py task=compare` runs each so).
WORKFLOW_OBJECTIVES = {"safetydpo": ("experts", "dpo")}


def objective_task(objective: str) -> str:
    """The task that runs ``objective`` (``task=compare`` runs it so): its workflow's, or ``align``."""
    return WORKFLOW_OBJECTIVES.get(objective, ("align",))[0]


def value_of(cfg: DictConfig, key: str) -> Any:
    """The value at ``key``, or :data:`ABSENT` when the config has no such key."""
    try:
        return OmegaConf.select(cfg, key, default=ABSENT, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - an interpolation that does not resolve
        return ABSENT


def number(cfg: DictConfig, key: str, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False, integer: bool = False, optional: bool = False) -> None:
    """``key`` is a finite number (an integer with ``integer``) in the interval given; skipped when absent."""
    value = value_of(cfg, key)
    if value is ABSENT or (value is None and optional):
        return
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    if low is not None and high is not None:
        expected = f"a{'n integer' if integer else ' number'} in {lo}{low:g}, {high:g}{hi}"
    elif low is not None:
        expected = f"a{'n integer' if integer else ' number'} {'>' if low_open else '>='} {low:g}"
    else:
        expected = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (integer and not float(value).is_integer()):
        raise InputError(f"{key}: expected {expected}, got {value!r}")
    if (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and (value >= high if high_open else value > high)):
        raise InputError(f"{key}: expected {expected}, got {value!r}")


def choice(cfg: DictConfig, key: str, options: Iterable[str], optional: bool = False) -> None:
    value = value_of(cfg, key)
    if value is ABSENT or (value is None and optional):
        return
    options = list(options)
    if value not in options:
        raise InputError(f"{key}: expected one of {', '.join(map(str, options))}, got {value!r}")


def metric_list(cfg: DictConfig, key: str) -> None:
    """``key`` (a scoring config's ``metrics``) is a non-empty list of aggregates, each with a ``_target_``;
    skipped when absent (the callback holding it is not configured)."""
    value = value_of(cfg, key)
    if value is ABSENT:
        return
    if not isinstance(value, ListConfig) or not value or \
            not all(isinstance(m, DictConfig) and "_target_" in m for m in value):
        raise InputError(f"{key}: expected a list of aggregate metrics, each with a _target_ (as in "
                         f"configs/scoring/toy.yaml), got {value!r}")


def writable_directory(key: str, directory: str | Path) -> None:
    """``directory`` exists (or can be made) as a directory this process can write into."""
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{key}={directory}: is a file, expected a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as error:
        raise InputError(f"{key}={directory}: not a writable directory ({error.strerror or error})") from None


def existing_path(key: str, value: str | Path) -> Path:
    """A path that exists and can be read, in the readers' words when it cannot (``does not exist``, ``is a
    symlink loop``, ``is a broken symlink``, ...: :func:`data.readers.base.path_problem`)."""
    path = Path(value).expanduser()
    problem = path_problem(path)
    if problem:
        raise InputError(f"{key}={value}: {problem}")
    return path


# ------------------------------------------------------------------------------------------------- groups
def check_model(cfg: DictConfig, training: bool = True) -> None:

    m = cfg.model
    choice(cfg, "model.family", ["auto", *sorted(FAMILIES)])  # before anything loads: auto reads model_index.json
    pretrained = str(m.pretrained)
    local = Path(pretrained).expanduser()
    if local.exists() or pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1:
        existing_path("model.pretrained", pretrained)
        denoiser = family_for(str(local), m.family).denoiser_name
        if not (local / denoiser / "config.json").is_file():
            raise InputError(f"model.pretrained={pretrained}: expected a diffusers pipeline directory with "
                             f"{denoiser}/config.json")
    if m.vae is not None and (Path(str(m.vae)).expanduser().exists() or str(m.vae).startswith(("/", ".", "~"))):
        existing_path("model.vae", m.vae)
    number(cfg, "model.resolution", 8, integer=True, optional=True)
    if m.resolution is not None and m.resolution % 8:
        raise InputError(f"model.resolution: expected a multiple of 8 (the VAE's downsampling), got {m.resolution}")
    if m.lora is not None:
        number(cfg, "model.lora.rank", 1, integer=True)
        number(cfg, "model.lora.alpha", 0, low_open=True)  # alpha 0 scales the update to nothing
        number(cfg, "model.lora.dropout", 0, 1, high_open=True)
        targets = list(m.lora.target_modules or [])
        if not targets or any(not str(t).strip() for t in targets):
            raise InputError(f"model.lora.target_modules: expected a list of module names (e.g. [to_k, to_v]), got {targets}")
    choice(cfg, "model.frozen_dtype", DTYPES)
    check_attention_backend(m.get("attention_backend"))
    number(cfg, "model.sampling.num_inference_steps", 1, integer=True)
    number(cfg, "model.sampling.guidance_scale", 0)
    if not training:
        return
    check_frozen_dtype(m.frozen_dtype, m.lora, value_of(cfg, "trainer.precision"))
    check_batch_reference(m.get("batch_reference", False), m.lora, m.gradient_checkpointing)
    if isinstance(m.compile, str) and m.compile not in TORCH_COMPILE_MODES:
        raise InputError(f"model.compile: expected true, false or a torch.compile mode "
                         f"({', '.join(TORCH_COMPILE_MODES)}), got {m.compile!r}")
    number(cfg, "model.benign_anchor", 0)
    number(cfg, "model.t_min", 0, integer=True)
    number(cfg, "model.t_max", m.t_min, integer=True, optional=True)
    number(cfg, "model.optimizer.lr", 0, low_open=True, optional=True)
    if m.get("scale_lr") and value_of(cfg, "model.optimizer.lr") in (None, ABSENT):
        raise InputError("model.scale_lr: needs model.optimizer.lr (the learning rate per pair it multiplies)")
    number(cfg, "model.optimizer.weight_decay", 0, optional=True)
    check_optimizer(m.get("optimizer"))

    choice(cfg, "model.lr_scheduler.name", [s.value for s in SchedulerType])
    number(cfg, "model.lr_scheduler.warmup_steps", 0, integer=True)


def check_data(cfg: DictConfig) -> None:

    number(cfg, "data.batch_size", 1, integer=True)
    number(cfg, "data.num_workers", 0, integer=True)
    number(cfg, "data.encode_batch_size", 1, integer=True)
    number(cfg, "data.val_fraction", 0, 1, high_open=True)
    number(cfg, "data.p_uncond", 0, 1)
    number(cfg, "data.resolution", 8, integer=True, optional=True)
    resolution = value_of(cfg, "data.resolution")
    if isinstance(resolution, int) and resolution % 8:
        raise InputError(f"data.resolution: expected a multiple of 8 (the VAE's downsampling), got {resolution}")
    choice(cfg, "data.cache_dtype", DTYPES)
    choice(cfg, "data.on_bad_sample", ("error", "skip"))
    choice(cfg, "data.condition_on", CONDITIONS)
    device = value_of(cfg, "data.encode_device")
    if device is not ABSENT and str(device).split(":")[0] not in ENCODE_DEVICES:
        raise InputError(f"data.encode_device: expected auto, cpu, cuda, cuda:<n> or mps, got {device!r}")
    categories = value_of(cfg, "data.categories")
    if isinstance(categories, ListConfig) and any(not str(c).strip() for c in categories):
        raise InputError(f"data.categories: expected category names, got {list(categories)}")
    number(cfg, "data.reader.harmful_fraction", 0, 1)
    number(cfg, "data.reader.delta", 0)
    number(cfg, "data.reader.images_per_prompt", 1, integer=True)
    for key in ("data.path", "data.reader.path", "data.reader.harmful.path", "data.reader.clean.path"):
        path = value_of(cfg, key)
        if path not in (ABSENT, None, "???") and isinstance(path, str):
            existing_path(key, path)
    cost_model = value_of(cfg, "data.cost_model")
    if cost_model not in (ABSENT, None, "???"):
        if not existing_path("data.cost_model", cost_model).is_dir():
            raise InputError(f"data.cost_model={cost_model}: expected a cost model directory (train.py task=cost_model)")
    cache_dir = value_of(cfg, "data.cache_dir")
    if cache_dir not in (ABSENT, None):
        writable_directory("data.cache_dir", cache_dir)


def check_trainer(cfg: DictConfig) -> None:


    t = cfg.trainer
    number(cfg, "trainer.max_steps", -1, integer=True)
    if t.max_steps == 0 or (t.max_steps == -1 and (t.get("max_epochs") in (None, -1))):
        raise InputError(f"trainer.max_steps: expected a number of steps >= 1 (or -1 with trainer.max_epochs >= 1), "
                         f"got {t.max_steps}")
    number(cfg, "trainer.accumulate_grad_batches", 1, integer=True)
    number(cfg, "trainer.gradient_clip_val", 0, optional=True)
    number(cfg, "trainer.log_every_n_steps", 1, integer=True)
    number(cfg, "trainer.num_nodes", 1, integer=True)
    choice(cfg, "trainer.precision", typing.get_args(_PRECISION_INPUT_STR) + ("32", "16", "bf16", "64"))
    choice(cfg, "trainer.accelerator", ACCELERATORS)
    devices = value_of(cfg, "trainer.devices")
    if isinstance(devices, str) and devices != "auto":  # Lightning also takes "2", "-1" and "0,1"
        parts = [p.strip() for p in devices.split(",") if p.strip()]
        devices = ListConfig(parts) if len(parts) > 1 and all(p.isdigit() for p in parts) else \
            (int(parts[0]) if len(parts) == 1 and parts[0].lstrip("-").isdigit() else devices)
    if isinstance(devices, bool) or not (devices == "auto" or isinstance(devices, ListConfig)
                                         or (isinstance(devices, int) and (devices >= 1 or devices == -1))):
        raise InputError(f"trainer.devices: expected a count >= 1, -1 (all), auto or a list of device indices, got {devices!r}")


def check_callbacks(cfg: DictConfig) -> None:
    number(cfg, "callbacks.model_checkpoint.every_n_train_steps", 1, integer=True, optional=True)
    number(cfg, "callbacks.model_checkpoint.save_top_k", -1, integer=True)
    number(cfg, "callbacks.alignment_validation.tau", 0, 1)
    number(cfg, "callbacks.alignment_validation.every_n_steps", 1, integer=True, optional=True)
    number(cfg, "callbacks.alignment_validation.images_per_prompt", 1, integer=True)
    number(cfg, "callbacks.toy_report.seeds_per_prompt", 1, integer=True)
    number(cfg, "callbacks.toy_report.num_inference_steps", 1, integer=True)
    number(cfg, "callbacks.toy_report.tau", 0, 1)
    for callback in ("toy_report", "alignment_validation"):
        metric_list(cfg, f"callbacks.{callback}.metrics")
    number(cfg, "callbacks.ema.decay", 0, 1, high_open=True)


def check_task_objective(cfg: DictConfig) -> None:
    """``objective=safetydpo`` (a workflow, :data:`WORKFLOW_OBJECTIVES`) with ``task=align`` (one fit) is refused
    with the command to write. Read from the command line's choices, and only when they chose this config's task
    (a run that ``task=compare`` composes has its own)."""
    if not HydraConfig.initialized():
        return
    choices = HydraConfig.get().runtime.choices
    task = (cfg.get("task") or {}).get("name")
    objective = choices.get("objective")
    if task != "align" or choices.get("task") != task or objective not in WORKFLOW_OBJECTIVES:
        return
    workflow, single = WORKFLOW_OBJECTIVES[objective]
    raise InputError(f"objective={objective} runs under task={workflow}, not task=align (one fit): write "
                     f"task={workflow} objective={objective}, or objective={single} for one LoRA")


def check_objective(cfg: DictConfig) -> None:
    """The objective builds (its constructor checks its own coefficients): cheap, and before the model loads."""
    try:
        instantiate(cfg.objective)
    except InstantiationException as error:
        cause = error.__cause__ if error.__cause__ is not None else error
        if isinstance(cause, InputError):
            raise cause from None
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if isinstance(cause, (ValueError, TypeError)):
            raise InputError(first if first.startswith("objective") else f"objective: {first}") from None
        raise


def check_against_model(cfg: DictConfig) -> None:
    """What the model's config files decide, read before any weight loads: the timestep range against the
    scheduler, and that every LoRA target names modules of the UNet (built on the meta device, no weights)."""
    m = cfg.model
    scheduler = pretrained_file(str(m.pretrained), "scheduler/scheduler_config.json", m.revision)
    if scheduler is not None:
        steps = int(json.loads(scheduler.read_text()).get("num_train_timesteps", 1000))
        t_max = steps - 1 if m.t_max is None else m.t_max
        if not 0 <= m.t_min <= t_max < steps:
            raise InputError(f"model.t_min/t_max: expected 0 <= t_min <= t_max < {steps} (the scheduler's "
                             f"num_train_timesteps), got {m.t_min}, {m.t_max}")
    family = family_for(str(m.pretrained), m.family, m.revision, local_files_only=True)
    config = pretrained_file(str(m.pretrained), f"{family.denoiser_name}/config.json", m.revision)
    if m.lora is None or config is None:
        return

    with torch.device("meta"):
        denoiser = family.denoiser_type.from_config(json.loads(config.read_text()))
    names = [name for name, _ in denoiser.named_modules()]
    unknown = [str(t) for t in m.lora.target_modules if not any(n == t or n.endswith("." + str(t)) for n in names)]
    if unknown:
        raise InputError(f"model.lora.target_modules: {unknown} name no module of the {type(denoiser).__name__} of "
                         f"{m.pretrained} (e.g. to_q, to_k, to_v, to_out.0, attn2.to_k, proj_in, conv1)")


# --------------------------------------------------------------------------------------------- checkpoint
def checkpoint_file(cfg: DictConfig) -> Path | None:
    """The checkpoint ``ckpt_path`` names: ``last`` must exist in the run directory, ``last_if_present``
    (for requeued cluster jobs) starts from scratch when it does not; ``None`` for a new run."""
    ckpt = cfg.get("ckpt_path")
    if ckpt is None:
        return None
    if ckpt in (LAST, LAST_IF_PRESENT):
        directory = value_of(cfg, "callbacks.model_checkpoint.dirpath")
        directory = Path(str(directory)) if directory not in (ABSENT, None) else Path(str(cfg.output_dir)) / "checkpoints"
        last = directory / "last.ckpt"
        if last.is_file() or is_sharded_checkpoint(last):
            return last
        if ckpt == LAST_IF_PRESENT:
            return None
        raise InputError(f"ckpt_path=last: no {last} (a new or mistyped hydra.run.dir?); give the run's directory "
                         f"as hydra.run.dir, or ckpt_path=last_if_present to start from scratch when there is none")
    path = existing_path("ckpt_path", ckpt)
    if not path.is_file() and not is_sharded_checkpoint(path):
        raise InputError(f"ckpt_path={ckpt}: is a directory, expected a checkpoint file (e.g. checkpoints/last.ckpt)")
    return path


def is_sharded_checkpoint(path: Path) -> bool:
    """A checkpoint FSDP wrote as a directory of shards (``trainer=fsdp``: Lightning's ``meta.pt`` inside)."""
    return path.is_dir() and (path / "meta.pt").is_file()


def check_checkpoint(cfg: DictConfig, path: Path, alignment: bool = True) -> None:
    """A checkpoint written by train.py: a Lightning checkpoint; for the alignment task also of the same LoRA
    rank, targets and adapter (or of full fine-tuning), on the same base model. Read memory-mapped (a full
    fine-tuning checkpoint with its optimizer state is large) and without unpickling code."""
    checkpoint = read_checkpoint(path, "ckpt_path", mmap=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise InputError(f"ckpt_path={path}: not a Lightning checkpoint written by train.py (no state_dict/global_step)")
    state = checkpoint["state_dict"]
    lora_keys = [k for k in state if ".lora_A." in k]
    m = cfg.get("model")
    if not alignment or m is None or "lora" not in m:
        return
    if m.lora is None and lora_keys:
        raise InputError(f"ckpt_path={path}: a LoRA checkpoint, but model.lora=null (full fine-tuning)")
    if m.lora is not None:
        if not lora_keys:
            raise InputError(f"ckpt_path={path}: a full fine-tuning checkpoint, but model.lora is set")
        ranks = sorted({int(state[k].shape[0]) for k in lora_keys})
        if ranks != [int(m.lora.rank)]:
            raise InputError(f"ckpt_path={path}: LoRA rank {', '.join(map(str, ranks))} in the checkpoint, "
                             f"model.lora.rank={m.lora.rank}")
        adapters = sorted({k.split(".lora_A.", 1)[1].split(".", 1)[0] for k in lora_keys})
        if adapters != [m.adapter_name]:
            raise InputError(f"ckpt_path={path}: adapter {', '.join(adapters)} in the checkpoint, "
                             f"model.adapter_name={m.adapter_name}")
        modules = {k.split(".lora_A.", 1)[0] for k in lora_keys}
        targets = [str(t) for t in m.lora.target_modules]
        matched = {t for t in targets for name in modules if name == t or name.endswith("." + t)}
        stray = sorted(name for name in modules if not any(name == t or name.endswith("." + t) for t in targets))
        if stray or matched != set(targets):
            what = f"e.g. {stray[0]}" if stray else f"none for {sorted(set(targets) - matched)}"
            raise InputError(f"ckpt_path={path}: its LoRA adapts other modules than model.lora.target_modules="
                             f"{targets} ({what})")
    saved = checkpoint.get("alignment") or {}
    if saved.get("base_model") is None or str(saved["base_model"]) == str(m.pretrained):
        return
    digest = unet_config_digest(str(m.pretrained), m.revision,
                                family_for(str(m.pretrained), m.family, m.revision, local_files_only=True).denoiser_name)
    if saved.get("unet_config") is None or digest is None:
        log.warning("ckpt_path: trained on %s, resumed on %s; their UNet configs cannot be compared",
                    saved["base_model"], m.pretrained)
    elif saved["unet_config"] != digest:  # another architecture; a moved copy or a snapshot of the hub id passes
        raise InputError(f"ckpt_path={path}: trained on base model {saved['base_model']}, whose UNet config differs "
                         f"from that of model.pretrained={m.pretrained}")


# ------------------------------------------------------------------------------------------------ entries
def check_train_config(cfg: DictConfig) -> None:
    """Everything ``train.py`` can know before it loads a model, for every task."""
    if "output_dir" in cfg:
        writable_directory("output_dir", cfg.output_dir)
    number(cfg, "seed", 0, integer=True)
    check_task_objective(cfg)
    if "model" in cfg:
        check_model(cfg)
        check_against_model(cfg)
    if "data" in cfg:
        check_data(cfg)
    if "trainer" in cfg:
        check_trainer(cfg)
    check_callbacks(cfg)
    if "objective" in cfg and cfg.get("objective") is not None:
        check_objective(cfg)
    task = cfg.get("task") or {}
    if task.get("runner", "workflows.fit.fit") == "workflows.fit.fit":  # workflows (experts, compare) resolve it per stage
        checkpoint = checkpoint_file(cfg)
        if checkpoint is not None and checkpoint.is_file():  # a directory: FSDP's sharded checkpoint
            check_checkpoint(cfg, checkpoint, alignment=task.get("builder") == ALIGNMENT_BUILDER)


def check_eval_config(cfg: DictConfig) -> None:
    """Everything ``evaluate.py`` can know before it loads a model."""
    writable_directory("output_dir", cfg.output_dir)
    writable_directory("cache_dir", cfg.cache_dir)
    check_model(cfg, training=False)
    number(cfg, "tau", 0, 1)
    number(cfg, "images_per_prompt", 1, integer=True)
    number(cfg, "seed", 0, integer=True)
    number(cfg, "grid_rows", 0, integer=True)
    number(cfg, "sampler.num_inference_steps", 1, integer=True)
    number(cfg, "sampler.guidance_scale", 0)
    number(cfg, "sampler.batch_size", 1, integer=True)
    for side in ("height", "width"):
        number(cfg, f"sampler.{side}", 8, integer=True, optional=True)
        size = value_of(cfg, f"sampler.{side}")
        if isinstance(size, int) and size % 8:
            raise InputError(f"sampler.{side}: expected a multiple of 8 (the VAE's downsampling), got {size}")
    choice(cfg, "sampler.dtype", DTYPES)

    choice(cfg, "sampler.scheduler", sorted(SCHEDULERS))
    device = str(cfg.device)
    if device.split(":")[0] not in ENCODE_DEVICES:
        raise InputError(f"device: expected auto, cpu, cuda, cuda:<n> or mps, got {device!r}")
    if cfg.lora is not None:

        existing_path("lora", cfg.lora)
        read_lora(Path(str(cfg.lora)).expanduser(), "lora")
    number(cfg, "scoring.detectors.0.threshold", 0, 1)
    if value_of(cfg, "scoring.metrics") is ABSENT:
        raise InputError("scoring.metrics: missing; the scoring config lists the aggregate metrics to compute "
                         "(as configs/scoring/toy.yaml does)")
    metric_list(cfg, "scoring.metrics")
