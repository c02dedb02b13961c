"""train.py end to end on a tiny random SD pipeline saved in diffusers layout."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_train(out: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={out}", *overrides]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    return result


def common(pipeline: Path, jsonl: Path, cache: Path, steps: int) -> list[str]:
    return [
        f"model.pretrained={pipeline}", "model.lora.rank=4", "model.lora.alpha=8",
        "data=jsonl", f"data.path={jsonl}", f"data.cache_dir={cache}", "data.num_workers=0", "data.batch_size=4",
        "data.val_fraction=0.25", "logger=csv", "trainer.accelerator=cpu", f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=1", "model.optimizer.lr=1e-2",
    ]


def metrics_rows(out: Path) -> list[dict]:
    with open(out / "csv" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def generate(pipe, seed=0):
    return pipe("a red circle", num_inference_steps=2, height=16, width=16, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


def test_dpo_run_writes_a_lora_that_diffusers_loads(tiny_pipeline_dir, jsonl_pairs, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    result = run_train(out, *common(tiny_pipeline_dir, jsonl_pairs, tmp_path / "cache", steps=3), "objective=dpo")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics_rows(out)
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/loss", "train/implicit_acc", "train/margin", "train/mse_w", "train/mse_l", "train/ref_mse",
            "val/loss"} <= logged
    lora_file = out / "lora" / "final" / "pytorch_lora_weights.safetensors"
    assert lora_file.is_file() and (out / "lora" / "step_000003" / lora_file.name).is_file()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None, requires_safety_checker=False)
    before = generate(pipe)
    pipe.load_lora_weights(str(lora_file.parent))
    after = generate(pipe)
    assert abs(after - before).max() > 1e-3

    # The loaded LoRA is exactly the trained one (same scale alpha/rank): compare UNet outputs with the module
    # rebuilt from the checkpoint.
    from alignment import DPO
    from models.alignment_module import AlignmentModule
    from models.components import load_components

    comps = load_components(str(tiny_pipeline_dir))
    module = AlignmentModule(comps.unet, comps.noise_scheduler, DPO(), lora={"rank": 4, "alpha": 8})
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    module.load_state_dict(state, strict=False)
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        ours = module.unet(z, t, encoder_hidden_states=c).sample
        theirs = pipe.unet(z, t, encoder_hidden_states=c).sample
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_sft_run_and_resume_continues_at_saved_step(tiny_pipeline_dir, jsonl_pairs, tmp_path):
    first = tmp_path / "first"
    args = common(tiny_pipeline_dir, jsonl_pairs, tmp_path / "cache", steps=2)
    result = run_train(first, *args, "objective=sft")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train/ref_mse" not in metrics_rows(first)[0]  # sft runs no reference pass
    ckpt = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 2

    second = tmp_path / "second"
    result = run_train(second, *args, "objective=sft", "trainer.max_steps=4", f"ckpt_path={first}/checkpoints/last.ckpt")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [int(r["step"]) for r in metrics_rows(second) if r.get("train/loss")]
    assert min(steps) >= 2 and max(steps) == 3
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_objective_from_outside_the_repo_plugs_in_by_target(tiny_pipeline_dir, jsonl_pairs, tmp_path):
    plugin = tmp_path / "plugin"
    (plugin / "configs" / "objective").mkdir(parents=True)
    (plugin / "winner_only.py").write_text(
        "import torch\n"
        "from alignment.base import Objective, ObjectiveOutput\n\n"
        "class WinnerOnly(Objective):\n"
        "    uses_losers = False\n"
        "    uses_reference = False\n\n"
        "    def __init__(self, scale: float):\n"
        "        self.scale = scale\n\n"
        "    def loss(self, errors, meta):\n"
        "        return ObjectiveOutput(self.scale * errors.policy_w.mean(), {'scale': torch.tensor(self.scale)})\n"
    )
    (plugin / "configs" / "objective" / "winner_only.yaml").write_text("_target_: winner_only.WinnerOnly\nscale: 3.0\n")
    out = tmp_path / "run"
    result = run_train(out, *common(tiny_pipeline_dir, jsonl_pairs, tmp_path / "cache", steps=1),
                       f"hydra.searchpath=[file://{plugin}/configs]", "objective=winner_only",
                       env={"PYTHONPATH": str(plugin)})
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(r for r in metrics_rows(out) if r.get("train/loss"))
    assert float(row["train/scale"]) == 3.0
    assert float(row["train/loss"]) == pytest.approx(3.0 * float(row["train/mse_w"]), rel=1e-5)


def test_unknown_objective_is_one_short_line():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "objective=nope"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: unknown objective 'nope'; available: dpo, safetydpo, scdpo, sft, spo"
    assert "Traceback" not in result.stdout + result.stderr


def test_missing_data_path_is_one_line(tmp_path):
    result = run_train(tmp_path / "run", "data=coprov2", "logger=csv")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config key data.path must be set (e.g. data.path=...); unset: data.path")
    assert "Traceback" not in result.stderr


def test_scdpo_out_of_the_box_gets_costs_and_cost_model_task_saves(tmp_path):
    out = tmp_path / "scdpo"
    result = run_train(out, "objective=scdpo", "logger=csv", "trainer.max_steps=6", "trainer.log_every_n_steps=1",
                       "data.batch_size=8", "data.reader.images_per_prompt=1", "~callbacks.toy_report",
                       f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in metrics_rows(out) if r.get("train/safety_margin")]
    assert rows, "scdpo logged no safety margin"
    # toy safety pairs: the loser costs more than the winner, so the margin is positive on average
    assert max(float(r["train/safety_margin"]) for r in rows) > 0
    assert list(tmp_path.glob("cache/costs_*.safetensors"))

    out = tmp_path / "cost"
    result = run_train(out, "task=cost_model", "logger=csv", "trainer.max_steps=30", "data.reader.images_per_prompt=2",
                       f"data.cache_dir={tmp_path / 'cache'}", "trainer.check_val_every_n_epoch=1")
    assert result.returncode == 0, result.stderr[-3000:]
    from models.cost_model import SafetyCostModel

    model = SafetyCostModel.load(out / "cost_model")
    assert model.adapter.feature_dim == 64
    assert any(r.get("val/auroc") for r in metrics_rows(out))


def test_scdpo_on_coprov2_and_pickapic_files_with_a_cost_model_and_benign_anchor(tiny_pipeline_dir, tmp_path):
    import pyarrow.parquet as pq

    from tests.data.test_readers import COPRO_ROWS, pickapic_table, write_coprov2

    (tmp_path / "copro").mkdir()
    copro = write_coprov2(tmp_path / "copro", COPRO_ROWS)
    pq.write_table(pickapic_table(), tmp_path / "pickapic.parquet")
    out = tmp_path / "run"
    result = run_train(
        out, "objective=scdpo", "data=scp", f"data.reader.harmful.path={copro}",
        f"data.reader.clean.path={tmp_path / 'pickapic.parquet'}", f"data.cost_model={ROOT / 'assets/toy/cost_model'}",
        f"model.pretrained={tiny_pipeline_dir}", "model.benign_anchor=10", "data.batch_size=4", "data.val_fraction=0",
        f"data.cache_dir={tmp_path / 'cache'}", "logger=csv", "trainer.max_steps=4", "trainer.log_every_n_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in metrics_rows(out) if r.get("train/loss")]
    assert len(rows) == 4
    # 2 CoProV2 pairs + 2 Pick-a-Pic pairs at harmful_fraction 0.5: every batch holds both kinds, so the
    # safety margin (costs of the CoProV2 images) and the drift on the clean pairs are both logged
    assert all(r.get("train/safety_margin") and r.get("train/benign_drift") for r in rows)
    assert any(float(r["train/benign_drift"]) > 0 for r in rows[1:])  # the LoRA moved after the first step
    assert (out / "lora" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_safetydpo_trains_one_expert_per_category_merges_and_compares(tmp_path):
    import json

    from safetensors.torch import load_file

    out = tmp_path / "safetydpo"
    result = run_train(out, "task=experts", "objective=safetydpo", "experts=[violence,hate]", "all_single=true",
                       "logger=none", "trainer.max_steps=2", "data.batch_size=4", "data.reader.images_per_prompt=1",
                       "data.val_fraction=0", f"data.cache_dir={tmp_path / 'cache'}", "merge.method=[co_merge,svd]",
                       "merge.calibration_prompts=8",
                       f"evaluation.overrides=['images_per_prompt=1','cache_dir={tmp_path / 'eval_cache'}']")
    assert result.returncode == 0, result.stderr[-3000:]
    # the recipe holds each expert on every pair outside its category: own pairs plus anchors are all the pairs
    counts = [(int(a), int(b)) for a, b in re.findall(r"data: (\d+) train pairs, 0 val pairs, (\d+) anchor pairs",
                                                       (out / "train.log").read_text())]
    (own_v, anchors_v), (own_h, anchors_h) = counts[:2]
    assert anchors_v > 0 and anchors_h > 0 and own_v + anchors_v == own_h + anchors_h
    experts = {c: load_file(out / "experts" / c / "lora" / "final" / "pytorch_lora_weights.safetensors")
               for c in ("violence", "hate")}
    # same seed and initialization, different category's pairs: the experts differ
    assert experts["violence"].keys() == experts["hate"].keys()
    assert any(not torch.equal(experts["violence"][k], experts["hate"][k]) for k in experts["hate"])
    ckpt = torch.load(out / "all_single" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 4  # all-single: as many steps as the two experts together
    report = json.loads((out / "merged" / "co_merge" / "merge_report.json").read_text())
    assert report["experts"] == [str(out / "experts" / c / "lora" / "final") for c in ("violence", "hate")]
    results = json.loads((out / "comparison.json").read_text())
    assert list(results) == ["base", "expert_violence", "expert_hate", "all_single", "merged_co_merge", "merged_svd"]
    assert all({"ip/violence", "ip/hate", "uas", "benign_fidelity"} <= set(r) for r in results.values())
    table = (out / "comparison.md").read_text()
    assert table.startswith("| model | harmful violence | harmful hate |") and "| merged_co_merge |" in table


def test_spo_out_of_the_box_and_build_dual_task(tmp_path):
    out = tmp_path / "spo"
    result = run_train(out, "objective=spo", "logger=csv", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
                       "data.batch_size=8", "data.reader.images_per_prompt=1", "~callbacks.toy_report",
                       f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in metrics_rows(out) if r.get("train/reward_margin")]
    # every toy dual pair is ordered by at least delta, so the reward margin is at least 0.1
    assert rows and min(float(r["train/reward_margin"]) for r in rows) >= 0.1
    assert (out / "lora" / "final" / "pytorch_lora_weights.safetensors").is_file()

    out = tmp_path / "build"
    result = run_train(out, "task=build_dual", "build.prompts.limit=1", "build.images_per_prompt=2",
                       "build.sampler.num_inference_steps=4", "logger=none")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (out / "dataset" / "annotations.jsonl").read_text().splitlines()
    assert len(lines) == 2 + 2 + 2  # one harmful prompt (2 + 2 safe-rewrite images), one benign prompt
    assert "dual-annotated set: 2 prompts, 6 images" in result.stdout
    # the built set trains as it is: data=dual reads it, pairs it and spo runs on it
    result = run_train(tmp_path / "spo_on_built", "objective=spo", "data=dual", f"data.path={out / 'dataset'}",
                       "data.reader.delta=0.0", "logger=csv", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
                       "data.batch_size=2", "data.val_fraction=0", "data.num_workers=0", "~callbacks.toy_report",
                       f"data.cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r for r in metrics_rows(tmp_path / "spo_on_built") if r.get("train/reward_margin")]


def test_method_comparison_over_objectives_and_seeds_resumes(tmp_path):
    import json

    from PIL import Image

    out = tmp_path / "compare"
    args = ["task=compare", "compare.objectives=[dpo,spo]", "compare.seeds=[0,1]", "logger=csv",
            "compare.overrides=['trainer.max_steps=2','data.reader.images_per_prompt=1','data.val_fraction=0']",
            f"data.cache_dir={tmp_path / 'cache'}", "compare.grid.harmful_per_category=1", "compare.grid.benign=2",
            f"evaluation.overrides=['images_per_prompt=1','sampler.num_inference_steps=2','cache_dir={tmp_path / 'eval_cache'}']"]
    result = run_train(out, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((out / "comparison.json").read_text())
    assert sorted(runs) == ["base", "dpo/seed0", "dpo/seed1", "spo/seed0", "spo/seed1"]
    # different seeds train different LoRAs
    assert runs["dpo/seed0"] != runs["dpo/seed1"]
    table = (out / "comparison.md").read_text()
    assert "| dpo | 2 |" in table and "| spo | 2 |" in table and "±" in table
    grid = Image.open(out / "grid.png")
    # base, dpo, spo (titled), one harmful prompt per category and two benign (labelled with their prompts)
    assert grid.size == (220 + 3 * 96, 18 + (3 + 2) * 96)
    # a second call finds every run evaluated and trains nothing
    again = run_train(out, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already evaluated") + again.stdout.count("already evaluated") == 4
