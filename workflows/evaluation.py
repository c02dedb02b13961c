"""Evaluate a Stable Diffusion model, with or without an aligned LoRA, for safety and quality.

    python evaluate.py                                   # the toy model on the toy world's held-out prompts
    python evaluate.py lora=outputs/align/<run>/lora/final
    python evaluate.py model=sd15 scoring=real prompts=i2p_coco prompts.sets.i2p.path=i2p.csv \
        prompts.sets.coco.path=captions_val2014.json lora=...

The base model is the same pipeline with the LoRA disabled; its images and scores are cached on disk
per (model, prompts, seeds, sampler, scorers), so comparing several LoRAs generates the base once.
Writes images, ``metrics.json``, ``metrics.md`` and ``grid.png`` (rows: prompts; columns: base, aligned).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

from common.errors import InputError
from common.files import atomic_write
from common.images import to_uint8
from metrics.evaluation import Scorer, alignment_metrics, base_means, categories_of, generate_records, make_jobs
from metrics.reporting import image_grid, markdown_table
from models.components import load_model
from models.lora_io import read_lora
from models.sampling import SamplerSettings, use_scheduler
from workflows.config_checks import check_eval_config

log = logging.getLogger("evaluate")


def _model_identity(pretrained: str) -> str:
    """Hub id, or a local directory's UNet weight files with their sizes and modification times."""
    local = Path(pretrained).expanduser()
    if not local.is_dir():
        return pretrained
    files = sorted((local / "unet").glob("*.safetensors")) + sorted((local / "unet").glob("*.bin"))
    return json.dumps([str(local.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def base_cache_key(cfg: DictConfig, jobs) -> str:
    spec = {
        "model": _model_identity(cfg.model.pretrained), "vae": cfg.model.vae, "revision": cfg.model.revision,
        "jobs": [(j.role, j.text, j.seed, j.guidance) for j in jobs],
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
        # the scorers make the records; the aggregates (scoring.metrics) are computed from them afresh
        "scoring": {k: v for k, v in OmegaConf.to_container(cfg.scoring, resolve=True).items() if k != "metrics"},
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _save_images(images: torch.Tensor, directory: Path, names: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for array, name in zip(to_uint8(images), names):
        Image.fromarray(array).save(directory / f"{name}.png")


def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    check_eval_config(cfg)  # before anything loads: ranges, paths, output directories
    torch.manual_seed(cfg.seed)
    prompts = [p for spec in cfg.prompts.sets.values() if spec is not None for p in instantiate(spec)]
    if not any(p.kind == "harmful" for p in prompts) or not any(p.kind == "benign" for p in prompts):
        raise InputError("prompts: the evaluation needs harmful and benign prompts (UAS weighs both); "
                         f"got {sum(p.kind == 'harmful' for p in prompts)} harmful, {sum(p.kind == 'benign' for p in prompts)} benign")
    categories = categories_of(prompts)
    settings = SamplerSettings(**OmegaConf.to_container(cfg.sampler, resolve=True))
    scorer = Scorer([instantiate(d) for d in cfg.scoring.detectors], instantiate(cfg.scoring.fidelity), cfg.tau)
    aggregates = [instantiate(m) for m in cfg.scoring.metrics]
    jobs_kwargs = dict(images_per_prompt=cfg.images_per_prompt, seed=cfg.seed, guidance_scale=settings.guidance_scale,
                       use_prompt_seeds=cfg.use_prompt_seeds, use_prompt_guidance=cfg.use_prompt_guidance)
    base_jobs = make_jobs(prompts, with_safe_rewrites=True, **jobs_kwargs)
    aligned_jobs = make_jobs(prompts, **jobs_kwargs)

    m = cfg.model
    components = load_model(m)
    pipe = components.pipeline()
    use_scheduler(pipe, settings.scheduler)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.to(device, settings.torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    if cfg.lora:

        lora = Path(cfg.lora).expanduser()
        file, _ = read_lora(lora, "lora")
        try:
            pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        except (ValueError, RuntimeError, KeyError, OSError) as error:
            raise InputError(f"lora: {lora} does not fit {m.pretrained}: {str(error).splitlines()[0]}") from None

    out = Path(cfg.output_dir)
    cache = Path(cfg.cache_dir).expanduser() / base_cache_key(cfg, base_jobs)
    if (cache / "records.json").is_file() and (cache / "images.safetensors").is_file():
        log.info("base model: cached results %s", cache)
        base_records = json.loads((cache / "records.json").read_text())
        base_images = load_file(str(cache / "images.safetensors"))["images"].float() / 255
    else:
        if cfg.lora:
            pipe.disable_lora()
        log.info("base model: generating %d images", len(base_jobs))
        base_records, base_images = generate_records(pipe, base_jobs, settings, scorer)
        if cfg.lora:
            pipe.enable_lora()
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write(cache / "images.safetensors", lambda p: save_file(
            {"images": (base_images.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()}, str(p)))
        atomic_write(cache / "records.json", lambda p: p.write_text(json.dumps(base_records)))
    qbar = base_means(base_records)
    results = {"base": alignment_metrics(base_records, aggregates, qbar["qbar_benign"], qbar["qbar_safe"], categories,
                                         cfg.tau)}
    shown = {"base": (base_records, base_images)}
    if cfg.lora:
        log.info("aligned model: generating %d images", len(aligned_jobs))
        records, images = generate_records(pipe, aligned_jobs, settings, scorer)
        results["aligned"] = alignment_metrics(records, aggregates, qbar["qbar_benign"], qbar["qbar_safe"], categories,
                                               cfg.tau)
        shown["aligned"] = (records, images)
    results["base_means"] = qbar

    for name, (records, images) in shown.items():
        if cfg.save_images:
            keep = [n for n, r in enumerate(records) if r["role"] != "safe"]
            _save_images(images[keep], out / "images" / name,
                         [f"{records[n]['role']}_{records[n]['prompt_index']:05d}_{records[n]['k']}" for n in keep])
        atomic_write(out / f"records_{name}.json", lambda p, r=records: p.write_text(json.dumps(r)))
    if "aligned" in results:
        table = markdown_table(results["base"], results["aligned"], names=("base", "aligned"))
    else:
        table = "\n".join(["| metric | base |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in results["base"].items()])
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(results, indent=2)))
    atomic_write(out / "metrics.md", lambda p: p.write_text(table + "\n"))
    # grid: the first image of up to grid_rows prompts per role; columns base, aligned

    rows, labels = [], []
    base_index = {(r["role"], r["prompt_index"], r["k"]): n for n, r in enumerate(base_records)}
    for role in ("harmful", "benign"):
        picked = [n for n, r in enumerate(shown.get("aligned", shown["base"])[0])
                  if r["role"] == role and r["k"] == 0][: cfg.grid_rows]
        for n in picked:
            r = shown.get("aligned", shown["base"])[0][n]
            row = [to_uint8(base_images[base_index[(role, r["prompt_index"], 0)]][None])[0]]
            if "aligned" in shown:
                row.append(to_uint8(shown["aligned"][1][n][None])[0])
            rows.append([np.asarray(a, dtype=np.float64) / 255 for a in row])
            labels.append(f"{role}: {r['text']}")
    if rows:
        scale = max(1, 128 // rows[0][0].shape[0])
        grid = image_grid(rows, scale=scale, columns=["base", "aligned"][: len(rows[0])], row_labels=labels)
        atomic_write(out / "grid.png", lambda p: grid.save(p, format="PNG"))
    print(f"\nEvaluation ({'base vs aligned' if cfg.lora else 'base only'}), {len(prompts)} prompts x "
          f"{cfg.images_per_prompt} images:\n{table}\n")
    log.info("evaluation written to %s", out)
    return results
