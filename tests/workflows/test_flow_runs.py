"""train.py and evaluate.py end to end on tiny random rectified-flow pipelines, SD 3 (MMDiT, CLIP x 2 + T5) and
FLUX (packed latents, CLIP pooled + T5, guidance embedding): every objective a few steps, SafetyDPO's experts merged
(Co-Merge and a peft baseline) and evaluated, task=merge, and evaluate.py on a merged LoRA. The family comes from
the checkpoint's model_index.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.workflows.test_sdxl_runs import (
    VALIDATION,
    check_scdpo_run,
    check_spo_run,
    dual_data,
    run,
    scp_data,
    toy_scored_evaluation,
)
from tests.workflows.test_train_integration import metrics_rows

pytestmark = pytest.mark.slow


FAMILIES = {"sd3": "model=sd3", "flux": "model=flux_dev"}


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture()
def pipeline_dir(family, request) -> Path:
    return request.getfixturevalue(f"tiny_{family}_dir")


def model(family: str, pipeline: Path) -> list[str]:
    """The family's model config on its tiny pipeline: 16 T5 tokens, 16 px (8 x 8 latents)."""
    return [FAMILIES[family], f"model.pretrained={pipeline}", "model.resolution=16",
            "model.family_options.max_sequence_length=16"]


def flow(family: str, pipeline: Path, cache: Path, steps: int = 2) -> list[str]:
    """A tiny run: the family's model settings, LoRA rank 4, batch 2, CPU, a CSV log per step."""
    return [*model(family, pipeline), "model.lora.rank=4", "model.lora.alpha=8", "data.num_workers=0", "data.batch_size=2", "data.val_fraction=0",
            f"data.cache_dir={cache}", "logger=csv", "trainer.accelerator=cpu", f"trainer.max_steps={steps}",
            "trainer.log_every_n_steps=1", "~callbacks.toy_report", "model.optimizer.lr=1e-2"]


def lora_written(out: Path) -> bool:
    return (out / "lora" / "final" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("objective, extra", [("sft", []), ("dpo", VALIDATION)], ids=["sft", "dpo-with-validation"])
def test_sft_and_dpo(family, pipeline_dir, objective, extra, jsonl_pairs, tmp_path):
    if objective == "sft" and family == "sd3":
        pytest.skip("sft runs on the FLUX pipeline; SD 3 runs the other objectives")
    out = tmp_path / "run"
    result = run("train.py", out, *flow(family, pipeline_dir, tmp_path / "cache"), "data=jsonl", f"data.path={jsonl_pairs}",
                 f"objective={objective}", "data.p_uncond=0.5", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics_rows(out)
    assert len([r for r in rows if r.get("train/loss")]) == 2
    assert lora_written(out) and not (out / "lora" / "final" / "lora_kohya.safetensors").exists()
    if extra:  # the UAS validation callback sampled with the family's pipeline at step 2
        assert any(r.get("val/uas") for r in rows), sorted(rows[-1])


@pytest.mark.parametrize("family", ["sd3"], indirect=True)  # objectives see errors only: one flow family each
def test_scdpo_with_coprov2_and_pickapic_files_and_a_cost_model(family, pipeline_dir, tmp_path):
    out = tmp_path / "run"
    check_scdpo_run(run("train.py", out, *flow(family, pipeline_dir, tmp_path / "cache"), *scp_data(tmp_path)), out)


@pytest.mark.parametrize("family", ["flux"], indirect=True)
def test_spo_with_dual_annotations(family, pipeline_dir, tmp_path):
    out = tmp_path / "run"
    check_spo_run(run("train.py", out, *flow(family, pipeline_dir, tmp_path / "cache"), *dual_data(tmp_path)), out)


@pytest.mark.parametrize("family", ["flux"], indirect=True)  # the transformer LoRA path is one for both families
def test_safetydpo_experts_merge_and_evaluate(family, pipeline_dir, jsonl_pairs, tmp_path):
    """Experts per category, Co-Merge and peft's ties_svd on transformer LoRAs, each evaluated; then task=merge on
    the experts and evaluate.py on its Co-Merge LoRA, sampled by the family's pipeline."""
    evaluation = toy_scored_evaluation(tmp_path)
    out = tmp_path / "safetydpo"
    result = run("train.py", out, *flow(family, pipeline_dir, tmp_path / "cache"), "task=experts", "objective=safetydpo",
                 "data=jsonl", f"data.path={jsonl_pairs}", "experts=[violence,hate]", "logger=none",
                 "merge.method=[co_merge,ties_svd]", "merge.calibration_prompts=4",
                 f"evaluation.overrides=[{','.join(repr(o) for o in evaluation)}]")
    assert result.returncode == 0, result.stderr[-3000:]
    for method in ("co_merge", "ties_svd"):
        assert (out / "merged" / method / "pytorch_lora_weights.safetensors").is_file()
    results = json.loads((out / "comparison.json").read_text())
    assert {"base", "expert_violence", "expert_hate", "merged_co_merge", "merged_ties_svd"} <= set(results)

    experts = sorted(str(p.parent) for p in out.glob("experts/*/lora/final/pytorch_lora_weights.safetensors"))
    assert len(experts) == 2, list(out.rglob("pytorch_lora_weights.safetensors"))
    merged = tmp_path / "merge"
    result = run("train.py", merged, *flow(family, pipeline_dir, tmp_path / "cache"), "task=merge", "data=jsonl",
                 f"data.path={jsonl_pairs}", f"merge.experts=[{','.join(experts)}]", "merge.method=co_merge",
                 "merge.calibration_prompts=4")
    assert result.returncode == 0, result.stderr[-3000:]

    evaluated = tmp_path / "eval"
    result = run("evaluate.py", evaluated, *model(family, pipeline_dir), f"lora={merged / 'merged' / 'co_merge'}",
                 *evaluation, "device=cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert {"ip", "uas", "benign_fidelity"} <= set(metrics["aligned"])
    assert metrics["aligned"] != metrics["base"]
