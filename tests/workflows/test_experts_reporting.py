"""SafetyDPO's and the method comparison's reporting, without training: the table when the evaluation
prompts lack the experts' categories, results on disk before any table, and a rerun that trains nothing."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import workflows.cli  # noqa: F401 - registers the config schema and the ${repo:...} resolver
import workflows.compare as comparison
import workflows.experts as safety_experts

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="train", overrides=list(overrides))


def row(ip: float, uas: float = 50.0, **per_category: float) -> dict[str, float]:
    """Metrics of an evaluation without safe rewrites (no faithfulness), as ``prompts=text`` gives."""
    return {"ip": ip, "benign_fidelity": 0.9, "uas": uas, **{f"ip/{c}": v for c, v in per_category.items()}}


def test_table_without_the_experts_categories_leaves_kept_out():
    results = {"base": row(0.9), "expert_hate": row(0.5), "expert_violence": row(0.6), "merged_co_merge": row(0.3)}
    lines = safety_experts.experts_table(results, ["hate", "violence"]).splitlines()
    assert lines[0] == "| model | harmful (all) | benign fidelity | faithfulness | uas |"
    assert lines[5] == "| merged_co_merge | 0.300 | 0.900 | - | 50.000 |"
    assert lines[-1].endswith("left out of kept: hate, violence")


def test_table_computes_kept_on_the_categories_evaluated():
    results = {"base": row(0.9, hate=1.0), "expert_hate": row(0.5, hate=0.2), "expert_violence": row(0.6, hate=1.0),
               "merged_co_merge": row(0.3, hate=0.36)}
    lines = safety_experts.experts_table(results, ["hate", "violence"]).splitlines()
    assert lines[0] == "| model | harmful hate | harmful (all) | benign fidelity | faithfulness | uas | kept |"
    kept = {line.split(" | ")[0].strip("| "): float(line.rsplit(" | ", 1)[1].strip(" |")) for line in lines[3:6]}
    # hate alone: (1 - 0.36) / (1 - 0.2) = 0.8
    assert kept == pytest.approx({"expert_hate": 1.0, "expert_violence": 0.0, "merged_co_merge": 0.8}, abs=1e-9)
    assert lines[-1].endswith("left out of kept: violence")


class FakeStages:
    """Training, merging and evaluation that write what the real stages write, and count their calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def fit_stage(self, sub) -> Path:
        final = Path(sub.output_dir) / "lora" / "final"
        final.mkdir(parents=True, exist_ok=True)
        (final / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
        self.calls.append(f"fit {Path(sub.output_dir).name}")
        return final

    def run_merge(self, sub) -> dict[str, float]:
        for method in sub.merge.method:
            out = Path(sub.output_dir) / "merged" / method
            out.mkdir(parents=True, exist_ok=True)
            (out / "pytorch_lora_weights.safetensors").write_bytes(b"merged")
            (out / "merge_report.json").write_text("{}")
            self.calls.append(f"merge {method}")
        return {}

    def evaluate(self, ecfg) -> dict[str, dict[str, float]]:
        name = Path(ecfg.output_dir).name
        metrics = {"base": row(0.9), "aligned": row(0.1 if name.startswith("merged") else 0.5)}
        Path(ecfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(ecfg.output_dir) / "metrics.json").write_text(json.dumps(metrics))
        self.calls.append(f"evaluate {name}")
        return metrics


def patch_stages(monkeypatch, fake: FakeStages) -> None:
    monkeypatch.setattr(safety_experts, "fit_stage", fake.fit_stage)
    monkeypatch.setattr(safety_experts, "run_merge", fake.run_merge)
    monkeypatch.setattr(safety_experts, "evaluate", fake.evaluate)
    monkeypatch.setattr(safety_experts, "evaluation_config",
                        lambda cfg, lora, output_dir: OmegaConf.create({"lora": str(lora), "output_dir": str(output_dir)}))


def test_experts_results_are_on_disk_before_the_table_and_a_rerun_trains_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = composed("task=experts", "objective=safetydpo", "experts=[hate,violence]", "merge.method=[co_merge,cat]",
                   f"output_dir={out}", "evaluation.overrides=['prompts=text']")
    names = ["expert_hate", "expert_violence", "merged_co_merge", "merged_cat"]
    first = FakeStages()
    patch_stages(monkeypatch, first)
    table = safety_experts.experts_table

    def failing_table(results, categories):
        assert json.loads((out / "comparison.json").read_text()) == results  # written before the table
        assert all((out / "eval" / name / "metrics.json").is_file() for name in names)
        raise RuntimeError("the table failed")

    monkeypatch.setattr(safety_experts, "experts_table", failing_table)
    with pytest.raises(RuntimeError, match="the table failed"):
        safety_experts.run_experts(cfg)
    assert first.calls == ["fit hate", "fit violence", "merge co_merge", "merge cat"] + [f"evaluate {n}" for n in names]
    assert sorted(json.loads((out / "comparison.json").read_text())) == sorted(["base", *names])

    again = FakeStages()
    patch_stages(monkeypatch, again)
    monkeypatch.setattr(safety_experts, "experts_table", table)
    metrics = safety_experts.run_experts(cfg)
    assert again.calls == []
    assert metrics["merged_cat/ip"] == pytest.approx(0.1)
    md = (out / "comparison.md").read_text()
    assert "| merged_cat | 0.100 |" in md and "kept" in md.splitlines()[-1] and "| kept |" not in md

    # an expert trained anew makes every merge and its evaluation stale; the other expert's stays
    (out / "experts" / "violence" / "lora" / "final" / "pytorch_lora_weights.safetensors").unlink()
    third = FakeStages()
    patch_stages(monkeypatch, third)
    safety_experts.run_experts(cfg)
    assert third.calls == ["fit violence", "merge co_merge", "merge cat", "evaluate expert_violence",
                           "evaluate merged_co_merge", "evaluate merged_cat"]


def test_comparison_runs_are_on_disk_before_the_table_and_metrics_left_out_are_skipped(tmp_path, monkeypatch):
    from PIL import Image

    out = tmp_path / "compare"
    cfg = composed("task=compare", "compare.objectives=[dpo,spo]", "compare.seeds=[0,1]", f"output_dir={out}")
    runs = {("dpo", 0): 0.2, ("dpo", 1): 0.4, ("spo", 0): 0.1, ("spo", 1): 0.3}
    monkeypatch.setattr(comparison, "fit_and_evaluate",
                        lambda cfg, o, s, path: {"base": row(0.9), "aligned": row(runs[o, s])})
    monkeypatch.setattr(comparison, "method_grid", lambda columns, per_category, benign: (Image.new("RGB", (4, 4)), []))

    def failing_table(done, base):
        assert sorted(json.loads((out / "comparison.json").read_text())) == ["base", "dpo/seed0", "dpo/seed1",
                                                                            "spo/seed0", "spo/seed1"]
        raise RuntimeError("the table failed")

    table = comparison.summary_table
    monkeypatch.setattr(comparison, "summary_table", failing_table)
    with pytest.raises(RuntimeError, match="the table failed"):
        comparison.run_comparison(cfg)
    monkeypatch.setattr(comparison, "summary_table", table)
    metrics = comparison.run_comparison(cfg)  # no faithfulness in the evaluation (no safe rewrites)
    assert metrics["dpo/ip"] == pytest.approx(0.3) and metrics["spo/ip"] == pytest.approx(0.2)
    assert "dpo/faithfulness" not in metrics and "| dpo | 2 | 0.300 ± 0.141 |" in (out / "comparison.md").read_text()
