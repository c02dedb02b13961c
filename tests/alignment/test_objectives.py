"""Objective math against values computed by hand (docs/methods/diffusion-dpo.md)."""
import math

import pytest
import torch

from alignment import DPO, SFT, PairErrors


def errors() -> PairErrors:
    # d_w = [-0.02, 0.02], d_l = [0.02, 0.0]  ->  d_w - d_l = [-0.04, 0.02]
    return PairErrors(
        policy_w=torch.tensor([0.10, 0.20], dtype=torch.float64),
        policy_l=torch.tensor([0.30, 0.25], dtype=torch.float64),
        ref_w=torch.tensor([0.12, 0.18], dtype=torch.float64),
        ref_l=torch.tensor([0.28, 0.25], dtype=torch.float64),
    )


def test_margin_is_minus_half_beta_times_delta():
    h = errors().margin(beta=100.0)
    assert torch.allclose(h, torch.tensor([2.0, -1.0], dtype=torch.float64))


def test_dpo_sigmoid_by_hand():
    out = DPO(beta=100.0, loss_type="sigmoid")(errors())
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.metrics["implicit_acc"].item() == pytest.approx(0.5)
    assert out.metrics["margin"].item() == pytest.approx(0.5)
    assert out.metrics["mse_w"].item() == pytest.approx(0.15)
    assert out.metrics["mse_l"].item() == pytest.approx(0.275)
    assert out.metrics["ref_mse"].item() == pytest.approx((0.12 + 0.18 + 0.28 + 0.25) / 4)


def test_dpo_hinge_by_hand():
    # relu(1 - 2) = 0, relu(1 + 1) = 2
    assert DPO(beta=100.0, loss_type="hinge")(errors()).loss.item() == pytest.approx(1.0)


def test_dpo_ipo_by_hand():
    # (-(d_w - d_l) - 1 / (2 * 100))^2 = (0.04 - 0.005)^2, (-0.02 - 0.005)^2
    expected = ((0.035 ** 2) + (0.025 ** 2)) / 2
    assert DPO(beta=100.0, loss_type="ipo")(errors()).loss.item() == pytest.approx(expected, rel=1e-9)


def test_dpo_gradient_pushes_winner_error_down_and_loser_up():
    e = errors()
    e.policy_w.requires_grad_(True)
    e.policy_l.requires_grad_(True)
    DPO(beta=100.0)(e).loss.backward()
    assert (e.policy_w.grad > 0).all() and (e.policy_l.grad < 0).all()


def test_sft_is_mean_winner_error_and_needs_no_reference():
    out = SFT()(PairErrors(policy_w=torch.tensor([0.2, 0.4])))
    assert out.loss.item() == pytest.approx(0.3)
    assert not SFT.uses_reference and not SFT.uses_losers


def test_dpo_without_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="reference"):
        DPO()(PairErrors(policy_w=torch.ones(2), policy_l=torch.ones(2)))


@pytest.mark.parametrize("kwargs", [{"loss_type": "focal"}, {"beta": 0}, {"sft_weight": -1}])
def test_dpo_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="objective"):
        DPO(**kwargs)


def test_dpo_sft_weight_adds_the_winner_error():
    plain = DPO(beta=100.0)(errors())
    out = DPO(beta=100.0, sft_weight=10.0)(errors())
    assert out.loss.item() == pytest.approx(plain.loss.item() + 10.0 * 0.15, rel=1e-9)
    assert out.metrics["sft_term"].item() == pytest.approx(0.15)
    e = errors()
    e.policy_l.requires_grad_(True)
    e.policy_w.requires_grad_(True)
    DPO(beta=100.0, sft_weight=10.0)(e).loss.backward()
    e0 = errors()
    e0.policy_w.requires_grad_(True)
    e0.policy_l.requires_grad_(True)
    DPO(beta=100.0)(e0).loss.backward()
    assert torch.allclose(e.policy_w.grad, e0.policy_w.grad + 10.0 / 2)   # d/d e_w of 10 * mean(e_w)
    assert torch.allclose(e.policy_l.grad, e0.policy_l.grad)


def test_benign_drift_averages_winner_and_loser_drift_over_benign_pairs_only():
    from alignment.base import benign_drift

    errs = errors()
    errs.drift_w = torch.tensor([0.4, 0.1, 0.3], dtype=torch.float64)
    errs.drift_l = torch.tensor([0.2, 0.3, 0.9], dtype=torch.float64)
    meta = {"categories": [("hate",), (), ()]}
    # benign pairs 1 and 2: ((0.1 + 0.3) / 2 + (0.3 + 0.9) / 2) / 2
    assert benign_drift(errs, meta).item() == pytest.approx(0.4)
    assert benign_drift(errs, {}).item() == pytest.approx((0.3 + 0.2 + 0.6) / 3)  # no categories: all benign
    assert benign_drift(errs, {"categories": [("hate",), ("sexual",), ("violence",)]}).item() == 0.0
    with pytest.raises(ValueError, match="drift_w"):
        benign_drift(errors(), meta)
    # anchor pairs (data.anchor_others) are held too, whatever their categories
    anchored = {"categories": [("hate",), (), ("sexual",)], "anchor": torch.tensor([False, False, True])}
    assert benign_drift(errs, anchored).item() == pytest.approx(((0.1 + 0.3) / 2 + (0.3 + 0.9) / 2) / 2)


def test_select_keeps_the_chosen_pairs_errors_and_metadata():
    from alignment.base import select_meta

    errs = errors()
    chosen = errs.select(torch.tensor([False, True]))
    assert chosen.policy_w.tolist() == [0.20] and chosen.policy_l.tolist() == [0.25] and chosen.ref_l.tolist() == [0.25]
    assert chosen.drift_w is None
    keep = torch.tensor([True, False, True])
    meta = {"categories": [("hate",), (), ("sexual",)], "index": torch.tensor([4, 5, 6]), "note": "batch"}
    picked = select_meta(meta, keep)
    assert picked["categories"] == [("hate",), ("sexual",)] and picked["index"].tolist() == [4, 6] and picked["note"] == "batch"
