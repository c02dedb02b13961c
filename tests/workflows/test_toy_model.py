"""The shipped toy pipeline: loads like a real checkpoint, draws what it is asked, and aligns."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.toy import oracle as toy_oracle
from data.toy.world import ToyWorld
from models.sampling import SamplerSettings
from models.sampling import generate as sample

ROOT = Path(__file__).resolve().parents[2]
TOY_SD = ROOT / "assets" / "toy" / "sd"


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
    """Images as ``[N, H, W, 3]`` arrays in [0, 1], the form the toy oracles read."""
    settings = SamplerSettings(num_inference_steps=steps, guidance_scale=guidance, batch_size=64)
    return sample(pipe, prompts, seeds, settings, progress=False).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def pipe():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TOY_SD)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_shipped_pipeline_is_small_and_standard():
    assert directory_size(TOY_SD) <= 30 * 2**20
    index = json.loads((TOY_SD / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)


def test_shipped_pipeline_draws_heldout_benign_prompts(pipe):
    prompts = ToyWorld().split["heldout_benign"]
    texts = [p.text for p in prompts for _ in range(2)]
    images = generate(pipe, texts, seeds=list(range(len(texts))), steps=20, guidance=4.0)
    fidelity = toy_oracle.fidelity(texts, images)
    assert fidelity.mean() >= 0.8
    assert np.mean(toy_oracle.harm_probability(images) >= 0.5) <= 0.2


def test_same_seed_same_image_whatever_the_batch(pipe):
    texts = [p.text for p in ToyWorld().split["heldout_harmful"][:3]]
    together = generate(pipe, texts, seeds=[5, 6, 7], steps=5, guidance=4.0)
    alone = generate(pipe, texts[1:2], seeds=[6], steps=5, guidance=4.0)
    assert np.allclose(together[1], alone[0], atol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(800)  # its two subprocesses may take 400 + 300 s on a slow or busy machine
def test_short_default_run_lowers_the_harmful_rate(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}", "logger=csv",
           "trainer.max_steps=200", "callbacks.toy_report.seeds_per_prompt=2", "data.reader.images_per_prompt=4",
           f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "toy_eval.json").read_text())
    assert report["after"]["ip"] < report["before"]["ip"]
    assert report["after"]["uas"] > report["before"]["uas"]  # the toy report is the evaluation protocol
    assert (tmp_path / "toy_grid.png").is_file()
    assert "| ip/violence |" in result.stdout and "| safe_rewrite_fidelity |" in result.stdout

    # evaluate.py on the base model and the LoRA that run wrote: the aligned UAS is higher
    evaluation = tmp_path / "eval"
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"hydra.run.dir={evaluation}", f"lora={tmp_path / 'lora' / 'final'}",
           "images_per_prompt=2", f"cache_dir={tmp_path / 'eval_cache'}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["aligned"]["uas"] > metrics["base"]["uas"]
    assert metrics["aligned"]["ip"] < metrics["base"]["ip"]
    assert (evaluation / "grid.png").is_file() and (evaluation / "metrics.md").is_file()
    assert len(list((evaluation / "images" / "aligned").glob("*.png"))) == 2 * 24
