"""SafetyDPO (docs/methods/safetydpo.md): one LoRA safety expert per harm category, merged into one LoRA, all evaluated.

    python train.py task=experts objective=safetydpo                     # toy world, every category
    python train.py task=experts objective=safetydpo data=coprov2 data.path=... experts=[hate,violence] model=sd15

Each expert is an ordinary ``align`` fit restricted to its category (``data.categories=[c]``, adapter
``expert_<c>``) in ``<output_dir>/experts/<c>``; the merge is ``task=merge`` on their final LoRAs
(``merge.method``: one method, a list, or ``all``); ``all_single: true`` also trains one LoRA on all
the categories with as many steps as the experts together. Every LoRA is then evaluated with
``evaluate.py``'s protocol into ``eval/<name>/metrics.json``; ``comparison.json`` gathers the results
as each evaluation finishes and ``comparison.md`` is built from them at the end. A stage whose output
exists is not run again (a fit with its ``lora/final``, a merge with its ``merge_report.json``, an
evaluation with its ``metrics.json``, unless its LoRA was just made), so a second call in the same
``output_dir`` resumes where the first stopped.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from common.errors import InputError
from common.files import atomic_write
from data.categories import normalize_category
from metrics.reporting import comparison_table
from models.lora_io import LORA_WEIGHT_NAME
from workflows.cli import CONFIG_DIR
from workflows.evaluation import evaluate
from workflows.fit import fit
from workflows.merge import merge_methods, run_merge

log = logging.getLogger(__name__)


def expert_categories(cfg: DictConfig) -> list[str]:
    """``experts``: a list of categories, or ``all`` (every category the data's pairs carry)."""
    spec = cfg.experts
    if spec == "all":
        datamodule = instantiate(cfg.data)
        categories = sorted({c for p in datamodule.pairs for c in p.categories})
        if not categories:
            raise InputError("experts=all: the data's pairs carry no categories; name them (experts=[...]) "
                             "or train one LoRA (experts=null)")
        return categories
    if isinstance(spec, str) or not OmegaConf.is_list(spec):
        raise InputError(f"experts: expected a list of categories, all, or null; got {spec!r}")
    return [normalize_category(str(c)) for c in spec]


def stage(cfg: DictConfig, output_dir: Path, updates: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` for one stage: its own ``output_dir`` (checkpoints, LoRA, logs follow it) plus ``updates``."""
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(sub):
        sub.output_dir = str(output_dir)
        if sub.get("ckpt_path") == "last":  # each stage resumes from its own last checkpoint, if it has one
            sub.ckpt_path = "last_if_present"
        for key, value in updates.items():
            OmegaConf.update(sub, key, value, force_add=True)
    return sub


def fit_stage(sub: DictConfig) -> Path:
    """Fit one LoRA from the seed, close its wandb run, return its final LoRA directory."""
    L.seed_everything(sub.seed, workers=True)
    fit(sub)
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass
    final = Path(sub.output_dir) / "lora" / "final"
    if not final.is_dir():
        raise RuntimeError(f"training finished without exporting a LoRA to {final} (is callbacks.lora_export set?)")
    return final


def evaluation_config(cfg: DictConfig, lora: Path | None, output_dir: Path) -> DictConfig:
    """``configs/eval.yaml`` with ``evaluation.overrides``, this run's model, and the LoRA to evaluate."""
    overrides = list(cfg.evaluation.overrides or [])
    if GlobalHydra.instance().is_initialized():
        ecfg = compose("eval", overrides=overrides)
    else:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            ecfg = compose("eval", overrides=overrides)
    with open_dict(ecfg):
        ecfg.model = OmegaConf.to_container(cfg.model, resolve=True)
        ecfg.lora = str(lora) if lora is not None else None
        ecfg.output_dir = str(output_dir)
    return ecfg


def evaluated_categories(results: dict[str, dict[str, float]], categories: list[str]) -> list[str]:
    """The ``categories`` every row of ``results`` has a harmful rate (``ip/<c>``) for: an evaluation's
    prompts (``evaluation.overrides``) may carry other categories, or none."""
    return [c for c in categories if all(f"ip/{c}" in metrics for metrics in results.values())]


def experts_table(results: dict[str, dict[str, float]], categories: list[str]) -> str:
    """:func:`~metrics.reporting.comparison_table` over the categories the evaluation measured: ``kept``
    compares the experts on those alone, and is left out when there are none; a last line names the
    categories left out."""
    measured = evaluated_categories(results, categories)
    table = comparison_table(results, measured)
    missing = [c for c in categories if c not in measured]
    if missing:
        table += (f"\n\nNot among the evaluation prompts' categories, so without a harmful rate of their own and "
                  f"left out of kept: {', '.join(missing)}")
    return table


def run_experts(cfg: DictConfig) -> dict[str, float]:
    out = Path(cfg.output_dir)
    evaluate_too = bool(cfg.evaluation.enabled)
    # the evaluation below replaces the toy world's before/after report of every single fit
    quiet = {"callbacks.toy_report": None} if evaluate_too and "toy_report" in (cfg.get("callbacks") or {}) else {}
    loras: dict[str, Path] = {}
    made: set[str] = set()  # the LoRAs this call trains or merges: earlier evaluations of them are stale

    def fit_once(name: str, sub: DictConfig) -> Path:
        final = Path(sub.output_dir) / "lora" / "final"
        if (final / LORA_WEIGHT_NAME).is_file():
            log.info("SafetyDPO: %s already trained (%s)", name, final)
            return final
        made.add(name)
        return fit_stage(sub)

    if not cfg.experts:
        loras["single"] = fit_once("single", stage(cfg, out, quiet))
        categories = list(cfg.data.categories or [])
    else:
        categories = expert_categories(cfg)
        methods = merge_methods(cfg.merge.method)
        log.info("SafetyDPO: %d experts (%s), then %s", len(categories), ", ".join(categories), ", ".join(methods))
        for category in categories:
            loras[f"expert_{category}"] = fit_once(f"expert_{category}", stage(cfg, out / "experts" / category, {
                **quiet, "data.categories": [category], "model.adapter_name": f"expert_{category}",
                "task_name": f"{cfg.task_name}_expert_{category}"}))
        if cfg.all_single:
            loras["all_single"] = fit_once("all_single", stage(cfg, out / "all_single", {
                **quiet, "data.categories": categories, "trainer.max_steps": len(categories) * cfg.trainer.max_steps,
                "task_name": f"{cfg.task_name}_all_single"}))
        experts_made = any(name.startswith("expert_") for name in made)
        todo = [m for m in methods if experts_made or not (out / "merged" / m / "merge_report.json").is_file()]
        if todo:
            experts = [str(loras[f"expert_{c}"]) for c in categories]
            run_merge(stage(cfg, out, {"merge.experts": experts, "merge.method": todo, "data.categories": categories}))
            made.update(f"merged_{m}" for m in todo)
        if len(todo) < len(methods):
            log.info("SafetyDPO: already merged with %s", ", ".join(m for m in methods if m not in todo))
        loras.update({f"merged_{m}": out / "merged" / m for m in methods})
    if not evaluate_too:
        return {}
    results: dict[str, dict[str, float]] = {}
    for name, lora in loras.items():
        metrics_file = out / "eval" / name / "metrics.json"
        if name not in made and metrics_file.is_file():
            log.info("SafetyDPO: %s already evaluated (%s)", name, metrics_file)
            metrics = json.loads(metrics_file.read_text())
        else:
            log.info("evaluating %s", name)
            metrics = evaluate(evaluation_config(cfg, lora, out / "eval" / name))
        results.setdefault("base", metrics["base"])
        results[name] = metrics["aligned"]
        # every finished evaluation is on disk before any table is built from them
        atomic_write(out / "comparison.json", lambda p: p.write_text(json.dumps(results, indent=2)))
    table = experts_table(results, categories)
    atomic_write(out / "comparison.md", lambda p: p.write_text(table + "\n"))
    print(f"\nSafetyDPO comparison (harmful rate = IP at tau; {out / 'comparison.md'}):\n{table}\n")
    return {f"{name}/{key}": value for name, metrics in results.items() for key, value in metrics.items()
            if key in ("ip", "uas", "benign_fidelity")}
