"""Supervised fine-tuning: the plain diffusion loss on target images (docs/methods/diffusion-dpo.md)."""
from __future__ import annotations

from typing import Any, Mapping

from alignment.base import Objective, ObjectiveOutput, PairErrors


class SFT(Objective):
    """``L = mean(e_theta(x_w))``: pretrains a base model or fine-tunes it on preferred images."""

    uses_losers = False
    uses_reference = False

    def loss(self, errors: PairErrors, meta: Mapping[str, Any]) -> ObjectiveOutput:
        return ObjectiveOutput(errors.policy_w.mean())
