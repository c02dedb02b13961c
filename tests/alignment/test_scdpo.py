"""SC-DPO and the cost model's losses against hand-computed values (docs/methods/cost-model.md, docs/methods/scdpo.md)."""
import math

import pytest
import torch

from alignment import DPO, SCDPO, PairErrors
from alignment.cost_loss import anchor_loss, contrastive_loss, cost_model_loss
from alignment.scdpo import focusing_weights


def errors(requires_grad: bool = False) -> PairErrors:
    e = PairErrors(
        policy_w=torch.tensor([0.10, 0.20, 0.15], dtype=torch.float64),
        policy_l=torch.tensor([0.30, 0.25, 0.10], dtype=torch.float64),
        ref_w=torch.tensor([0.12, 0.18, 0.15], dtype=torch.float64),
        ref_l=torch.tensor([0.28, 0.25, 0.12], dtype=torch.float64),
    )
    if requires_grad:
        e.policy_w.requires_grad_(True)
        e.policy_l.requires_grad_(True)
    return e


META = {"cost_w": torch.tensor([-2.0, -1.0, 0.5]), "cost_l": torch.tensor([3.0, 20.0, 0.0])}


def test_gamma_0_lambda_0_is_dpo_values_and_gradients():
    a, b = errors(True), errors(True)
    out = SCDPO(beta=100.0, lambda_c=0.0, gamma=0.0)(a, META)
    ref = DPO(beta=100.0)(b)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-12)
    out.loss.backward()
    ref.loss.backward()
    assert torch.allclose(a.policy_w.grad, b.policy_w.grad) and torch.allclose(a.policy_l.grad, b.policy_l.grad)


def test_safety_margin_sign_and_clip():
    m = SCDPO(beta=100.0, lambda_c=0.5, m_max=10.0).safety_margin(META, torch.zeros(3))
    # a more harmful loser (C_l > C_w) gives a positive margin to beat; clipped at m_max
    assert m.tolist() == pytest.approx([0.5 * 5.0, 0.5 * 10.0, 0.5 * -0.5])
    nan_meta = {"cost_w": torch.tensor([float("nan")]), "cost_l": torch.tensor([1.0])}
    assert SCDPO(lambda_c=1.0).safety_margin(nan_meta, torch.zeros(1)).item() == 0.0


def test_scdpo_loss_by_hand():
    # h = -(100/2) (d_w - d_l): d_w - d_l = [-0.04, 0.02, 0.02] -> h = [2, -1, -1]
    objective = SCDPO(beta=100.0, lambda_c=0.5, m_max=10.0, gamma=2.0, dfm_normalize=True)
    h = torch.tensor([2.0, -1.0, -1.0], dtype=torch.float64)
    m = torch.tensor([2.5, 5.0, -0.25], dtype=torch.float64)
    s = h - m
    w = (1 - torch.sigmoid(s)) ** 2
    w = w / w.mean()
    expected = (w * -torch.nn.functional.logsigmoid(s)).mean()
    out = objective(errors(), META)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert out.metrics["safety_margin"].item() == pytest.approx(m.mean().item())


def test_dfm_upweights_a_misranked_pair():
    w = focusing_weights(torch.tensor([3.0, -3.0]), gamma=2.0, normalize=True)
    assert w[1] > w[0]
    assert w.mean().item() == pytest.approx(1.0)
    assert focusing_weights(torch.tensor([3.0, -3.0]), gamma=0.0, normalize=False).tolist() == [1.0, 1.0]


def test_dfm_weights_carry_no_gradient():
    e = errors(True)
    SCDPO(beta=100.0, lambda_c=0.0, gamma=2.0, dfm_normalize=False)(e, META).loss.backward()
    h = torch.tensor([2.0, -1.0, -1.0], dtype=torch.float64)
    w = (1 - torch.sigmoid(h)) ** 2
    # d/d e_w of mean(w * -log sigmoid(h)) with w constant, dh/de_w = -beta/2 = -50
    expected = w * (1 - torch.sigmoid(h)) * 50 / 3
    assert torch.allclose(e.policy_w.grad, expected)


def test_scdpo_without_costs_is_a_clear_error():
    with pytest.raises(ValueError, match="cost_w"):
        SCDPO(lambda_c=1.0)(errors(), {})


def test_contrastive_and_anchor_losses_by_hand():
    c_u, c_s = torch.tensor([1.0, -0.5]), torch.tensor([-1.0, 0.5])
    assert contrastive_loss(c_u, c_s).item() == pytest.approx(
        (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2, rel=1e-6)
    cost, label = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, -1.0, -1.0])
    # margin 0.5: y (C - y m) = [1.5, -(0.5 + 0.5), -(-1 + 0.5)] = [1.5, -1.0, 0.5]
    expected = sum(math.log(1 + math.exp(-v)) for v in (1.5, -1.0, 0.5)) / 3
    assert anchor_loss(cost, label, margin=0.5).item() == pytest.approx(expected, rel=1e-6)
    total, parts = cost_model_loss(c_u, c_s, cost, label, lambda_a=2.0, margin=0.5)
    assert total.item() == pytest.approx(parts["loss_con"].item() + 2.0 * expected, rel=1e-6)
