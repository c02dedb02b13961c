"""Build a dual-annotated dataset (:mod:`data.readers.dual`) from a prompt list: generate, score, append.

    python train.py task=build_dual                                     # toy model, toy prompts, toy oracles
    python train.py task=build_dual model=sd15 build.prompts._target_=data.readers.prompts.read_text \\
        build.prompts.path=prompts.txt build=real                       # CLIPScore quality, NudeNet safety

Per prompt: ``images_per_prompt`` images of the prompt and, when the prompt has a safe rewrite,
``safe_images_per_prompt`` images of the rewrite (CoProV2 style: the safe candidates), all scored under
the original prompt. Image ``n`` of prompt ``i`` gets seed ``seed + i * k + n`` (``k`` images per
prompt), so an interrupted build resumes where it stopped and ends as an uninterrupted one would: a
prompt's PNGs are written first, then its rows are appended to ``annotations.jsonl`` in one write and
fsynced; prompts already there are skipped, a torn last line is dropped.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from common.files import atomic_write
from data.readers.dual import ANNOTATIONS_FILE, read_annotations
from data.readers.prompts import EvalPrompt
from metrics.detectors import CombinedDetector
from models.components import load_model
from models.sampling import SamplerSettings, generate, use_scheduler

log = logging.getLogger(__name__)

QualityScorer = Callable[[Sequence[str], Tensor], Tensor]
SafetyScorer = Callable[[Tensor], Tensor]


@dataclass
class Scorers:
    """``quality(prompts, images)`` times ``quality_scale`` must land in [0, 1] (CLIPScore: 0.01);
    ``safety(images)`` gives the unsafe probability, or is ``None`` (rows get ``unsafe: null``, for a
    cost model to fill at training time)."""

    quality: QualityScorer
    safety: SafetyScorer | None = None
    quality_scale: float = 1.0

    def __call__(self, prompts: Sequence[str], images: Tensor) -> tuple[list[float], list[float | None]]:
        quality = (self.quality(prompts, images).double() * self.quality_scale).clamp(0, 1).tolist()
        unsafe = self.safety(images).double().clamp(0, 1).tolist() if self.safety is not None else [None] * len(prompts)
        return quality, unsafe


def completed_prompts(file: Path) -> set[int]:
    """Indices of the prompts whose rows are complete in ``file``; a torn last line is cut off."""
    if not file.is_file():
        return set()
    data = file.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line (an interrupted build)", file)
        with open(file, "r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    return {json.loads(line)["prompt_index"] for line in data.decode("utf-8").splitlines() if line.strip()}


def build_dual_dataset(pipe, prompts: Sequence[EvalPrompt], out_dir: str | Path, scorers: Scorers, settings,
                       images_per_prompt: int = 4, safe_images_per_prompt: int = 0, seed: int = 0) -> Path:
    """Generate and score every prompt not yet in ``out_dir/annotations.jsonl``; returns that file."""
    if images_per_prompt < 1 or safe_images_per_prompt < 0:
        raise ValueError("build: images_per_prompt must be >= 1 and safe_images_per_prompt >= 0")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    file = out / ANNOTATIONS_FILE
    done = completed_prompts(file)
    per_prompt = images_per_prompt + safe_images_per_prompt
    todo = [i for i in range(len(prompts)) if i not in done]
    if done:
        log.info("build: %d of %d prompts already in %s; resuming", len(done), len(prompts), file)
    for i in tqdm(todo, desc="building dual-annotated set", unit="prompt"):
        prompt = prompts[i]
        sources = [prompt.text] * images_per_prompt
        if prompt.safe_text:
            sources += [prompt.safe_text] * safe_images_per_prompt
        seeds = [seed + i * per_prompt + n for n in range(len(sources))]
        images = generate(pipe, sources, seeds, settings, progress=False)
        quality, unsafe = scorers([prompt.text] * len(sources), images)
        rows = []
        for n, (source, image) in enumerate(zip(sources, images)):
            name = f"images/{i:06d}_{n:02d}.png"
            array = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            atomic_write(out / name, lambda p, a=array: Image.fromarray(a).save(p, format="PNG"))
            rows.append({"prompt": prompt.text, "image": name, "quality": quality[n], "unsafe": unsafe[n],
                         "categories": list(prompt.categories), "safe_prompt": prompt.safe_text,
                         "generated_from": source, "seed": seeds[n], "prompt_index": i})
        with open(file, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in rows))
            handle.flush()
            os.fsync(handle.fileno())
    return file


def run_build(cfg: DictConfig) -> dict[str, float]:
    """``task=build_dual``: the model of ``cfg.model`` generates, ``cfg.build``'s scorers annotate."""
    b = cfg.build
    prompts = list(instantiate(b.prompts))
    if not prompts:
        raise ValueError("build.prompts: the prompt set is empty")
    settings = SamplerSettings(**OmegaConf.to_container(b.sampler, resolve=True))
    safety = CombinedDetector([instantiate(d) for d in b.safety]) if b.safety else None
    scorers = Scorers(instantiate(b.quality), safety, float(b.quality_scale))
    pipe = load_model(cfg.model).pipeline()
    use_scheduler(pipe, settings.scheduler)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    file = build_dual_dataset(pipe, prompts, b.output_dir, scorers, settings, b.images_per_prompt,
                              b.safe_images_per_prompt, cfg.seed)
    groups = read_annotations(file)
    images = [i for g in groups for i in g.images]
    log.info("dual-annotated set: %d prompts, %d images in %s", len(groups), len(images), file)
    print(f"dual-annotated set: {len(groups)} prompts, {len(images)} images -> {file}")
    return {"prompts": float(len(groups)), "images": float(len(images))}
