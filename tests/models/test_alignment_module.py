"""AlignmentModule: per-sample errors as docs/methods/diffusion-dpo.md defines them, the LoRA reference, optimization."""
import copy

import pytest
import torch
from conftest import random_batch
from diffusers import DDPMScheduler

from alignment import DPO, SFT
from common.errors import InputError
from models.alignment_module import AlignmentModule

LORA = {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def make(components, objective=None, lora=LORA, **kw) -> AlignmentModule:
    return AlignmentModule(components.unet, components.noise_scheduler, objective or DPO(beta=5000.0), lora=lora, **kw)


def perturb_lora(module: AlignmentModule, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in module.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def manual_noise(scheduler, batch, seed):
    """docs/methods/diffusion-dpo.md written out: one t and one eps per pair, shared by winner and loser."""
    g = torch.Generator().manual_seed(seed)
    z_w = batch["latents_w"]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (z_w.shape[0],), generator=g)
    return t, torch.randn(z_w.shape, generator=g)


def manual_errors(unet, scheduler, batch, seed):
    t, eps = manual_noise(scheduler, batch, seed)
    z_w, z_l, c = batch["latents_w"], batch["latents_l"], batch["prompt_embeds"]
    out = []
    for z in (z_w, z_l):
        z_t = scheduler.add_noise(z, eps, t)
        target = eps if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z, eps, t)
        with torch.no_grad():
            pred = unet(z_t, t, encoder_hidden_states=c).sample
        out.append(((pred - target) ** 2).mean(dim=(1, 2, 3)))
    return out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_errors_match_spec_and_reference_is_the_base_unet(tiny_components, prediction_type):
    tiny_components.noise_scheduler = DDPMScheduler.from_config(tiny_components.noise_scheduler.config,
                                                                prediction_type=prediction_type)
    base = copy.deepcopy(tiny_components.unet)
    module = make(tiny_components)
    perturb_lora(module)
    batch = random_batch(tiny_components)
    errs = module.pair_errors(batch, torch.Generator().manual_seed(7))

    ref_w, ref_l = manual_errors(base, tiny_components.noise_scheduler, batch, seed=7)
    assert torch.allclose(errs.ref_w, ref_w, atol=1e-5) and torch.allclose(errs.ref_l, ref_l, atol=1e-5)
    pol_w, pol_l = manual_errors(module.unet, tiny_components.noise_scheduler, batch, seed=7)
    assert torch.allclose(errs.policy_w, pol_w, atol=1e-5) and torch.allclose(errs.policy_l, pol_l, atol=1e-5)
    # the adapters are live again after the reference pass, and they change the prediction
    assert not torch.allclose(errs.policy_w, errs.ref_w, atol=1e-6)


def test_winner_and_loser_share_timestep_and_noise(tiny_components):
    module = make(tiny_components)
    batch = random_batch(tiny_components)
    batch["latents_l"] = batch["latents_w"].clone()
    errs = module.pair_errors(batch)
    # the same inputs at different batch positions: equal up to float32 rounding (kernels may differ by position)
    torch.testing.assert_close(errs.policy_w, errs.policy_l, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(errs.ref_w, errs.ref_l, rtol=1e-5, atol=1e-7)


def test_one_dpo_step_lowers_winner_minus_loser_error(tiny_components):
    module = make(tiny_components, optimizer={"lr": 1e-3, "weight_decay": 0.0})
    batch = random_batch(tiny_components)
    before = module.pair_errors(batch, torch.Generator().manual_seed(3))
    optimizer = module.configure_optimizers()["optimizer"]
    module.compute(batch, torch.Generator().manual_seed(3)).loss.backward()
    optimizer.step()
    after = module.pair_errors(batch, torch.Generator().manual_seed(3))
    gap_before = (before.policy_w - before.policy_l).mean()
    gap_after = (after.policy_w - after.policy_l).mean()
    assert gap_after < gap_before
    assert torch.allclose(after.ref_w, before.ref_w) and torch.allclose(after.ref_l, before.ref_l)


def test_only_lora_parameters_train_and_reach_the_optimizer(tiny_components):
    module = make(tiny_components, optimizer={"lr": 1e-4})
    names = [n for n, _ in module.trainable_parameters()]
    assert names and all("lora_" in n for n in names)
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    assert in_optimizer == sum(p.numel() for _, p in module.trainable_parameters())
    assert in_optimizer < sum(p.numel() for p in module.parameters()) / 10


def test_checkpoint_holds_only_trainable_tensors(tiny_components):
    module = make(tiny_components)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == {n for n, _ in module.trainable_parameters()}


def test_full_finetune_keeps_a_frozen_reference_copy(tiny_components):
    module = make(tiny_components, lora=None)
    assert module.ref_unet is not None and module.ref_unet is not module.unet
    assert all(p.requires_grad for p in module.unet.parameters())
    assert not any(p.requires_grad for p in module.ref_unet.parameters())
    batch = random_batch(tiny_components)
    errs = module.pair_errors(batch)
    assert torch.allclose(errs.policy_w, errs.ref_w)  # untrained: policy == reference


def test_sft_skips_losers_and_reference(tiny_components):
    module = make(tiny_components, objective=SFT(), lora=None)
    assert module.ref_unet is None
    errs = module.pair_errors(random_batch(tiny_components))
    assert errs.policy_l is None and errs.ref_w is None


def test_gradient_checkpointing_gives_the_same_gradients(tiny_components):
    batch = random_batch(tiny_components)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        components = copy.deepcopy(tiny_components)
        module = make(components, gradient_checkpointing=checkpointing)
        perturb_lora(module)
        module.compute(batch, torch.Generator().manual_seed(5)).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in module.trainable_parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_benign_anchor_adds_the_drift_of_benign_pairs_and_ignores_harmful_ones(tiny_components):
    base = copy.deepcopy(tiny_components.unet)
    module = make(tiny_components, benign_anchor=100.0)
    perturb_lora(module)
    batch = random_batch(tiny_components)
    batch["meta"] = {"categories": [("hate",), (), ("sexual",)]}
    errs = module.pair_errors(batch, torch.Generator().manual_seed(5))
    # drift by hand: policy and base predictions on the same noisy latents (same t and eps draws)
    t, eps = manual_noise(tiny_components.noise_scheduler, batch, seed=5)
    z_t = tiny_components.noise_scheduler.add_noise(batch["latents_w"], eps, t)
    with torch.no_grad():
        by_hand = (module.unet(z_t, t, encoder_hidden_states=batch["prompt_embeds"]).sample
                   - base(z_t, t, encoder_hidden_states=batch["prompt_embeds"]).sample).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(errs.drift_w, by_hand, atol=1e-6) and (by_hand > 0).all()

    out = module.compute(batch, torch.Generator().manual_seed(5))
    plain = module.objective(errs, batch["meta"])
    expected_drift = (errs.drift_w[1] + errs.drift_l[1]) / 2
    assert torch.allclose(out.metrics["benign_drift"], expected_drift)
    assert torch.allclose(out.loss, plain.loss + 100.0 * expected_drift)
    # with every pair harmful the anchor adds nothing
    batch["meta"] = {"categories": [("hate",), ("violence",), ("sexual",)]}
    harmful_only = module.compute(batch, torch.Generator().manual_seed(5))
    assert harmful_only.metrics["benign_drift"].item() == 0.0
    assert torch.allclose(harmful_only.loss, plain.loss)


def test_training_with_the_anchor_keeps_benign_pairs_closer_to_the_reference(tiny_components):
    batch = random_batch(tiny_components, n=4)
    batch["meta"] = {"categories": [("hate",), (), ("violence",), ()]}
    drift = {}
    for weight in (0.0, 1e5):
        components = copy.deepcopy(tiny_components)
        torch.manual_seed(0)  # the same LoRA initialization for both runs
        module = make(components, benign_anchor=weight, optimizer={"lr": 3e-3, "weight_decay": 0.0})
        optimizer = module.configure_optimizers()["optimizer"]
        for step in range(8):
            optimizer.zero_grad()
            module.compute(batch, torch.Generator().manual_seed(step)).loss.backward()
            optimizer.step()
        module.benign_anchor = 1.0  # only so that pair_errors reports the drift
        errs = module.pair_errors(batch, torch.Generator().manual_seed(99))
        drift[weight] = float((errs.drift_w[[1, 3]] + errs.drift_l[[1, 3]]).mean().detach())
    assert drift[1e5] < 0.5 * drift[0.0]


def test_benign_anchor_gives_sft_with_full_finetuning_a_frozen_reference(tiny_components):
    module = make(tiny_components, objective=SFT(), lora=None, benign_anchor=1.0)
    assert module.ref_unet is not None
    errs = module.pair_errors(random_batch(tiny_components))
    assert errs.ref_w is None and torch.allclose(errs.drift_w, torch.zeros(3))  # untrained: no drift yet


def test_benign_anchor_rejects_negative_weights(tiny_components):
    with pytest.raises(InputError, match="benign_anchor"):
        make(tiny_components, benign_anchor=-1.0)


def test_anchor_pairs_are_held_by_the_benign_anchor_and_left_out_of_the_objective(tiny_components):
    unanchored = make(copy.deepcopy(tiny_components))
    module = make(tiny_components, benign_anchor=100.0)
    perturb_lora(module)
    batch = random_batch(tiny_components)
    batch["meta"] = {"categories": [("hate",), ("hate",), ("sexual",)], "anchor": torch.tensor([False, False, True])}
    errs = module.pair_errors(batch, torch.Generator().manual_seed(5))
    out = module.compute(batch, torch.Generator().manual_seed(5))
    own = module.objective(errs.select(torch.tensor([True, True, False])), {"categories": [("hate",), ("hate",)]})
    anchor_drift = (errs.drift_w[2] + errs.drift_l[2]) / 2
    assert torch.allclose(out.metrics["benign_drift"], anchor_drift)
    assert torch.allclose(out.loss, own.loss + 100.0 * anchor_drift)
    assert not torch.allclose(own.loss, module.objective(errs, batch["meta"]).loss)  # the anchor pair is really left out
    with pytest.raises(InputError, match="benign_anchor is 0"):
        unanchored.compute(batch, torch.Generator().manual_seed(5))


def test_batched_reference_gives_the_separate_forwards_loss_and_gradients(tiny_components):
    """model.batch_reference runs policy and reference as one doubled batch (peft's mixed-adapter forward):
    same errors, loss and LoRA gradients as two forwards, with the reference exactly the base UNet."""
    batch = random_batch(tiny_components)
    batch["meta"] = {"categories": [["sexual"]] + [[]] * (batch["latents_w"].shape[0] - 1)}
    results = []
    for batched in (False, True):
        torch.manual_seed(0)  # the same LoRA initialization
        module = make(copy.deepcopy(tiny_components), benign_anchor=3.0, batch_reference=batched)
        perturb_lora(module)
        errors = module.pair_errors(batch, torch.Generator().manual_seed(5))
        out = module.compute(batch, torch.Generator().manual_seed(5))
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for _, p in module.trainable_parameters()])
        results.append((errors, out.loss.detach(), grads))
    (e0, loss0, g0), (e1, loss1, g1) = results
    assert not torch.allclose(e1.policy_w, e1.ref_w)  # the adapters did act on the policy half
    for name in ("policy_w", "policy_l", "ref_w", "ref_l", "drift_w", "drift_l"):
        torch.testing.assert_close(getattr(e1, name), getattr(e0, name), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-7)
    # batch-size-dependent summation order moves single elements by float rounding, not the gradient
    assert g0.norm() > 0 and (g1 - g0).norm() / g0.norm() < 1e-4


def test_batched_reference_needs_lora_and_no_gradient_checkpointing(tiny_components):
    with pytest.raises(InputError, match="model.batch_reference: needs model.lora"):
        make(tiny_components, lora=None, batch_reference=True)
    with pytest.raises(InputError, match="model.batch_reference: cannot be combined with model.gradient_checkpointing"):
        make(tiny_components, batch_reference=True, gradient_checkpointing=True)


@pytest.mark.parametrize("name", ["cudnn", "math"])
def test_attention_backend_is_first_in_sdpa_priority_at_every_attention_call_and_recompute(tiny_components, name):
    """CPUs ignore the priority order, so this checks what a GPU would see: the order at each attention call,
    the ones gradient checkpointing recomputes in the backward included."""
    from unittest import mock

    from models.attention_backend import SDPA_BACKENDS

    module = make(tiny_components, attention_backend=name, gradient_checkpointing=True)
    sdpa, seen = torch.nn.functional.scaled_dot_product_attention, []

    def spy(*args, **kwargs):
        seen.append(torch._C._get_sdp_priority_order()[0])
        return sdpa(*args, **kwargs)

    default_first = torch._C._get_sdp_priority_order()[0]
    with mock.patch("torch.nn.functional.scaled_dot_product_attention", spy):
        loss = module.compute(random_batch(tiny_components), torch.Generator().manual_seed(5)).loss
        forward_calls = len(seen)
        module.backward(loss)  # Lightning's hook; checkpointing recomputes the attention here
    assert len(seen) > forward_calls > 0  # checkpointing ran the policy's attention again in the backward
    assert set(seen) == {int(SDPA_BACKENDS[name])} != {default_first}
    assert torch._C._get_sdp_priority_order()[0] == default_first  # restored after the call


def test_attention_backend_rejects_unknown_names(tiny_components):
    with pytest.raises(InputError, match="model.attention_backend: expected null or one of"):
        make(tiny_components, attention_backend="fa3")
