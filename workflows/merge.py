"""Merge LoRA experts saved in diffusers format (by this project or elsewhere) into one LoRA.

    python train.py task=merge merge.experts=[outputs/.../expert_violence,outputs/.../expert_hate]

The experts load into the base UNet as named adapters; calibration runs the UNet on noised latents of
the chosen data's pairs (random timesteps, fixed seed); the merged adapter is saved in diffusers
format with its per-layer SVD errors in ``merge_report.json``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from common.errors import InputError
from common.files import atomic_write
from data.datamodule import collate
from models.components import load_model
from models.encoders import ConditionEncoder
from models.families.base import DEFAULT_FAMILY, FAMILIES, ModelFamily
from models.lora_io import read_lora, save_kohya_lora, save_lora
from models.lora_merging import METHODS, lora_layers, merge_adapters

log = logging.getLogger(__name__)


def load_experts(unet, experts: list[str | Path], prefix: str = "unet") -> list[str]:
    """Load each expert file as adapter ``expert_<i>_<dir name>`` of the denoiser ``unet`` (its keys start with
    ``prefix``, the family's denoiser name); refuse experts that adapt different layers or shapes, with the file
    named."""
    names, reference = [], None
    for i, expert in enumerate(experts):
        path = Path(expert).expanduser()
        file, state = read_lora(path, f"merge.experts[{i}]")
        shapes = {k: tuple(v.shape) for k, v in state.items() if "lora" in k and k.endswith("weight")}
        if reference is None:
            reference = (file, shapes)
        elif set(shapes) != set(reference[1]):
            raise InputError(f"merge.experts[{i}]: {file} adapts other layers than {reference[0]}")
        else:
            # ranks may differ (down/A: [r, in], up/B: [out, r]); the layer sizes may not
            fixed = lambda k, shape: shape[1] if ("lora_A" in k or "lora.down" in k) else shape[0]  # noqa: E731
            bad = next((k for k in shapes if fixed(k, shapes[k]) != fixed(k, reference[1][k])), None)
            if bad:
                raise InputError(f"merge.experts[{i}]: {file} layer {bad} has shape {shapes[bad]}, "
                                 f"{reference[0]} has {reference[1][bad]}")
        name = f"expert_{i}_{path.stem if path.is_file() else path.name}".replace(".", "_")
        try:
            unet.load_lora_adapter(str(file.parent), weight_name=file.name, adapter_name=name, prefix=prefix)
        except (ValueError, RuntimeError, KeyError) as error:
            raise InputError(f"merge.experts[{i}]: {file} does not fit the base {type(unet).__name__} "
                             f"({str(error).splitlines()[0]})") from None
        check_loaded(unet, name, shapes, f"merge.experts[{i}]: {file}", prefix)
        names.append(name)
    return names


def check_loaded(unet, adapter: str, shapes: dict[str, tuple[int, ...]], source: str, prefix: str = "unet") -> None:
    """Refuse an expert that diffusers loaded only in part: its loader names a file's keys by the first one
    (peft's ``lora_A`` or diffusers' ``lora.down``), so a file that mixes the two loses the other kind's layers."""
    in_file = {k.removeprefix(f"{prefix}.").split(".lora")[0] for k in shapes if k.startswith(f"{prefix}.")}
    missing = sorted(in_file - set(lora_layers(unet, adapter)))
    if missing:
        raise InputError(f"{source}: only {len(in_file) - len(missing)} of its {len(in_file)} {type(unet).__name__} LoRA layers loaded "
                         f"(e.g. not {missing[0]}): its keys mix peft (lora_A/lora_B) and diffusers (lora.down/lora.up) "
                         "names; save it with one of them")


def calibration_runner(unet, noise_scheduler, datamodule, num_prompts: int, seed: int,
                       family: ModelFamily | None = None) -> Callable[[], None]:
    """Forward passes on ``num_prompts`` pairs' winner and loser latents at uniform random timesteps."""
    family = family or FAMILIES[DEFAULT_FAMILY]
    datamodule.setup("fit")
    dataset = datamodule.train_set
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dataset), generator=generator)[:num_prompts].tolist()
    items = [dataset[i] for i in picks]
    for item in items:
        item.pop("anchor_item", None)  # the calibration runs the pairs themselves
    batch = collate(items)
    sides = ("w", "l") if "latents_l" in batch else ("w",)
    latents = torch.cat([batch[f"latents_{side}"] for side in sides])
    cond = family.conditioning(batch, sides)
    t = family.draw_timesteps(noise_scheduler, latents.shape, 0, noise_scheduler.config.num_train_timesteps - 1,
                              generator=generator)
    noisy, _ = family.noisy_and_target(noise_scheduler, latents, torch.randn(latents.shape, generator=generator), t)

    def run() -> None:
        with torch.no_grad():
            for start in range(0, len(noisy), 16):
                part = slice(start, start + 16)
                family.predict(unet, noisy[part].to(unet.device), t[part].to(unet.device),
                               {k: v[part].to(unet.device) for k, v in cond.items()})
    return run


def merge_methods(spec) -> list[str]:
    """``merge.method`` (one name, a list or ListConfig of names, or ``all``) as a list of method names."""
    methods = list(METHODS) if spec == "all" else [spec] if isinstance(spec, str) else [str(m) for m in spec]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"merge.method: unknown {unknown or 'empty list'}; available: {', '.join(METHODS)} or all")
    return methods


def run_merge(cfg: DictConfig) -> dict[str, float]:
    """Merge ``merge.experts`` with each of ``merge.method``; each result goes to ``merge.output_dir/<method>``."""
    mc = cfg.merge
    methods = merge_methods(mc.method)
    if not mc.experts:
        raise InputError("merge.experts: give the saved expert LoRAs (directories or .safetensors files)")
    m = cfg.model
    components = load_model(m)
    unet = components.unet
    names = load_experts(unet, list(mc.experts), components.family.denoiser_name)
    run = None
    if "co_merge" in methods:
        datamodule = instantiate(cfg.data, encoder=ConditionEncoder(components),
                                 resolution=int(cfg.data.get("resolution") or m.resolution or components.resolution))
        run = calibration_runner(unet, components.noise_scheduler, datamodule, mc.calibration_prompts, cfg.seed,
                                 components.family)
    weights = OmegaConf.to_container(mc.weights) if mc.get("weights") is not None else None
    metrics: dict[str, float] = {}
    for method in methods:
        torch.manual_seed(cfg.seed)  # the dare_* methods prune at random
        errors = merge_adapters(unet, names, method, run, merged_name=method, rank=mc.rank, weights=weights,
                                density=mc.density)
        out = Path(mc.output_dir) / method
        path = save_lora(unet, out, method, components.family)
        if components.family.kohya_export:
            save_kohya_lora(unet, out, method)  # the same merge for AUTOMATIC1111 / ComfyUI
        report = {"experts": [str(e) for e in mc.experts], "method": method, "rank": unet.peft_config[method].r}
        if errors:
            report["relative_svd_error"] = errors
            metrics.update({f"{method}/svd_error_mean": errors["mean"], f"{method}/svd_error_max": errors["max"]})
        atomic_write(out / "merge_report.json", lambda p, r=report: p.write_text(json.dumps(r, indent=2)))
        extra = f", relative SVD error mean {errors['mean']:.3g}, max {errors['max']:.3g}" if errors else ""
        print(f"merged {len(names)} experts with {method}: {path} (rank {report['rank']}{extra})")
    return metrics
