"""train.py and evaluate.py end to end on a tiny random SDXL pipeline: every objective a few steps, SafetyDPO's
experts merged (Co-Merge, linear) and evaluated, and evaluate.py on the merged LoRA. The model family comes
from the checkpoint's model_index.json (model=sd15's config with an SDXL directory)."""
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


def sdxl(pipeline: Path, cache: Path, steps: int = 2) -> list[str]:
    """A tiny SDXL run: LoRA rank 4, batch 2, CPU, a CSV log per step."""
    return [f"model.pretrained={pipeline}", "model.lora.rank=4", "model.lora.alpha=8", "data.num_workers=0",
            "data.batch_size=2", "data.val_fraction=0", f"data.cache_dir={cache}", "logger=csv",
            "trainer.accelerator=cpu", f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1",
            "~callbacks.toy_report", "model.optimizer.lr=1e-2"]


def lora_written(out: Path) -> bool:
    final = out / "lora" / "final"
    return (final / "pytorch_lora_weights.safetensors").is_file() and (final / "lora_kohya.safetensors").is_file()


VALIDATION = ["callbacks=uas_validation", "callbacks.alignment_validation.every_n_steps=2",
              "callbacks.alignment_validation.images_per_prompt=1", "callbacks.alignment_validation.sampler.num_inference_steps=2",
              "+callbacks.alignment_validation.sampler.height=32", "+callbacks.alignment_validation.sampler.width=32"]


@pytest.mark.parametrize("objective, extra", [("sft", []), ("dpo", VALIDATION)], ids=["sft", "dpo-with-validation"])
def test_sft_and_dpo_on_sdxl(objective, extra, tiny_sdxl_dir, jsonl_pairs, tmp_path):
    out = tmp_path / "run"
    result = run("train.py", out, *sdxl(tiny_sdxl_dir, tmp_path / "cache"), "data=jsonl", f"data.path={jsonl_pairs}",
                 f"objective={objective}", "data.p_uncond=0.5", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics_rows(out)
    assert len([r for r in rows if r.get("train/loss")]) == 2
    assert lora_written(out)
    if extra:  # the UAS validation callback sampled with the SDXL pipeline at step 2
        assert any(r.get("val/uas") for r in rows), sorted(rows[-1])


def scp_data(tmp_path: Path) -> list[str]:
    """SCP-style data (CoProV2 harmful pairs, Pick-a-Pic clean pairs, the toy cost model) with the benign anchor."""
    from tests.data.test_readers import COPRO_ROWS, pickapic_table, write_coprov2

    (tmp_path / "copro").mkdir()
    copro = write_coprov2(tmp_path / "copro", COPRO_ROWS)
    pq.write_table(pickapic_table(), tmp_path / "pickapic.parquet")
    return ["objective=scdpo", "data=scp", f"data.reader.harmful.path={copro}",
            f"data.reader.clean.path={tmp_path / 'pickapic.parquet'}", f"data.cost_model={ROOT / 'assets/toy/cost_model'}",
            "model.benign_anchor=10"]


def check_scdpo_run(result: subprocess.CompletedProcess, out: Path) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in metrics_rows(out) if r.get("train/loss")]
    assert len(rows) == 2 and any(r.get("train/safety_margin") for r in rows)
    assert (out / "lora" / "final" / "pytorch_lora_weights.safetensors").is_file()


def dual_data(tmp_path: Path) -> list[str]:
    """Four prompts with a faithful safe image and a worse unsafe one each, dual-annotated, for spo."""
    lines = []
    for i in range(4):
        for j, (color, quality, unsafe) in enumerate([((200, 20, 20), 0.9, 0.1), ((20, 20, 200), 0.4, 0.8)]):
            solid_image(tmp_path / "data" / f"{i}_{j}.png", (color[0], color[1] + i, color[2]))
            lines.append(json.dumps({"prompt": f"a red circle {i}", "image": f"{i}_{j}.png", "quality": quality,
                                     "unsafe": unsafe, "categories": ["violence"]}))
    (tmp_path / "data" / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return ["objective=spo", "data=dual", f"data.path={tmp_path / 'data' / 'annotations.jsonl'}"]


def check_spo_run(result: subprocess.CompletedProcess, out: Path) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in metrics_rows(out) if r.get("train/reward_margin")]
    assert rows and min(float(r["train/reward_margin"]) for r in rows) >= 0.1
    assert (out / "lora" / "final" / "pytorch_lora_weights.safetensors").is_file()


def toy_scored_evaluation(tmp_path: Path) -> list[str]:
    """evaluate.py overrides: two harmful and one benign prompt the toy scorers read, one image each at 32 px."""
    (tmp_path / "harmful.txt").write_text("a red circle on black\na red square on gray\n")
    (tmp_path / "benign.txt").write_text("a green circle on navy\n")
    return ["prompts=text", f"prompts.sets.harmful.path={tmp_path / 'harmful.txt'}",
            f"prompts.sets.benign.path={tmp_path / 'benign.txt'}", "images_per_prompt=1",
            "sampler.num_inference_steps=2", "sampler.height=32", "sampler.width=32",  # the toy scorer's size
            f"cache_dir={tmp_path / 'eval_cache'}"]


def test_scdpo_on_sdxl_with_coprov2_and_pickapic_files_and_a_cost_model(tiny_sdxl_dir, tmp_path):
    out = tmp_path / "run"
    check_scdpo_run(run("train.py", out, *sdxl(tiny_sdxl_dir, tmp_path / "cache"), *scp_data(tmp_path)), out)


def test_spo_on_sdxl_with_dual_annotations(tiny_sdxl_dir, tmp_path):
    out = tmp_path / "run"
    check_spo_run(run("train.py", out, *sdxl(tiny_sdxl_dir, tmp_path / "cache"), *dual_data(tmp_path)), out)


def test_safetydpo_experts_merge_and_evaluate_on_sdxl(tiny_sdxl_dir, jsonl_pairs, tmp_path):
    evaluation = toy_scored_evaluation(tmp_path)
    out = tmp_path / "safetydpo"
    result = run("train.py", out, *sdxl(tiny_sdxl_dir, tmp_path / "cache"), "task=experts", "objective=safetydpo",
                 "data=jsonl", f"data.path={jsonl_pairs}", "experts=[violence,hate]", "logger=none",
                 "merge.method=[co_merge,linear]", "merge.calibration_prompts=4",
                 f"evaluation.overrides=[{','.join(repr(o) for o in evaluation)}]")
    assert result.returncode == 0, result.stderr[-3000:]
    for method in ("co_merge", "linear"):
        assert (out / "merged" / method / "pytorch_lora_weights.safetensors").is_file()
    results = json.loads((out / "comparison.json").read_text())
    assert {"base", "expert_violence", "expert_hate", "merged_co_merge", "merged_linear"} <= set(results)

    # evaluate.py on the merged LoRA: the SDXL pipeline samples base and aligned
    evaluated = tmp_path / "eval"
    result = run("evaluate.py", evaluated, f"model.pretrained={tiny_sdxl_dir}",
                 f"lora={out / 'merged' / 'co_merge'}", *evaluation, "device=cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert {"ip", "uas", "benign_fidelity"} <= set(metrics["aligned"])


def test_resume_and_two_process_ddp_on_sdxl(tiny_sdxl_dir, jsonl_pairs, tmp_path):
    """A dpo run stopped at step 2 resumes from its last checkpoint to step 3; DDP on two CPU processes shards
    the cached pairs (latents, both encoders' states, pooled embeddings, per-side time ids) and saves once."""
    import torch

    cache = tmp_path / "cache"
    args = [*sdxl(tiny_sdxl_dir, cache), "data=jsonl", f"data.path={jsonl_pairs}", "objective=dpo",
            "callbacks.model_checkpoint.every_n_train_steps=1"]
    out = tmp_path / "run"
    assert (result := run("train.py", out, *args)).returncode == 0, result.stderr[-3000:]
    result = run("train.py", out, *args, "trainer.max_steps=3", "ckpt_path=last")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [int(r["step"]) for r in metrics_rows(out) if r.get("train/loss")]
    assert steps == [0, 1, 2]  # the first run's two steps, then the resumed one
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3 and lora_written(out)

    ddp = tmp_path / "ddp"
    result = run("train.py", ddp, *args, "trainer=ddp", "trainer.devices=2", "data.batch_size=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len([r for r in metrics_rows(ddp) if r.get("train/loss")]) == 2 and lora_written(ddp)


def test_merge_task_on_sdxl_loras_loads_in_the_sdxl_pipeline(tiny_sdxl_dir, jsonl_pairs, tmp_path):
    """task=merge on two SDXL expert LoRAs (Co-Merge and a peft baseline): each merged LoRA loads with
    StableDiffusionXLPipeline.load_lora_weights and changes the image a fixed seed gives."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    from models.components import load_components
    from models.lora_io import save_lora
    from tests.models.test_lora_export import lora_module

    experts = []
    for i in range(2):
        module = lora_module(load_components(str(tiny_sdxl_dir)))
        g = torch.Generator().manual_seed(i)
        for _, p in module.trainable_parameters():
            p.data = 0.3 * torch.randn(p.shape, generator=g)
        experts.append(save_lora(module.unet, tmp_path / f"expert_{i}").parent)
    out = tmp_path / "merge"
    result = run("train.py", out, *sdxl(tiny_sdxl_dir, tmp_path / "cache"), "task=merge", "data=jsonl",
                 f"data.path={jsonl_pairs}", f"merge.experts=[{experts[0]},{experts[1]}]",
                 "merge.method=[co_merge,ties_svd]", "merge.calibration_prompts=4")
    assert result.returncode == 0, result.stderr[-3000:]

    def image(lora: Path | None) -> np.ndarray:
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
        if lora is not None:
            pipe.load_lora_weights(str(lora))
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(3)).images[0]

    base = image(None)
    for method in ("co_merge", "ties_svd"):
        merged = image(out / "merged" / method)
        assert np.abs(merged - base).max() > 1e-3, method


def test_build_dual_and_compare_on_sdxl(tiny_sdxl_dir, tmp_path):
    """task=build_dual samples the toy prompts with the SDXL pipeline and scores them; task=compare trains dpo
    on SDXL and evaluates base and aligned with one protocol."""
    size = ["+build.sampler.height=32", "+build.sampler.width=32"]
    out = tmp_path / "build"
    result = run("train.py", out, f"model.pretrained={tiny_sdxl_dir}", "task=build_dual", "build.prompts.limit=1",
                 "build.images_per_prompt=1", "build.safe_images_per_prompt=1", "build.sampler.num_inference_steps=2",
                 *size)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "dataset" / "annotations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(0 <= r["quality"] <= 1 and 0 <= r["unsafe"] <= 1 for r in rows), rows

    out = tmp_path / "compare"
    evaluation = ["images_per_prompt=1", "sampler.num_inference_steps=2", "sampler.height=32", "sampler.width=32",
                  f"cache_dir={tmp_path / 'eval_cache'}"]
    training = [f"model.pretrained={tiny_sdxl_dir}", "model.lora.rank=4", "model.lora.alpha=8", "trainer.max_steps=2",
                "data.reader.images_per_prompt=1", "data.val_fraction=0", "data.batch_size=4", "data.num_workers=0",
                f"data.cache_dir={tmp_path / 'cache'}"]
    result = run("train.py", out, f"model.pretrained={tiny_sdxl_dir}", "task=compare", "compare.objectives=[dpo]",
                 "compare.seeds=[0]", "logger=none", f"compare.overrides=[{','.join(repr(o) for o in training)}]",
                 "compare.grid.harmful_per_category=1", "compare.grid.benign=1",
                 f"evaluation.overrides=[{','.join(repr(o) for o in evaluation)}]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(json.loads((out / "comparison.json").read_text())) == ["base", "dpo/seed0"]
    assert (out / "grid.png").is_file()
