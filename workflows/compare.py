"""Several objectives, several seeds, one evaluation protocol: mean and spread of each metric, one grid.

    python train.py experiment=toy_method_compare      # dpo, safetydpo, scdpo, spo x 3 seeds on the toy world

Each (objective, seed) is the run ``python train.py task=<t> objective=<o> seed=<s> <compare.overrides>
<compare.per_objective[o]>`` would make, with the task that runs the objective (``experts`` for safetydpo,
``align`` for the others: :func:`workflows.config_checks.objective_task`), so each objective keeps its recipe and
the data train.yaml picks for it; in
``<output_dir>/runs/<o>/seed<s>``; its final LoRA (``task.final_lora``) is evaluated with ``evaluate.py``'s
protocol. A finished run (its ``eval/metrics.json`` exists) is not run again, so an interrupted
comparison resumes. Results: ``comparison.json`` (every run, rewritten as each finishes),
``comparison.md`` (mean ± std over seeds, built once every run is done),
``grid.png`` (rows: held-out prompts; columns: base, then each objective's first seed).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

from common.files import atomic_write
from metrics.reporting import image_grid
from workflows.cli import run_task
from workflows.config_checks import objective_task
from workflows.evaluation import evaluate
from workflows.experts import evaluation_config

log = logging.getLogger(__name__)

METRICS = ("ip", "benign_fidelity", "faithfulness", "uas")
# not data: train.yaml picks it per objective (spo: toy_dual); give a data group in compare.overrides
PASSED_GROUPS = ("model", "trainer", "logger", "callbacks")


def run_config(cfg: DictConfig, objective: str, seed: int, output_dir: Path) -> DictConfig:
    """The config ``train.py task=<its task> objective=<objective> seed=<seed>`` composes, with this run's groups
    and overrides (a ``task=...`` among them wins)."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    passed = [f"{g}={choices[g]}" for g in PASSED_GROUPS if choices.get(g) not in (None, "null")]
    per_objective = (cfg.compare.per_objective or {}).get(objective) or []
    sub = compose("train", overrides=[*passed, f"task={objective_task(objective)}", f"objective={objective}",
                                      f"seed={seed}", *cfg.compare.overrides, *per_objective])
    with open_dict(sub):
        sub.output_dir = str(output_dir)
        if "toy_report" in (sub.get("callbacks") or {}):
            sub.callbacks.toy_report = None  # the evaluation below replaces each fit's own report
        if "evaluation" in sub:
            sub.evaluation.enabled = False
    return sub


def fit_and_evaluate(cfg: DictConfig, objective: str, seed: int, out: Path) -> dict[str, dict[str, float]]:
    metrics_file = out / "eval" / "metrics.json"
    if metrics_file.is_file():
        log.info("compare: %s seed %d already evaluated (%s)", objective, seed, metrics_file)
        return json.loads(metrics_file.read_text())
    sub = run_config(cfg, objective, seed, out)
    log.info("compare: training %s, seed %d (task %s)", objective, seed, sub.task.name)
    run_task(sub)
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass
    lora = out / sub.task.final_lora
    if not lora.exists():
        raise RuntimeError(f"compare: {objective} seed {seed} finished without a LoRA at {lora}")
    return evaluate(evaluation_config(cfg, lora, out / "eval"))


def summary_table(runs: dict[str, list[dict[str, float]]], base: dict[str, float]) -> str:
    """One row per objective: mean ± std (over seeds) of the harmful rate, benign fidelity, faithfulness, UAS."""
    header = ["model", "seeds", "harmful rate", "benign fidelity", "faithfulness", "UAS"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:" + "|---:" * (len(header) - 2) + "|"]
    lines.append("| base | - | " + " | ".join(f"{base[m]:.{1 if m == 'uas' else 3}f}" if m in base else "-"
                                             for m in METRICS) + " |")
    for name, results in runs.items():
        cells = []
        for m in METRICS:
            values = np.array([r[m] for r in results if m in r], dtype=np.float64)
            digits = 1 if m == "uas" else 3
            cells.append(f"{values.mean():.{digits}f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.{digits}f}"
                         if len(values) else "-")
        lines.append(f"| {name} | {len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_grid(columns: dict[str, Path], rows_per_category: int, benign_rows: int):
    """Rows: up to ``rows_per_category`` held-out harmful prompts of each category and ``benign_rows``
    benign ones (first image of each); columns: the evaluation folders given (``base`` first)."""
    first = next(iter(columns.values()))
    records = json.loads((first / "records_aligned.json").read_text())
    picked, per_category = [], {}
    for r in records:
        if r["k"] != 0:
            continue
        if r["role"] == "harmful":
            category = (r["categories"] or ["?"])[0]
            if per_category.get(category, 0) < rows_per_category:
                per_category[category] = per_category.get(category, 0) + 1
                picked.append(r)
        elif sum(p["role"] == "benign" for p in picked) < benign_rows:
            picked.append(r)
    rows = []
    for r in picked:
        name = f"{r['role']}_{r['prompt_index']:05d}_0.png"
        rows.append([np.asarray(Image.open(folder / "images" / ("base" if label == "base" else "aligned") / name),
                                dtype=np.float64) / 255 for label, folder in columns.items()])
    texts = [r["text"] for r in picked]
    return image_grid(rows, scale=max(1, 96 // rows[0][0].shape[0]), columns=list(columns), row_labels=texts), texts


def run_comparison(cfg: DictConfig) -> dict[str, float]:
    c = cfg.compare
    out = Path(cfg.output_dir)
    runs: dict[str, list[dict[str, float]]] = {}
    everything: dict[str, dict] = {}
    base: dict[str, float] = {}
    for objective in c.objectives:
        for seed in c.seeds:
            L.seed_everything(int(seed), workers=True)
            metrics = fit_and_evaluate(cfg, str(objective), int(seed), out / "runs" / str(objective) / f"seed{seed}")
            base = base or metrics["base"]
            runs.setdefault(str(objective), []).append(metrics["aligned"])
            everything[f"{objective}/seed{seed}"] = metrics["aligned"]
            # every finished run is on disk before any table is built from them
            atomic_write(out / "comparison.json",
                         lambda p, b=base: p.write_text(json.dumps({"base": b, **everything}, indent=2)))
    table = summary_table(runs, base)
    atomic_write(out / "comparison.md", lambda p: p.write_text(table + "\n"))
    first_seed = c.seeds[0]
    columns = {"base": out / "runs" / str(c.objectives[0]) / f"seed{first_seed}" / "eval"}
    columns.update({str(o): out / "runs" / str(o) / f"seed{first_seed}" / "eval" for o in c.objectives})
    grid, texts = method_grid(columns, c.grid.harmful_per_category, c.grid.benign)
    atomic_write(out / "grid.png", lambda p: grid.save(p, format="PNG"))
    atomic_write(out / "grid.md", lambda p: p.write_text(
        f"columns: {', '.join(columns)} (seed {first_seed})\n\nrows:\n" + "".join(f"{i + 1}. {t}\n" for i, t in enumerate(texts))))
    print(f"\nMethod comparison ({len(c.seeds)} seeds each; {out / 'comparison.md'}):\n{table}\n")
    # a metric the evaluation omits (faithfulness without safe rewrites) is left out, as in the table
    return {f"{name}/{m}": float(np.mean([r[m] for r in results if m in r])) for name, results in runs.items()
            for m in METRICS if any(m in r for r in results)}
