"""model.optimizer: any torch optimizer class by _target_ (AdamW by default), refused with one line when bad."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_batch
from hydra import compose, initialize_config_dir

import workflows.cli  # noqa: F401 - registers the config schema and the ${repo:...} resolver
from alignment import DPO
from common.errors import InputError
from models.alignment_module import AlignmentModule
from models.optimizers import build_optimizer, check_optimizer, optimizer_class

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ADAFACTOR = {"_target_": "transformers.optimization.Adafactor", "lr": 1e-3, "scale_parameter": False,
             "relative_step": False, "warmup_init": False}


def optimizer_block(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="train", overrides=list(overrides)).model.optimizer


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def one_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    optimizer.zero_grad()
    net(x).pow(2).mean().backward()
    optimizer.step()


def test_shipped_block_and_a_block_without_target_make_the_adamw_step_of_before():
    """The step AlignmentModule took before _target_ existed: AdamW(lr, weight_decay, betas, eps) of sd15.yaml."""
    before = tiny_net()
    one_step(before, torch.optim.AdamW(before.parameters(), lr=1e-2, weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-8))
    old_style = {"lr": 1e-2, "weight_decay": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "fused": True}
    for spec in (optimizer_block("model=sd15", "model.optimizer.lr=1e-2"), old_style):
        net = tiny_net()
        optimizer = build_optimizer(net.parameters(), spec)
        assert type(optimizer) is torch.optim.AdamW
        assert optimizer.defaults["fused"] is None  # fused only on CUDA
        one_step(net, optimizer)
        for got, want in zip(net.parameters(), before.parameters()):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert not torch.allclose(next(tiny_net().parameters()), next(before.parameters()))  # the step moved them


def test_adafactor_trains_the_lora_of_the_alignment_module(tiny_components):
    module = AlignmentModule(tiny_components.unet, tiny_components.noise_scheduler, DPO(beta=5000.0),
                             lora={"rank": 4, "alpha": 4}, optimizer=ADAFACTOR)
    optimizer = module.configure_optimizers()["optimizer"]
    assert type(optimizer).__name__ == "Adafactor" and optimizer.defaults["relative_step"] is False
    start = {n: p.detach().clone() for n, p in module.trainable_parameters()}
    batch = random_batch(tiny_components)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = module.compute(batch, torch.Generator().manual_seed(3)).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # the same noise each step: the loss on it goes down
    moved = [n for n, p in module.trainable_parameters() if not torch.allclose(p, start[n])]
    assert len(moved) == len(start)


def test_the_shipped_block_switches_optimizer_by_target_alone():
    """betas/eps are null in sd15.yaml and `fused` is skipped where the class lacks it, so Adafactor needs only its own keys."""
    spec = optimizer_block("model=sd15", "model.optimizer._target_=transformers.optimization.Adafactor",
                           "+model.optimizer.scale_parameter=false", "+model.optimizer.relative_step=false",
                           "+model.optimizer.warmup_init=false")
    check_optimizer(spec)
    optimizer = build_optimizer(tiny_net().parameters(), spec)
    assert optimizer.defaults["lr"] == 1e-5 and optimizer.defaults["weight_decay"] == 1e-2


def test_bitsandbytes_adamw8bit_builds_when_installed():
    bnb = pytest.importorskip("bitsandbytes.optim")
    optimizer = build_optimizer(tiny_net().parameters(), {"_target_": "bitsandbytes.optim.AdamW8bit", "lr": 1e-4,
                                                          "weight_decay": 1e-2, "fused": True})
    assert isinstance(optimizer, bnb.AdamW8bit) and optimizer.defaults["lr"] == 1e-4


def test_bitsandbytes_missing_is_one_line_naming_the_key_and_the_install(monkeypatch):
    for name in [n for n in sys.modules if n == "bitsandbytes" or n.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when it is absent
    with pytest.raises(InputError) as error:
        check_optimizer({"_target_": "bitsandbytes.optim.AdamW8bit", "lr": 1e-4})
    message = str(error.value)
    assert "\n" not in message and message.startswith("model.optimizer._target_: bitsandbytes.optim.AdamW8bit")
    assert "pip install bitsandbytes" in message and ".[bnb]" in message


@pytest.mark.parametrize("target, says", [
    ("torch.optim.AdamQ", "torch.optim has no 'AdamQ'"),
    ("no_such_package.Optimizer", "cannot import no_such_package"),
    ("torch.nn.Linear", "torch.nn.Linear is not a torch.optim.Optimizer class"),
    ("torch.optim.lr_scheduler.StepLR", "is not a torch.optim.Optimizer class"),
    ("AdamW", "expected a dotted class path"),
])
def test_unknown_or_wrong_targets_are_refused_with_one_line(target, says):
    with pytest.raises(InputError, match="^model.optimizer._target_: ") as error:
        check_optimizer({"_target_": target, "lr": 1e-4})
    assert says in str(error.value) and "\n" not in str(error.value)


def test_arguments_the_class_does_not_take_or_refuses_are_one_line():
    with pytest.raises(InputError, match=r"torch.optim.AdamW takes no argument relative_step, scale_parameter \(set it to null"):
        check_optimizer({"lr": 1e-4, "scale_parameter": False, "relative_step": False})
    with pytest.raises(InputError, match="Adafactor refused its arguments .*relative_step=True"):
        check_optimizer({"_target_": "transformers.optimization.Adafactor", "lr": 1e-4})  # lr needs relative_step=false
    check_optimizer({**ADAFACTOR, "scale_parameter": None, "betas": None})  # null keys are left out


def test_optimizer_class_defaults_to_adamw():
    assert optimizer_class(None) is torch.optim.AdamW
    assert optimizer_class({"lr": 1.0}) is torch.optim.AdamW
    assert optimizer_class(copy.deepcopy(ADAFACTOR)).__name__ == "Adafactor"
