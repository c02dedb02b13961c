"""The speed options that the GPU experiment configs turn on (configs/experiment/dpo_pickapic_sd15.yaml and
trainer=gpu: bf16 frozen weights under bf16 autocast, channels-last, torch.compile, fused AdamW) compute the
plain step's loss, gradients and update, here on the CPU."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from alignment.dpo import DPO
from models.alignment_module import AlignmentModule
from tests.conftest import random_batch

LORA = {"rank": 4, "alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def lora_step(components, batch, options: dict, autocast: bool = False):
    """One step's loss and LoRA gradients; the LoRA weights are set to the same random values for every option
    (peft starts B at zero, which would leave A's gradients zero)."""
    # a small beta keeps the loss's logits near 0, where rounding in the errors moves them least
    module = AlignmentModule(copy.deepcopy(components.unet), components.noise_scheduler, DPO(beta=5.0), lora=LORA,
                             **options)
    g = torch.Generator().manual_seed(7)
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name in sorted(trainable):
            trainable[name].copy_(torch.randn(trainable[name].shape, generator=g) * 0.05)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with context:
        out = module.compute(batch, torch.Generator().manual_seed(3))
    out.loss.backward()
    return module, out.loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in trainable.items()}


@pytest.fixture()
def plain(tiny_components):
    batch = random_batch(tiny_components)
    return tiny_components, batch, lora_step(tiny_components, batch, {})


def assert_same_step(reference, other, rtol: float, atol: float) -> None:
    (_, loss, grads), (_, loss_o, grads_o) = reference, other
    torch.testing.assert_close(loss_o, loss, rtol=rtol, atol=atol)
    assert grads_o.keys() == grads.keys()
    largest = max(g.abs().max().item() for g in grads.values())
    assert largest > 0
    for name in grads:  # atol relative to the largest gradient entry of the step
        torch.testing.assert_close(grads_o[name], grads[name], rtol=rtol, atol=atol * largest,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_channels_last_gives_the_plain_step(plain):
    components, batch, reference = plain
    assert_same_step(reference, lora_step(components, batch, {"channels_last": True}), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CHECK_COMPILE"), reason="compiling takes minutes on a CPU: CHECK_COMPILE=1")
@pytest.mark.xfail(strict=True, reason="inductor on the CPU: the loss matches bitwise, but some LoRA gradients differ "
                                       "by up to 80% of the step's largest gradient (aot_eager matches bitwise)")
def test_compiled_step_gives_the_plain_step(plain):
    """Why the GPU experiment leaves model.compile off. It fails with dpo and with sft alike (one forward, no
    reference pass), so it is not the policy/reference double call; when it starts passing, xfail(strict) says so."""
    components, batch, reference = plain
    assert_same_step(reference, lora_step(components, batch, {"compile": True}), rtol=1e-3, atol=1e-4)


def test_bf16_frozen_weights_under_bf16_autocast_give_the_plain_step_to_bf16_precision(plain):
    components, batch, reference = plain
    module, loss, grads = lora_step(components, batch, {"frozen_dtype": "bfloat16"}, autocast=True)
    assert module.unet.conv_in.weight.dtype == torch.bfloat16  # the frozen base is bf16, the LoRA float32
    assert all(p.dtype == torch.float32 for p in module.parameters() if p.requires_grad)
    _, loss_ref, grads_ref = reference
    torch.testing.assert_close(loss, loss_ref, rtol=0.05, atol=0.02)
    for name, g in grads.items():  # bf16 keeps ~3 significant digits: direction and size, not bits
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), grads_ref[name].flatten(), dim=0)
        assert cosine > 0.98, f"{name}: cosine {cosine:.4f}"
        assert g.norm() == pytest.approx(grads_ref[name].norm().item(), rel=0.1)


def test_fused_adamw_makes_the_plain_update(plain):
    """`model.optimizer.fused` asks torch for its fused AdamW kernel (on CUDA in training); torch has it on the CPU
    too, where it must make the same update as the default implementation."""
    _, _, (module, _, grads) = plain
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    results = []
    for fused in (False, True):
        copies = [torch.nn.Parameter(params[n].detach().clone()) for n in sorted(params)]
        for p, n in zip(copies, sorted(params)):
            p.grad = grads[n].clone()
        optimizer = torch.optim.AdamW(copies, lr=1e-3, weight_decay=1e-2, fused=fused)
        for _ in range(3):
            optimizer.step()
        results.append(copies)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
