"""Merging LoRA experts on conv layers (peft LoRA on a Conv2d: A a conv [r, in, kh, kw], B a 1x1 conv [out, r, 1, 1]):
Co-Merge flattens the kernel, peft's baselines handle conv themselves; the merged file loads in diffusers."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

from alignment.co_merge import LoraFactors, co_merge_layer, kernel_activations
from models.lora_merging import co_merge_adapters, expert_factors, lora_layers, merge_adapters
from tests.models.test_lora_merging import tiny_unet

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["conv1", "proj_in", "attn2.to_k"]  # resnet 3x3 convs, the transformers' 1x1 conv proj_in, a linear layer


def add_expert(unet, name: str, rank: int, seed: int, targets: list[str] = TARGETS) -> None:
    """An expert with random A and B (peft's init leaves B zero), scaled so that it changes the output a little."""
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False),
                     adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(unet, name).values():
            layer.lora_B[name].weight.copy_(0.1 * torch.randn(layer.lora_B[name].weight.shape, generator=g))


def inputs(unet, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]),
            torch.randn(2, 5, unet.config.cross_attention_dim, generator=g))


def calibration(unet):
    x, t, c = inputs(unet)

    def run() -> None:
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=c)
    return run


def conv_layers(unet, adapter: str) -> dict:
    return {n: layer for n, layer in lora_layers(unet, adapter).items() if layer.lora_A[adapter].weight.ndim == 4}


def test_flattened_conv_factors_are_the_conv_update():
    """B A of the flattened factors, reshaped to [out, in, kh, kw], is the conv that lora_B(lora_A(x)) applies."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.nn.Conv2d(5, 3, 3, padding=1, bias=False), torch.nn.Conv2d(3, 7, 1, bias=False)
    with torch.no_grad():
        b.weight.copy_(torch.randn(b.weight.shape, generator=g))
    factors = LoraFactors.from_weights(a.weight.detach().double(), b.weight.detach().double(), alpha=6.0)
    assert factors.rank == 3 and factors.delta().shape == (7, 5 * 9)
    x = torch.randn(2, 5, 6, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        lora = 2.0 * b.double()(a.double()(x))  # alpha / r = 2
    torch.testing.assert_close(F.conv2d(x, factors.delta().reshape(7, 5, 3, 3), padding=1), lora, rtol=1e-10, atol=1e-10)
    assert kernel_activations(torch.tensor([1.0, 2.0]), 3).tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="not a 1x1 convolution"):
        LoraFactors.from_weights(a.weight, torch.zeros(7, 3, 3, 3), alpha=3.0)


def test_co_merge_on_conv_layers_is_the_flattened_co_merge_with_channel_means_over_the_kernel():
    unet = tiny_unet()
    add_expert(unet, "expert_a", 2, 1)
    add_expert(unet, "expert_b", 3, 2)
    run = calibration(unet)
    convs = conv_layers(unet, "expert_a")
    assert {n.rsplit(".", 1)[-1] for n in convs} == {"conv1", "proj_in"}
    assert {tuple(layer.lora_A["expert_a"].weight.shape[2:]) for layer in convs.values()} == {(3, 3), (1, 1)}

    means = {}  # E|h_c| per input channel, by hand, with each expert alone active (each layer runs once)
    for expert in ("expert_a", "expert_b"):
        seen = {}

        def record(name, seen=seen):
            def hook(module, args, output) -> None:
                seen[name] = args[0].abs().double().mean((0, 2, 3))
            return hook
        handles = [layer.register_forward_hook(record(n)) for n, layer in convs.items()]
        unet.set_adapter(expert)
        run()
        for handle in handles:
            handle.remove()
        means[expert] = seen
    errors = co_merge_adapters(unet, ["expert_a", "expert_b"], run)
    for name, layer in convs.items():
        positions = layer.lora_A["expert_a"].weight[0, 0].numel()
        want = co_merge_layer([expert_factors(layer, "expert_a"), expert_factors(layer, "expert_b")],
                              [kernel_activations(means[e][name], positions) for e in ("expert_a", "expert_b")], rank=5)
        got = layer.get_delta_weight("merged")  # peft's own conv delta of the merged 4-d weights
        assert got.shape == layer.get_base_layer().weight.shape
        torch.testing.assert_close(got.double().flatten(1), want.factors.delta(), rtol=1e-4, atol=1e-6)
        assert errors[name] == pytest.approx(want.relative_error, abs=1e-9) and 0 <= errors[name] < 1
        assert layer.lora_A["merged"].weight.shape[:2] == (5, layer.get_base_layer().in_channels)


def test_one_conv_expert_merges_to_itself_in_the_model_output():
    unet = tiny_unet()
    add_expert(unet, "expert_a", 4, 5)
    x, t, c = inputs(unet)
    with torch.no_grad():
        unet.disable_adapters()
        base = unet(x, t, encoder_hidden_states=c).sample
        unet.enable_adapters()
        unet.set_adapter("expert_a")
        expected = unet(x, t, encoder_hidden_states=c).sample
        errors = co_merge_adapters(unet, ["expert_a"], calibration(unet))
        unet.set_adapter("merged")
        got = unet(x, t, encoder_hidden_states=c).sample
    assert errors["max"] < 1e-6
    assert (expected - base).abs().max() > 1e-3  # the expert does change the output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_peft_baselines_on_conv_layers_sum_the_experts_where_exact():
    unet = tiny_unet()
    add_expert(unet, "expert_a", 2, 1)
    add_expert(unet, "expert_b", 3, 2)
    add_expert(unet, "expert_c", 2, 3)
    for method in ("cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"):
        merge_adapters(unet, ["expert_a", "expert_b"], method, merged_name=method)
    merge_adapters(unet, ["expert_a", "expert_c"], "linear", merged_name="linear", weights=[0.5, 0.5])
    for name, layer in conv_layers(unet, "expert_a").items():
        want = layer.get_delta_weight("expert_a") + layer.get_delta_weight("expert_b")
        for method in ("cat", "svd"):
            torch.testing.assert_close(layer.get_delta_weight(method), want, rtol=1e-4, atol=1e-5, msg=f"{method} {name}")
        for method in ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd", "linear"):
            assert layer.get_delta_weight(method).shape == want.shape, (method, name)
            assert torch.isfinite(layer.get_delta_weight(method)).all()


def test_co_merged_conv_lora_saves_and_loads_with_load_lora_weights(tmp_path):
    """Conv layers and a linear one outside attention (ff.net.2): peft key names throughout, which diffusers reads.
    The file loads back into the same pipeline as a second adapter equal to the merged one."""
    from diffusers import StableDiffusionPipeline

    from models.lora_io import save_lora

    targets = ["conv1", "proj_in", "ff.net.2"]
    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "assets" / "toy" / "sd")
    unet = pipe.unet
    add_expert(unet, "expert_a", 2, 1, targets)
    add_expert(unet, "expert_b", 3, 2, targets)
    co_merge_adapters(unet, ["expert_a", "expert_b"], calibration(unet))
    save_lora(unet, tmp_path / "merged", "merged")

    pipe.load_lora_weights(tmp_path / "merged", adapter_name="loaded")
    loaded, merged = lora_layers(unet, "loaded"), lora_layers(unet, "merged")
    assert set(loaded) == set(merged) and conv_layers(unet, "loaded")
    for name, layer in merged.items():
        torch.testing.assert_close(layer.get_delta_weight("loaded"), layer.get_delta_weight("merged"),
                                   rtol=1e-4, atol=1e-6, msg=name)
    x, t, c = inputs(unet)
    with torch.no_grad():
        unet.set_adapter("merged")
        want = unet(x, t, encoder_hidden_states=c).sample
        unet.set_adapter("loaded")
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=c).sample, want, rtol=1e-4, atol=1e-5)


def test_an_expert_file_diffusers_loads_only_in_part_is_refused(tmp_path):
    """Diffusers picks the key naming of a LoRA file by its first key; a file whose proj_in keys are peft's
    (lora_A) and whose to_k keys are diffusers' (lora.down) loses its to_k layers, so the merge refuses it."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from common.errors import InputError
    from workflows.merge import load_experts

    unet = tiny_unet()
    add_expert(unet, "default", 2, 1, ["proj_in", "attn2.to_k"])
    state = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name="default").items()}
    mixed = {k.replace("to_k.lora_A", "to_k.lora.down").replace("to_k.lora_B", "to_k.lora.up"): v for k, v in state.items()}
    save_file(state, tmp_path / "peft.safetensors")
    save_file(mixed, tmp_path / "mixed.safetensors")
    assert load_experts(tiny_unet(), [tmp_path / "peft.safetensors"]) == ["expert_0_peft"]
    with pytest.raises(InputError, match=r"^merge.experts\[0\]: .*mixed.safetensors: only 4 of its 8 UNet2DConditionModel LoRA layers "
                                         r"loaded \(e.g. not down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k\)"):
        load_experts(tiny_unet(), [tmp_path / "mixed.safetensors"])
