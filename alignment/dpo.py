"""Diffusion-DPO (Wallace et al. 2023), docs/methods/diffusion-dpo.md."""
from __future__ import annotations

from typing import Any, Literal, Mapping

import torch.nn.functional as F

from alignment.base import Objective, ObjectiveOutput, PairErrors, add_sft_term, coefficient, preference_metrics

LossType = Literal["sigmoid", "hinge", "ipo"]


class DPO(Objective):
    """``sigmoid``: ``-log sigmoid(h)``; ``hinge``: ``relu(1 - h)``; ``ipo``: ``(-(d_w - d_l) - 1/(2 beta))^2``.

    ``sft_weight`` adds ``sft_weight * mean(e_theta(x_w))``, the ``sft`` loss on the winners as a
    regularizer (docs/methods/diffusion-dpo.md): preference losses alone can be lowered by pushing the loser away without
    learning the winner, which on safety pairs leaves harmful prompts drawing something else broken.
    """

    def __init__(self, beta: float = 5000.0, loss_type: LossType = "sigmoid", sft_weight: float = 0.0) -> None:
        if loss_type not in ("sigmoid", "hinge", "ipo"):
            raise ValueError(f"objective.loss_type: expected one of sigmoid, hinge, ipo, got {loss_type!r}")
        self.beta = coefficient("beta", beta, positive=True)
        self.loss_type = loss_type
        self.sft_weight = coefficient("sft_weight", sft_weight)

    def loss(self, errors: PairErrors, meta: Mapping[str, Any]) -> ObjectiveOutput:
        h = errors.margin(self.beta)
        if self.loss_type == "sigmoid":
            per_pair = -F.logsigmoid(h)
        elif self.loss_type == "hinge":
            per_pair = F.relu(1 - h)
        else:
            per_pair = (-errors.delta() - 1 / (2 * self.beta)) ** 2
        loss, metrics = per_pair.mean(), preference_metrics(h)
        return ObjectiveOutput(add_sft_term(loss, metrics, errors, self.sft_weight), metrics)
