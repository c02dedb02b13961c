"""How train.yaml composes: every objective config is one class and its parameters; the data an objective needs
is train.yaml's default for it and a data group given wins; the task is chosen on the command line (SafetyDPO's
experts: task=experts objective=safetydpo); recipes apply to their (task, model, objective)."""
import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import OmegaConf

import workflows.cli  # noqa: F401 - registers the config schema and the ${repo:...} resolver
from common.errors import InputError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


OBJECTIVES = sorted(p.stem for p in (CONFIGS / "objective").glob("*.yaml"))


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_objective_config_is_one_objective_class_and_its_parameters(name):
    """A new objective is one class and one such YAML: group-level (no @package header), no defaults list (so no
    override of another group), `_target_` an alignment.* Objective class and the rest its constructor's arguments."""
    from alignment.base import Objective
    from workflows.config_checks import objective_task

    path = CONFIGS / "objective" / f"{name}.yaml"
    assert "@package" not in path.read_text(), f"{path}: objective configs are group-level"
    raw = OmegaConf.load(path)
    assert "defaults" not in raw, f"{path}: an objective config chooses no other group"
    cls = get_class(raw._target_)
    assert raw._target_.startswith("alignment.") and issubclass(cls, Objective)
    parameters = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert set(raw) - {"_target_"} <= parameters, f"{path}: not arguments of {raw._target_}"

    # composed, it changes no group but through train.yaml (its data default, its recipe) and the task it is given
    task = objective_task(name)
    default, cfg = composed(), composed(f"task={task}", f"objective={name}")
    assert cfg.objective._target_ == raw._target_ and cfg.task.name == task
    changed = {g for g, c in cfg.hydra.runtime.choices.items() if default.hydra.runtime.choices.get(g) != c}
    assert changed <= {"objective", "recipe", "data"} | ({"task"} if task != "align" else set())


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

    cfg = composed("task=experts", "objective=safetydpo")
    assert cfg.task.name == "experts" and cfg.hydra.runtime.choices.recipe == "experts/toy_safetydpo"
    assert cfg.data.anchor_others is True and cfg.model.benign_anchor > 0
    assert cfg.model.lora.rank == 4 and cfg.objective.sft_weight == 10  # the toy dpo recipe under it
    with pytest.raises(InputError, match="data.anchor_others: needs model.benign_anchor > 0"):
        build_alignment(composed("task=experts", "objective=safetydpo", "model.benign_anchor=0"))


def test_objective_safetydpo_under_task_align_is_refused_with_what_to_write(monkeypatch, tmp_path):
    from workflows.config_checks import check_train_config

    cfg = composed("objective=safetydpo", f"output_dir={tmp_path}")
    assert cfg.task.name == "align"  # the objective chooses no task
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(InputError, match=r"^objective=safetydpo runs under task=experts, not task=align \(one fit\): "
                                         r"write task=experts objective=safetydpo, or objective=dpo for one LoRA$"):
        check_train_config(cfg)


def test_compare_runs_each_objective_under_its_task():
    from workflows.compare import run_config

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=["experiment=toy_method_compare"])
        safetydpo = run_config(cfg, "safetydpo", 1, Path("/tmp/unused"))
        spo = run_config(cfg, "spo", 1, Path("/tmp/unused"))
    assert safetydpo.task.name == "experts" and safetydpo.model.benign_anchor == 100
    assert safetydpo.trainer.max_steps == 167 and safetydpo.seed == 1  # the experiment's per_objective
    assert spo.task.name == "align" and spo.data.reader.kind == "dual" and spo.objective.alpha == 30


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(CONFIGS / "recipe").with_suffix(""))
                                          for p in (CONFIGS / "recipe").glob("*/*.yaml")))
def test_every_recipe_applies_to_its_task_model_and_objective(recipe):
    task, _, rest = recipe.partition("/")
    model, _, objective = rest.rpartition("_")  # model names may hold "_" (toy_flow), objective names do not
    cfg = composed(f"task={task}", f"model={model}", f"objective={objective}")
    assert cfg.hydra.runtime.choices.recipe == recipe
    if model == "toy":  # configs/recipe/toy.yaml under every toy recipe
        assert list(cfg.model.lora.target_modules) == ["attn2.to_k", "attn2.to_v"] and cfg.trainer.max_steps == 500
    if model == "toy_flow":  # configs/recipe/toy_flow.yaml: the toy schedule, the MMDiT's text-stream keys and values
        assert list(cfg.model.lora.target_modules) == ["add_k_proj", "add_v_proj"] and cfg.trainer.max_steps == 500


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    cfg = composed(f"experiment={experiment}")
    assert cfg.model.pretrained and cfg.trainer.max_steps != 0


def test_the_gpu_experiment_uses_the_benchmarks_fastest_settings():
    cfg = composed("experiment=dpo_pickapic_sd15")
    # compile stays off: its gradients do not match the plain step's (tests/models/test_speed_options.py)
    assert (cfg.model.frozen_dtype, cfg.model.channels_last, cfg.model.compile) == ("bfloat16", True, False)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.benchmark
