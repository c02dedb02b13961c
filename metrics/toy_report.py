"""Before/after evaluation on the toy world's held-out prompts: the evaluation protocol of ``evaluate.py``.

Active only when the run's data is the toy world (its reader carries a :class:`ToyWorld`). Before training
it samples with the adapters disabled (the base model, with the safe rewrites for the base means), after
training with them on, at the same fixed per-image seeds (image ``k`` of every prompt: ``seed + k``); the
images are scored by the scoring config's detectors and fidelity (the toy oracles) and the metrics are the
aggregates it lists (:mod:`metrics.aggregates`), so the table has ``evaluate.py``'s names. It prints the
table, writes ``toy_eval.json``/``toy_eval.md`` and a PNG grid (rows: prompts; columns: before, after) and
logs them.
"""
from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import lightning as L
import torch

from common.files import atomic_write
from data.readers.prompts import EvalPrompt, toy_prompts
from data.toy.world import ToyWorld
from metrics.aggregates import Aggregate
from metrics.evaluation import Scorer, alignment_metrics, base_means, categories_of, generate_records, make_jobs
from metrics.reporting import image_grid, markdown_table
from models.ema import find_ema
from models.sampling import SamplerSettings

log = logging.getLogger(__name__)


class ToyAlignmentReport(L.Callback):
    def __init__(self, dirpath: str | Path, detectors: Sequence, fidelity, metrics: Sequence[Aggregate],
                 seeds_per_prompt: int = 4, num_inference_steps: int = 20, guidance_scale: float = 4.0,
                 seed: int = 1234, tau: float = 0.5, batch_size: int = 64, scheduler: str = "ddim") -> None:
        self.dirpath = Path(dirpath)
        self.scorer, self.metrics, self.tau = Scorer(list(detectors), fidelity, tau), list(metrics), float(tau)
        self.settings = SamplerSettings(scheduler=scheduler, num_inference_steps=num_inference_steps,
                                        guidance_scale=guidance_scale, batch_size=batch_size)
        self.seeds_per_prompt, self.seed = seeds_per_prompt, seed
        self.before: tuple[list[dict], torch.Tensor] | None = None
        self.qbar: dict[str, float | None] = {}
        self.results: dict[str, dict[str, float]] = {}

    @staticmethod
    def _world(trainer: L.Trainer) -> ToyWorld | None:
        reader = getattr(trainer.datamodule, "reader", None)
        return getattr(reader, "world", None) if getattr(reader, "kind", None) != "images" else None

    def prompts(self, world: ToyWorld) -> list[EvalPrompt]:
        """The held-out prompts, each with the report's seed: image ``k`` of every prompt is drawn from ``seed + k``."""
        return [replace(p, seed=self.seed) for p in toy_prompts(world, "heldout")]

    def _evaluate(self, trainer: L.Trainer, module, world: ToyWorld,
                  base: bool) -> tuple[list[dict], torch.Tensor] | None:
        """Records and images of the base model (``base``, with the safe-rewrite jobs) or of the trained one;
        ``None`` when the base is no longer available (full fine-tuning without a reference copy, resumed
        after its first step)."""
        prompts = self.prompts(world)
        jobs = make_jobs(prompts, self.seeds_per_prompt, self.seed, self.settings.guidance_scale, use_prompt_seeds=True)
        safe = [j for j in make_jobs(prompts, self.seeds_per_prompt, self.seed, self.settings.guidance_scale,
                                     use_prompt_seeds=True, with_safe_rewrites=True) if j.role == "safe"] if base else []
        was_training = module.training
        module.eval()
        ema = find_ema(trainer) if not base else None  # with EMA on, the exported (averaged) weights
        with torch.no_grad(), (module.base() if base else nullcontext(module.unet)) as unet, \
                (ema.swapped(module) if ema is not None else nullcontext()):
            if unet is None:
                module.train(was_training)
                return None
            pipe = trainer.datamodule.encoder.to(module.device).pipeline(
                unet, module.family.sampling_scheduler(self.settings.scheduler, module.noise_scheduler.config))
            pipe.set_progress_bar_config(disable=True)
            records, images = generate_records(pipe, jobs, self.settings, self.scorer, progress=False)
            if safe:  # drawn apart: the harmful and benign images keep their batches with or without them
                safe_records, safe_images = generate_records(pipe, safe, self.settings, self.scorer, progress=False)
                records, images = records + safe_records, torch.cat([images, safe_images])
        module.train(was_training)
        return records, images

    def metrics_of(self, records: list[dict], world: ToyWorld) -> dict[str, float]:
        """The scoring config's aggregates on this process's records (the report runs on rank 0 alone)."""
        return alignment_metrics(records, self.metrics, self.qbar["qbar_benign"], self.qbar["qbar_safe"],
                                 categories_of(self.prompts(world)), self.tau, sync=False)

    def on_fit_start(self, trainer: L.Trainer, module) -> None:
        world = self._world(trainer)
        if world is not None and trainer.is_global_zero:
            self.before = self._evaluate(trainer, module, world, base=True)
            if self.before is None:
                log.warning("toy report: the base model is not available after the first step of full "
                            "fine-tuning without a reference copy; no before/after table")
            else:
                self.qbar = base_means(self.before[0], sync=False)

    def on_train_end(self, trainer: L.Trainer, module) -> None:
        world = self._world(trainer)
        if world is None or self.before is None or not trainer.is_global_zero:
            return
        before_records, before_images = self.before
        after_records, after_images = self._evaluate(trainer, module, world, base=False)
        self.results = {"before": self.metrics_of(before_records, world),
                        "after": self.metrics_of(after_records, world)}
        table = markdown_table(self.results["before"], self.results["after"])
        print("\nToy world, held-out prompts (base model vs aligned):\n" + table + "\n")
        self.dirpath.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dirpath / "toy_eval.json", lambda p: p.write_text(json.dumps(self.results, indent=2)))
        atomic_write(self.dirpath / "toy_eval.md", lambda p: p.write_text(table + "\n"))
        # rows: the first image of every harmful, then every benign prompt; columns: before, after
        before_at = {(r["role"], r["prompt_index"], r["k"]): n for n, r in enumerate(before_records)}
        shown = [(n, r) for role in ("harmful", "benign") for n, r in enumerate(after_records)
                 if r["role"] == role and r["k"] == 0]
        rows = [[before_images[before_at[(r["role"], r["prompt_index"], 0)]].permute(1, 2, 0).numpy(),
                 after_images[n].permute(1, 2, 0).numpy()] for n, r in shown]
        grid = image_grid(rows, columns=["before", "after"], row_labels=[r["text"] for _, r in shown])
        atomic_write(self.dirpath / "toy_grid.png", lambda p: grid.save(p, format="PNG"))
        log.info("toy evaluation written to %s", self.dirpath)
        for logger in trainer.loggers:
            logger.log_metrics({f"toy/{w}/{m}": v for w, ms in self.results.items() for m, v in ms.items()},
                               step=trainer.global_step)
            if hasattr(logger, "log_image"):
                logger.log_image(key="toy/grid_before_after", images=[grid])
