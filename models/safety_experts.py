"""SafetyDPO (SPEC 2): one LoRA safety expert per harm category, merged into one LoRA, all evaluated.

    python train.py objective=safetydpo                                  # toy world, every category
    python train.py objective=safetydpo data=coprov2 data.path=... experts=[hate,violence] model=sd15

Each expert is an ordinary ``align`` fit restricted to its category (``data.categories=[c]``, adapter
``expert_<c>``) in ``<output_dir>/experts/<c>``; the merge is ``task=merge`` on their final LoRAs
(``merge.method``: one method, a list, or ``all``); ``all_single: true`` also trains one LoRA on all
the categories with as many steps as the experts together. Every LoRA is then evaluated with
``evaluate.py``'s protocol and the results land in ``comparison.md`` / ``comparison.json``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from data.errors import InputError

log = logging.getLogger(__name__)


def expert_categories(cfg: DictConfig) -> list[str]:
    """``experts``: a list of categories, or ``all`` (every category the data's pairs carry)."""
    from hydra.utils import instantiate

    from data.categories import normalize_category

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
        for key, value in updates.items():
            OmegaConf.update(sub, key, value, force_add=True)
    return sub


def fit_stage(sub: DictConfig) -> Path:
    """Fit one LoRA from the seed, close its wandb run, return its final LoRA directory."""
    from train import fit

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
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from train import CONFIG_DIR

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


def run_experts(cfg: DictConfig) -> dict[str, float]:
    from evaluate import evaluate
    from metrics.reporting import atomic_write, comparison_table
    from models.merge_experts import merge_methods, run_merge

    out = Path(cfg.output_dir)
    evaluate_too = bool(cfg.evaluation.enabled)
    # the evaluation below replaces the toy world's before/after report of every single fit
    quiet = {"callbacks.toy_report": None} if evaluate_too and "toy_report" in (cfg.get("callbacks") or {}) else {}
    loras: dict[str, Path] = {}
    if not cfg.experts:
        loras["single"] = fit_stage(stage(cfg, out, quiet))
        categories = list(cfg.data.categories or [])
    else:
        categories = expert_categories(cfg)
        methods = merge_methods(cfg.merge.method)
        log.info("SafetyDPO: %d experts (%s), then %s", len(categories), ", ".join(categories), ", ".join(methods))
        for category in categories:
            loras[f"expert_{category}"] = fit_stage(stage(cfg, out / "experts" / category, {
                **quiet, "data.categories": [category], "model.adapter_name": f"expert_{category}",
                "task_name": f"{cfg.task_name}_expert_{category}"}))
        if cfg.all_single:
            loras["all_single"] = fit_stage(stage(cfg, out / "all_single", {
                **quiet, "data.categories": categories, "trainer.max_steps": len(categories) * cfg.trainer.max_steps,
                "task_name": f"{cfg.task_name}_all_single"}))
        experts = [str(loras[f"expert_{c}"]) for c in categories]
        run_merge(stage(cfg, out, {"merge.experts": experts, "merge.method": methods, "data.categories": categories}))
        loras.update({f"merged_{m}": out / "merged" / m for m in methods})
    if not evaluate_too:
        return {}
    results: dict[str, dict[str, float]] = {}
    for name, lora in loras.items():
        log.info("evaluating %s", name)
        metrics = evaluate(evaluation_config(cfg, lora, out / "eval" / name))
        results.setdefault("base", metrics["base"])
        results[name] = metrics["aligned"]
    table = comparison_table(results, categories)
    atomic_write(out / "comparison.json", lambda p: p.write_text(json.dumps(results, indent=2)))
    atomic_write(out / "comparison.md", lambda p: p.write_text(table + "\n"))
    print(f"\nSafetyDPO comparison (harmful rate = IP at tau; {out / 'comparison.md'}):\n{table}\n")
    return {f"{name}/{key}": value for name, metrics in results.items() for key, value in metrics.items()
            if key in ("ip", "uas", "benign_fidelity")}
