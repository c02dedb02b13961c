"""Merging on a real peft-adapted UNet: Co-Merge (calibration hooks, merged adapter) and the peft baselines (docs/methods/safetydpo.md)."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from alignment.co_merge import co_merge_layer
from common.errors import InputError
from models.lora_merging import (
    PEFT_METHODS,
    co_merge_adapters,
    expert_factors,
    input_activation_means,
    lora_layers,
    merge_adapters,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)


def add_expert(unet, name: str, rank: int, seed: int) -> None:
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False),
                     adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(unet, name).values():
            layer.lora_B[name].weight.copy_(0.1 * torch.randn(layer.lora_B[name].weight.shape, generator=g))


def calibration(unet):
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 16, generator=g))

    def run():
        with torch.no_grad():
            unet(batch[0], batch[1], encoder_hidden_states=batch[2])
    return run, batch


def test_merged_adapter_is_the_co_merge_of_the_experts():
    unet = tiny_unet()
    add_expert(unet, "expert_a", 2, 1)
    add_expert(unet, "expert_b", 3, 2)
    run, _ = calibration(unet)
    mu = {e: input_activation_means(unet, e, run) for e in ("expert_a", "expert_b")}
    errors = co_merge_adapters(unet, ["expert_a", "expert_b"], run)
    layers = lora_layers(unet, "merged")
    assert set(errors) == set(layers) | {"mean", "max"}
    for name, layer in layers.items():
        assert layer.r["merged"] == 5  # r* = sum of the experts' ranks
        want = co_merge_layer([expert_factors(layer, "expert_a"), expert_factors(layer, "expert_b")],
                              [mu["expert_a"][name], mu["expert_b"][name]], rank=5)
        assert torch.allclose(expert_factors(layer, "merged").delta(), want.factors.delta(), atol=1e-5)
        assert errors[name] == pytest.approx(want.relative_error, abs=1e-9)
        assert 0 <= errors[name] < 1


def test_one_expert_merges_to_itself_in_the_model_output():
    unet = tiny_unet()
    add_expert(unet, "expert_a", 4, 5)
    run, (x, t, c) = calibration(unet)
    with torch.no_grad():
        unet.set_adapter("expert_a")
        expected = unet(x, t, encoder_hidden_states=c).sample
        errors = co_merge_adapters(unet, ["expert_a"], run)
        unet.set_adapter("merged")
        got = unet(x, t, encoder_hidden_states=c).sample
    assert errors["max"] < 1e-6
    assert torch.allclose(got, expected, atol=1e-5)


def test_experts_on_different_layers_are_refused():
    unet = tiny_unet()
    add_expert(unet, "expert_a", 2, 1)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]), adapter_name="expert_b")
    run, _ = calibration(unet)
    with pytest.raises(ValueError, match="adapt different layers"):
        co_merge_adapters(unet, ["expert_a", "expert_b"], run)


def test_peft_baselines_on_the_unet_sum_the_experts_where_exact():
    """cat, and svd at rank r_a + r_b, represent dW_a + dW_b exactly; the pruning methods keep part of it."""
    unet = tiny_unet()
    add_expert(unet, "expert_a", 2, 1)
    add_expert(unet, "expert_b", 3, 2)
    for method in PEFT_METHODS[1:]:  # linear needs one rank
        assert merge_adapters(unet, ["expert_a", "expert_b"], method, merged_name=method) == {}
    for layer in lora_layers(unet, "expert_a").values():
        want = layer.get_delta_weight("expert_a") + layer.get_delta_weight("expert_b")
        for method in ("cat", "svd"):
            assert layer.r[method] == 5
            assert torch.allclose(layer.get_delta_weight(method), want, atol=1e-5), method
        for method in ("ties_svd", "dare_ties_svd", "magnitude_prune_svd"):
            assert not torch.allclose(layer.get_delta_weight(method), want, atol=1e-3), method
    with pytest.raises(InputError, match="linear needs experts of one rank"):
        merge_adapters(unet, ["expert_a", "expert_b"], "linear")
    add_expert(unet, "expert_c", 2, 3)
    merge_adapters(unet, ["expert_a", "expert_c"], "linear", merged_name="lin", weights=[0.5, 0.5])
    assert all(layer.r["lin"] == 2 for layer in lora_layers(unet, "lin").values())
    with pytest.raises(InputError, match="unknown method 'sum'"):
        merge_adapters(unet, ["expert_a", "expert_c"], "sum")


def _save_toy_expert(directory, targets, rank, seed):
    from diffusers import UNet2DConditionModel as UNet

    from models.lora_io import save_lora

    unet = UNet.from_pretrained(ROOT / "assets" / "toy" / "sd" / "unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False),
                     adapter_name="default")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(unet, "default").values():
            layer.lora_B["default"].weight.copy_(0.05 * torch.randn(layer.lora_B["default"].weight.shape, generator=g))
    return save_lora(unet, directory, "default").parent


ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_merge_task_on_saved_experts_writes_a_lora_diffusers_loads(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from diffusers import StableDiffusionPipeline

    a = _save_toy_expert(tmp_path / "expert_a", ["attn2.to_k", "attn2.to_v"], 2, 1)
    b = _save_toy_expert(tmp_path / "expert_b", ["attn2.to_k", "attn2.to_v"], 3, 2)
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "task=merge", f"merge.experts=[{a},{b}]", f"hydra.run.dir={out}",
           "merge.calibration_prompts=8", "merge.method=[co_merge,cat]", "data.reader.images_per_prompt=1", f"data.cache_dir={tmp_path / 'cache'}",
           "logger=none"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "merged" / "co_merge" / "merge_report.json").read_text())
    assert report["rank"] == 5 and 0 <= report["relative_svd_error"]["max"] < 1
    assert json.loads((out / "merged" / "cat" / "merge_report.json").read_text())["rank"] == 5
    assert (out / "merged" / "co_merge" / "lora_kohya.safetensors").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "assets" / "toy" / "sd")
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np")
    before = pipe("a red star on gray", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    for method in ("co_merge", "cat"):
        pipe.load_lora_weights(out / "merged" / method, adapter_name=method)
        pipe.set_adapters(method)
        after = pipe("a red star on gray", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
        assert abs(after - before).max() > 1e-3, method

    c = _save_toy_expert(tmp_path / "expert_c", ["attn1.to_q"], 2, 3)
    result = subprocess.run(cmd[:3] + [f"merge.experts=[{a},{c}]"] + cmd[4:], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: merge.experts[1]:") and "adapts other layers" in last
    assert "Traceback" not in result.stderr
