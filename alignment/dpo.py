"""Diffusion-DPO (Wallace et al. 2023), SPEC 1.2."""
from __future__ import annotations

from typing import Any, Literal, Mapping

import torch.nn.functional as F

from alignment.base import Objective, ObjectiveOutput, PairErrors, preference_metrics

LossType = Literal["sigmoid", "hinge", "ipo"]


class DPO(Objective):
    """``sigmoid``: ``-log sigmoid(h)``; ``hinge``: ``relu(1 - h)``; ``ipo``: ``(-(d_w - d_l) - 1/(2 beta))^2``."""

    def __init__(self, beta: float = 5000.0, loss_type: LossType = "sigmoid") -> None:
        if loss_type not in ("sigmoid", "hinge", "ipo"):
            raise ValueError(f"objective.loss_type: expected one of sigmoid, hinge, ipo, got {loss_type!r}")
        if beta <= 0:
            raise ValueError(f"objective.beta: expected a positive number, got {beta}")
        self.beta = float(beta)
        self.loss_type = loss_type

    def loss(self, errors: PairErrors, meta: Mapping[str, Any]) -> ObjectiveOutput:
        h = errors.margin(self.beta)
        if self.loss_type == "sigmoid":
            per_pair = -F.logsigmoid(h)
        elif self.loss_type == "hinge":
            per_pair = F.relu(1 - h)
        else:
            per_pair = (-errors.delta() - 1 / (2 * self.beta)) ** 2
        return ObjectiveOutput(per_pair.mean(), preference_metrics(h))
