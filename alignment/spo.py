"""T2I-SPO, Synergistic Preference Optimization on a composite safety+quality reward (docs/methods/spo.md)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from alignment.base import Objective, ObjectiveOutput, PairErrors, add_sft_term, coefficient
from alignment.scdpo import shifted_margin_loss


class SPO(Objective):
    """``L = mean(w * -log sigmoid(h - eta * (R_w - R_l))) + alpha * mean(e_theta(x_w))``.

    ``R = w_q * q - w_s * s`` is each image's composite reward, set when the pairs are built
    (``data.readers.dual``) and carried as ``reward_w``/``reward_l``: a pair whose winner is much better must
    be separated by a larger implicit margin. ``w`` is the Dynamic Focusing weight of ``scdpo`` on the
    same shifted margin; the ``alpha`` term keeps winners likely (quality preservation).
    ``eta = gamma = alpha = 0`` is ``dpo`` with the sigmoid loss.
    """

    def __init__(self, beta: float = 5000.0, eta: float = 1.0, gamma: float = 0.0, alpha: float = 0.0,
                 dfm_normalize: bool = True) -> None:
        self.beta, self.eta = coefficient("beta", beta, positive=True), coefficient("eta", eta)
        self.gamma, self.alpha = coefficient("gamma", gamma), coefficient("alpha", alpha)
        self.dfm_normalize = bool(dfm_normalize)

    def reward_margin(self, meta: Mapping[str, Any], like: torch.Tensor) -> torch.Tensor:
        """``eta * (R_w - R_l)`` per pair (zero where a pair has no rewards)."""
        if self.eta == 0:
            return torch.zeros_like(like)
        if "reward_w" not in meta or "reward_l" not in meta:
            raise ValueError("objective spo: the batch has no reward_w/reward_l; use dual-annotated data "
                             "(data=dual, or the toy world's data.reader.kind=dual) or eta=0")
        gap = (meta["reward_w"].to(like) - meta["reward_l"].to(like)).nan_to_num(0.0)
        return self.eta * gap

    def loss(self, errors: PairErrors, meta: Mapping[str, Any]) -> ObjectiveOutput:
        h = errors.margin(self.beta)
        m = self.reward_margin(meta, h)
        loss, metrics = shifted_margin_loss(h, m, self.gamma, self.dfm_normalize)
        metrics["reward_margin"] = m.detach().mean()
        return ObjectiveOutput(add_sft_term(loss, metrics, errors, self.alpha), metrics)
