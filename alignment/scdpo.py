"""Safety-Constrained DPO with the Dynamic Focusing Mechanism (docs/methods/scdpo.md)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from alignment.base import Objective, ObjectiveOutput, PairErrors, add_sft_term, coefficient, preference_metrics


def focusing_weights(shifted_margin: Tensor, gamma: float, normalize: bool = True) -> Tensor:
    """DFM: ``stopgrad((1 - sigmoid(h - m))^gamma)``, mean 1 over the batch when ``normalize``: pairs the
    policy still misranks weigh more, as in the focal loss."""
    w = (1 - torch.sigmoid(shifted_margin.detach())) ** gamma
    if normalize:
        w = w / w.mean().clamp(min=1e-12)
    return w


def shifted_margin_loss(h: Tensor, m: Tensor, gamma: float, normalize: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """``mean(w * -log sigmoid(h - m))`` with DFM weights ``w`` on the shifted margin (``w = 1`` when
    ``gamma = 0``), and its diagnostics; shared by ``scdpo`` (safety margin) and ``spo`` (reward margin)."""
    shifted = h - m
    w = focusing_weights(shifted, gamma, normalize) if gamma else torch.ones_like(h)
    loss = (w * -F.logsigmoid(shifted)).mean()
    return loss, {**preference_metrics(h), "dfm_weight_max": w.max().detach(),
                  "shifted_acc": (shifted.detach() > 0).float().mean()}


class SCDPO(Objective):
    """``L = mean(w * -log sigmoid(h - m))``, ``m = lambda_c * clip(C(x_l) - C(x_w), -m_max, m_max)``.

    The costs ``cost_w``/``cost_l`` come with the batch (computed once by a cost model and cached with
    the latents). A pair without costs (NaN, e.g. a quality pair under a clean prompt not scored) gets
    ``m = 0``. ``gamma = 0, lambda_c = 0`` is exactly ``dpo`` with the sigmoid loss.
    """

    def __init__(self, beta: float = 5000.0, lambda_c: float = 1.0, m_max: float = 10.0, gamma: float = 2.0,
                 dfm_normalize: bool = True, sft_weight: float = 0.0) -> None:
        self.beta, self.m_max = coefficient("beta", beta, positive=True), coefficient("m_max", m_max, positive=True)
        self.lambda_c, self.gamma = coefficient("lambda_c", lambda_c), coefficient("gamma", gamma)
        self.dfm_normalize, self.sft_weight = bool(dfm_normalize), coefficient("sft_weight", sft_weight)

    def safety_margin(self, meta: Mapping[str, Any], like: Tensor) -> Tensor:
        if self.lambda_c == 0:
            return torch.zeros_like(like)
        if "cost_w" not in meta or "cost_l" not in meta:
            raise ValueError("objective scdpo: the batch has no cost_w/cost_l; set data.cost_model (or lambda_c=0)")
        gap = (meta["cost_l"].to(like) - meta["cost_w"].to(like)).nan_to_num(0.0)
        return self.lambda_c * gap.clamp(-self.m_max, self.m_max)

    def loss(self, errors: PairErrors, meta: Mapping[str, Any]) -> ObjectiveOutput:
        h = errors.margin(self.beta)
        m = self.safety_margin(meta, h)
        loss, metrics = shifted_margin_loss(h, m, self.gamma, self.dfm_normalize)
        metrics["safety_margin"] = m.detach().mean()
        return ObjectiveOutput(add_sft_term(loss, metrics, errors, self.sft_weight), metrics)
