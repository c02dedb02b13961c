"""train.py and evaluate.py end to end on a tiny random SD 3 pipeline (rectified flow, MMDiT, CLIP x 2 + T5):
every objective a few steps, SafetyDPO's experts merged (Co-Merge and a peft baseline) and evaluated, task=merge,
and evaluate.py on a merged LoRA. The family comes from the checkpoint's model_index.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, solid_image
from tests.workflows.test_train_integration import metrics_rows

pytestmark = pytest.mark.slow


def run(script: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / script), f"hydra.run.dir={out}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def sd3(pipeline: Path, cache: Path, steps: int = 2) -> list[str]:
    """A tiny SD 3 run: model=sd3's settings on the tiny pipeline (16 T5 tokens, native size), LoRA rank 4,
    batch 2, CPU, a CSV log per step."""
    return ["model=sd3", f"model.pretrained={pipeline}", "model.resolution=null", "model.family_options.max_sequence_length=16",
            "model.lora.rank=4", "model.lora.alpha=8", "data.num_workers=0", "data.batch_size=2", "data.val_fraction=0",
            f"data.cache_dir={cache}", "logger=csv", "trainer.accelerator=cpu", f"trainer.max_steps={steps}",
            "trainer.log_every_n_steps=1", "~callbacks.toy_report", "model.optimizer.lr=1e-2"]


def lora_written(out: Path) -> bool:
    return (out / "lora" / "final" / "pytorch_lora_weights.safetensors").is_file()


VALIDATION = ["callbacks=uas_validation", "callbacks.alignment_validation.every_n_steps=2",
              "callbacks.alignment_validation.images_per_prompt=1", "callbacks.alignment_validation.sampler.num_inference_steps=2",
              "+callbacks.alignment_validation.sampler.height=32", "+callbacks.alignment_validation.sampler.width=32"]


@pytest.mark.parametrize("objective, extra", [("sft", []), ("dpo", VALIDATION)], ids=["sft", "dpo-with-validation"])
def test_sft_and_dpo_on_sd3(objective, extra, tiny_sd3_dir, jsonl_pairs, tmp_path):
    out = tmp_path / "run"
    result = run("train.py", out, *sd3(tiny_sd3_dir, tmp_path / "cache"), "data=jsonl", f"data.path={jsonl_pairs}",
                 f"objective={objective}", "data.p_uncond=0.5", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics_rows(out)
    assert len([r for r in rows if r.get("train/loss")]) == 2
    assert lora_written(out) and not (out / "lora" / "final" / "lora_kohya.safetensors").exists()
    if extra:  # the UAS validation callback sampled with the SD 3 pipeline at step 2
        assert any(r.get("val/uas") for r in rows), sorted(rows[-1])
