"""Objective groups that choose their data group: the default works, and a data group given wins."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import workflows.cli  # noqa: F401 - registers the config schema and the ${repo:...} resolver
from common.errors import InputError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("objective, kind", [("scdpo", "scp"), ("spo", "dual"), ("dpo", "pairs")])
def test_objective_picks_its_toy_data(objective, kind):
    cfg = composed(f"objective={objective}")
    assert cfg.data.reader.kind == kind
    assert cfg.data.batch_size == 32  # the toy recipe applied on top
    if objective == "scdpo":
        assert Path(OmegaConf.select(cfg, "data.cost_model")).name == "cost_model"


@pytest.mark.parametrize("objective, data, reader", [("scdpo", "scp", "MixedReader"), ("spo", "dual", "DualAnnotatedReader")])
def test_a_data_group_given_wins_over_the_objectives_choice(objective, data, reader):
    cfg = composed(f"objective={objective}", f"data={data}")
    assert cfg.data.reader._target_.endswith(reader)
    assert "kind" not in cfg.data.reader
    assert cfg.objective._target_.endswith(objective.upper())


@pytest.mark.parametrize("override, expected", [(None, "co_merge"), ("merge_method=ties_svd", "ties_svd"),
                                                ("merge.method=cat", "cat")])
def test_merge_method_takes_either_spelling(override, expected):
    cfg = composed("task=merge", *([override] if override else []))
    assert cfg.merge.method == expected


def test_safetydpo_recipe_anchors_its_experts_and_refuses_anchors_without_a_weight():
    from workflows.align import build_alignment

    cfg = composed("objective=safetydpo")
    assert cfg.data.anchor_others is True and cfg.model.benign_anchor > 0
    with pytest.raises(InputError, match="data.anchor_others: needs model.benign_anchor > 0"):
        build_alignment(composed("objective=safetydpo", "model.benign_anchor=0"))


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    cfg = composed(f"experiment={experiment}")
    assert cfg.model.pretrained and cfg.trainer.max_steps != 0


def test_the_gpu_experiment_uses_the_benchmarks_fastest_settings():
    cfg = composed("experiment=dpo_pickapic_sd15")
    assert (cfg.model.frozen_dtype, cfg.model.channels_last, cfg.model.compile) == ("bfloat16", True, True)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.benchmark
