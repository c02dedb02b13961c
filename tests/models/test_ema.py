"""The EMA callback: once per optimizer step, the diffusers recurrence, exact resume, and what the exports hold."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from tests.models.test_lora_export import checkpoint_every_step, fit, lora_module


class StepRecorder(L.Callback):
    """Snapshots of the trainable weights at fit start and after every ``optimizer.step`` (torch's own hook,
    independent of Lightning's step counting)."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer, module) -> None:
        def snapshot() -> dict[str, torch.Tensor]:
            return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

        self.start = snapshot()
        trainer.optimizers[0].register_step_post_hook(lambda *_: self.steps.append(snapshot()))


def expected_average(recorder: StepRecorder, decay: float, warmup: bool) -> dict[str, torch.Tensor]:
    """The EMA written out: ema <- ema + (1 - d_n) (w_n - ema), d_n = min(decay, (1 + n) / (10 + n)), d_0 = 0."""
    ema = {n: t.clone() for n, t in recorder.start.items()}
    for n, weights in enumerate(recorder.steps):
        d = (0.0 if n == 0 else min(decay, (1 + n) / (10 + n))) if warmup else decay
        ema = {k: e + (1 - d) * (weights[k] - e) for k, e in ema.items()}
    return ema


def test_ema_updates_once_per_optimizer_step_and_the_lora_export_holds_it(tiny_components, tmp_path):
    from models.ema import EMACallback
    from models.lora_export import LoraExportCallback
    from models.lora_io import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME

    module = lora_module(tiny_components)
    ema, recorder = EMACallback(decay=0.2), StepRecorder()  # d_1 = 2/11 < 0.2 < d_2 = 3/12: both branches of min
    fit(module, tiny_components, tmp_path, [recorder, ema, LoraExportCallback(tmp_path / "lora")],
        max_steps=3, batches=6, accumulate=2)
    assert len(recorder.steps) == 3 and ema.num_updates == 3  # 6 micro-batches, 3 optimizer steps
    expected = expected_average(recorder, decay=0.2, warmup=True)
    assert ema.shadow.keys() == expected.keys()
    for name, average in expected.items():
        torch.testing.assert_close(ema.shadow[name], average, rtol=0, atol=1e-6)

    # the exports hold the average; the module is back on its last training weights, bit for bit
    trained = dict(module.trainable_parameters())
    diffusers_file = load_file(tmp_path / "lora" / "final" / LORA_WEIGHT_NAME)
    kohya = load_file(tmp_path / "lora" / "final" / KOHYA_WEIGHT_NAME)
    moved = 0.0
    for name, average in expected.items():
        path, kind = name.removeprefix("unet.").rsplit(".lora_", 1)
        down = kind.startswith("A")
        key = f"unet.{path}.lora_{'A' if down else 'B'}.weight"
        torch.testing.assert_close(diffusers_file[key], average, rtol=0, atol=1e-6)
        kohya_key = f"lora_unet_{path.replace('.', '_')}.lora_{'down' if down else 'up'}.weight"
        torch.testing.assert_close(kohya[kohya_key], average, rtol=0, atol=1e-6)
        assert torch.equal(trained[name].detach(), recorder.steps[-1][name])
        moved = max(moved, float((trained[name] - average).abs().max()))
    assert moved > 1e-4  # the average is not the training weights
    card = (tmp_path / "lora" / "final" / "README.md").read_text()
    assert "decay: 0.2" in card and "updates: 3" in card


def test_a_resumed_run_continues_the_average_exactly(tmp_path):
    from models.builders import build_components
    from models.ema import EMACallback

    def run(root, max_steps, ckpt_path=None):
        comps = build_components(tmp_path / "tiny", words=["a", "red", "circle"], seed=0)
        ema = EMACallback(decay=0.5, warmup=False)
        fit(lora_module(comps), comps, root, [ema, checkpoint_every_step(root, 1)], max_steps=max_steps,
            batches=2, ckpt_path=ckpt_path)
        return ema

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "killed", 2)  # ends at an epoch boundary (2 batches an epoch): the data order resumes too
    resumed = run(tmp_path / "killed", 4, ckpt_path=str(tmp_path / "killed" / "checkpoints" / "last.ckpt"))
    assert resumed.num_updates == whole.num_updates == 4
    for name, average in whole.shadow.items():
        torch.testing.assert_close(resumed.shadow[name], average, rtol=0, atol=1e-7)


def test_full_finetuning_saves_the_average_unet_and_keeps_training(tiny_components, tmp_path):
    from alignment.sft import SFT
    from models.alignment_module import AlignmentModule
    from models.ema import EMACallback
    from models.lora_export import LoraExportCallback

    module = AlignmentModule(tiny_components.unet, tiny_components.noise_scheduler, SFT(), lora=None,
                             optimizer={"lr": 1e-3})
    ema, recorder = EMACallback(decay=0.5, warmup=False), StepRecorder()
    fit(module, tiny_components, tmp_path, [recorder, ema, LoraExportCallback(tmp_path / "lora")], max_steps=2)
    saved = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    expected = expected_average(recorder, decay=0.5, warmup=False)
    assert len(expected) == len(saved) > 100
    for name, average in expected.items():
        torch.testing.assert_close(saved[name.removeprefix("unet.")], average, rtol=0, atol=1e-6)
        assert torch.equal(dict(module.trainable_parameters())[name].detach(), recorder.steps[-1][name])
    assert "full-fine-tuning" in (tmp_path / "unet" / "README.md").read_text()


def test_bad_settings_and_a_foreign_average_are_one_line():
    from common.errors import InputError
    from models.ema import EMACallback

    with pytest.raises(InputError, match=r"^callbacks.ema.decay: expected a number in \[0, 1\), got 1.0$"):
        EMACallback(decay=1.0)
    ema = EMACallback()
    ema.load_state_dict({"num_updates": 5, "shadow": {"other.weight": torch.zeros(3)}})
    with pytest.raises(InputError, match="^callbacks.ema: the checkpoint's average holds 1 tensors"):
        ema.on_fit_start(None, torch.nn.Linear(2, 2))


def test_disabled_ema_is_inert(tiny_components):
    from models.ema import EMACallback

    ema = EMACallback(enabled=False)
    ema.on_fit_start(None, tiny_components.unet)
    assert ema.shadow is None and ema.state_dict() == {}
    with ema.swapped(tiny_components.unet) as unet:
        assert unet is tiny_components.unet
