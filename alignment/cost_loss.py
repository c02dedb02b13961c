"""Losses of the safety cost model (docs/methods/cost-model.md): contrastive ordering and cost anchoring."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def contrastive_loss(cost_harmful: Tensor, cost_safe: Tensor) -> Tensor:
    """``-log sigmoid(C(x_u) - C(x_s))``: the harmful image of a pair costs more than the safe one."""
    return -F.logsigmoid(cost_harmful - cost_safe).mean()


def anchor_loss(cost: Tensor, label: Tensor, margin: float = 0.0) -> Tensor:
    """``-log sigmoid(y * (C(x) - y * m_a))`` with ``y = +1`` harmful, ``-1`` safe: the sign of the cost
    is the label, so costs are comparable across prompts."""
    label = label.to(cost)
    return -F.logsigmoid(label * (cost - label * margin)).mean()


def cost_model_loss(cost_harmful: Tensor, cost_safe: Tensor, cost: Tensor, label: Tensor,
                    lambda_a: float = 1.0, margin: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    con, anc = contrastive_loss(cost_harmful, cost_safe), anchor_loss(cost, label, margin)
    return con + lambda_a * anc, {"loss_con": con.detach(), "loss_anc": anc.detach()}
