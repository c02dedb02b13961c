"""Callbacks that export what the training module learned in formats other tools load."""
from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Mapping

import lightning as L
import yaml
from omegaconf import OmegaConf

from common.files import atomic_write
from models.alignment_module import AlignmentModule
from models.ema import EMACallback, find_ema
from models.lora_io import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, save_kohya_lora, save_lora

log = logging.getLogger(__name__)


class LoraExportCallback(L.Callback):
    """With every checkpoint, write the LoRA as ``<dirpath>/step_<n>/`` (``pytorch_lora_weights.safetensors``,
    diffusers format, and ``lora_kohya.safetensors``, kohya-ss format for AUTOMATIC1111 and ComfyUI).

    At the end of training the final adapter also goes to ``<dirpath>/final/`` (or, for full fine-tuning,
    the UNet to ``<dirpath>/../unet`` with ``save_pretrained``), with a model card ``README.md``: the base
    model, data, objective and whatever else ``card`` holds (section name -> settings; ``base_model`` is the
    base model's id or path), the steps and the final metrics.

    When the trainer's ModelCheckpoint keeps only its top k by ``monitor="step"`` (the last k), a
    ``step_<n>`` export is deleted with its checkpoint. With an enabled :class:`EMACallback`, the exports
    hold its average, and the training weights are put back afterwards.
    """

    def __init__(self, dirpath: str | Path, card: Mapping[str, Any] | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.card = dict(OmegaConf.to_container(card, resolve=True) if OmegaConf.is_config(card) else card or {})
        self._exported_step: int | None = None
        self._kept: dict[str, int] | None = None     # top-k checkpoint path -> its step, as last seen
        self._dropped: dict[str, int] = {}           # left the top k at the last save; Lightning deletes them after it

    # ---------------------------------------------------------------- exports
    def _weights(self, trainer: L.Trainer, module: AlignmentModule) -> ContextManager:
        ema: EMACallback | None = find_ema(trainer)
        return ema.swapped(module) if ema is not None else nullcontext()

    def _export(self, trainer: L.Trainer, module: AlignmentModule, name: str) -> Path:
        with self._weights(trainer, module):
            if module.family.kohya_export:
                save_kohya_lora(module.unet, self.dirpath / name, module.adapter_name)
            return save_lora(module.unet, self.dirpath / name, module.adapter_name, module.family)

    def on_save_checkpoint(self, trainer: L.Trainer, module: AlignmentModule, checkpoint: dict) -> None:
        if not (trainer.is_global_zero and module.uses_lora):
            return
        kept = self._top_k_steps(trainer)  # the top-k save comes before last.ckpt's: this step is in, or never
        if self._exported_step != trainer.global_step and (kept is None or trainer.global_step in kept.values()):
            self._export(trainer, module, f"step_{trainer.global_step:06d}")  # once for the top-k and last.ckpt saves
            self._exported_step = trainer.global_step
        self._prune(trainer)

    def on_train_end(self, trainer: L.Trainer, module: AlignmentModule) -> None:
        if not trainer.is_global_zero:
            return
        self._prune(trainer)
        if module.uses_lora:
            path = self._export(trainer, module, "final")
            directory = path.parent
        else:
            directory = path = self.dirpath.parent / module.family.denoiser_name  # a pipeline subfolder: unet, transformer
            with self._weights(trainer, module):
                module.unet.save_pretrained(path)
        write_model_card(directory / "README.md", self.model_card(trainer, module))
        log.info("exported trained weights: %s", path)

    # -------------------------------------------------------------- retention
    @staticmethod
    def _top_k_steps(trainer: L.Trainer) -> dict[str, int] | None:
        """Path -> step of the checkpoints the ModelCheckpoint keeps, when it keeps the last k by step."""
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or checkpoint.monitor != "step" or checkpoint.save_top_k < 0:
            return None
        return {path: int(score) for path, score in checkpoint.best_k_models.items()}

    def on_train_start(self, trainer: L.Trainer, module: AlignmentModule) -> None:
        self._kept = self._top_k_steps(trainer)  # after a resume: the checkpoints the previous run kept

    def _prune(self, trainer: L.Trainer) -> None:
        """Delete ``step_<n>`` exports whose checkpoint left the top k at an earlier save and is gone from disk
        (Lightning keeps some, such as the one a run resumed from: their exports stay too)."""
        kept = self._top_k_steps(trainer)
        if kept is None:
            return
        for path, step in self._dropped.items():
            if not Path(path).exists() and step not in kept.values():
                shutil.rmtree(self.dirpath / f"step_{step:06d}", ignore_errors=True)
                log.info("deleted the LoRA export of step %d with its checkpoint", step)
        self._dropped = {path: step for path, step in (self._kept or {}).items() if path not in kept}
        self._kept = kept

    # ------------------------------------------------------------- model card
    def model_card(self, trainer: L.Trainer, module: AlignmentModule) -> str:
        """Markdown with YAML front matter (the Hugging Face model card layout)."""
        sections = dict(self.card)
        base = sections.pop("base_model", None)
        ema = find_ema(trainer)
        training: dict[str, Any] = {"optimizer_steps": trainer.global_step,
                                    "accumulate_grad_batches": trainer.accumulate_grad_batches,
                                    "precision": str(trainer.precision), "devices": trainer.world_size}
        if ema is not None:
            training["ema"] = {"decay": ema.decay, "warmup": ema.warmup, "updates": ema.num_updates}
        if module.uses_lora:
            lora = module.unet.peft_config[module.adapter_name]
            training["lora"] = {"rank": lora.r, "alpha": lora.lora_alpha, "target_modules": sorted(lora.target_modules)}
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        front = {"base_model": base, "library_name": "diffusers",
                 "tags": ["stable-diffusion", "text-to-image", "diffusers", "safety-alignment",
                          "lora" if module.uses_lora else "full-fine-tuning"]}
        kind = "LoRA" if module.uses_lora else "fine-tuned UNet"
        lines = ["---", yaml.safe_dump({k: v for k, v in front.items() if v is not None}, sort_keys=False).strip(),
                 "---", "", f"# {kind} of {base or 'a Stable Diffusion model'}", "",
                 f"Safety alignment with `{objective_name(sections.get('objective'))}` by t2i-safety-align "
                 f"(`train.py`), {trainer.global_step} optimizer steps"
                 + (" (weights: exponential moving average)." if ema is not None else "."), ""]
        if module.uses_lora:
            lines += ["## Files", "",
                      f"- `{LORA_WEIGHT_NAME}`: diffusers format, `pipe.load_lora_weights(\"<this directory>\")`",
                      f"- `{KOHYA_WEIGHT_NAME}`: kohya-ss format (AUTOMATIC1111, ComfyUI, kohya-ss scripts)", ""]
        else:
            lines += ["## Files", "", "A diffusers `UNet2DConditionModel` directory: "
                      "`UNet2DConditionModel.from_pretrained(\"<this directory>\")`.", ""]
        for title, settings in {**sections, "training": training}.items():
            lines += [f"## {title.replace('_', ' ').capitalize()}", ""]
            if isinstance(settings, (Mapping, list, tuple)):
                lines += ["```yaml", yaml.safe_dump(plain(settings), sort_keys=False).strip(), "```", ""]
            else:
                lines += [f"`{settings}`", ""]
        lines += ["## Final metrics", ""]
        lines += (["| metric | value |", "|---|---:|"] + [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
                  if metrics else ["none logged"])
        return "\n".join(lines) + "\n"


def objective_name(objective: Any) -> str:
    """``alignment.dpo.DPO`` -> ``DPO``: the class an objective config targets, or what was given."""
    if isinstance(objective, Mapping) and "_target_" in objective:
        return str(objective["_target_"]).rsplit(".", 1)[-1]
    return str(objective) if objective else "an objective"


def plain(value: Any) -> Any:
    """Lists, dicts, strings and numbers only (tuples become lists, other objects their ``str``), for YAML."""
    return json.loads(json.dumps(value, default=str))


def write_model_card(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path
