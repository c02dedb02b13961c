"""Co-Merge of LoRA safety experts (docs/methods/safetydpo.md), as pure tensor math on one adapted layer at a time.

Per layer, expert ``k`` contributes ``dW_k = (alpha_k / r_k) B_k A_k`` and a calibration statistic
``mu_k[j] = E|h_j|``, the mean absolute input activation of feature ``j`` with expert ``k`` alone active.
Each weight goes to the expert with the strongest activation-weighted update
``a_k[i, j] = |dW_k[i, j]| * mu_k[j]``; the merged update is brought back to a LoRA of rank ``r*`` by
truncated SVD. Collecting ``mu_k`` needs the model (``models/`` does it with forward hooks).

A conv LoRA layer (A a conv ``[r, in, *kernel]``, B a 1x1 conv ``[out, r, 1, ...]``) enters flattened: its update
is the matrix ``[out, in * prod(kernel)]`` (columns: input channel, then kernel position), and the statistic of
a column is its input channel's ``E|h_c|`` (:func:`kernel_activations`); the merged factors reshape back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class LoraFactors:
    """One layer of one LoRA: ``down`` (A, ``[r, in]``), ``up`` (B, ``[out, r]``) and ``alpha`` (a conv layer's
    factors flattened, :meth:`from_weights`)."""

    down: Tensor
    up: Tensor
    alpha: float

    @classmethod
    def from_weights(cls, down: Tensor, up: Tensor, alpha: float) -> "LoraFactors":
        """From a LoRA layer's weights: linear A ``[r, in]`` and B ``[out, r]`` as they are; conv A
        ``[r, in, *kernel]`` flattened to ``[r, in * prod(kernel)]`` and 1x1 conv B ``[out, r, 1, ...]`` to ``[out, r]``."""
        if up.ndim > 2 and any(size != 1 for size in up.shape[2:]):
            raise ValueError(f"co_merge: LoRA B of shape {tuple(up.shape)} is not a 1x1 convolution")
        return cls(down=down.reshape(down.shape[0], -1), up=up.reshape(up.shape[0], up.shape[1]), alpha=float(alpha))

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> Tensor:
        """``dW = (alpha / r) B A``, ``[out, in]``."""
        return (self.alpha / self.rank) * (self.up.double() @ self.down.double())


@dataclass(frozen=True)
class MergedLayer:
    factors: LoraFactors
    winners: Tensor            # [out, in]: index of the expert each weight came from
    relative_error: float      # ||dW* - B* A* (alpha*/r*)||_F / ||dW*||_F


def kernel_activations(channel_means: Tensor, kernel_positions: int) -> Tensor:
    """A conv layer's per-input-channel ``E|h_c|`` ``[in]`` as the statistic of each column of its flattened
    update ``[out, in * kernel_positions]``: each channel's value repeated over its kernel positions (the
    zero padding at the borders is not counted apart)."""
    return channel_means.repeat_interleave(int(kernel_positions))


def co_merge_delta(deltas: Sequence[Tensor], activations: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per weight, the update of the expert with the largest ``|dW_k[i, j]| * mu_k[j]``; returns the merged
    ``dW*`` and the winner index per weight (ties go to the lower expert index)."""
    if not deltas or len(deltas) != len(activations):
        raise ValueError(f"co_merge: need one activation vector per expert, got {len(deltas)} updates and {len(activations)}")
    shape = deltas[0].shape
    for k, (d, mu) in enumerate(zip(deltas, activations)):
        if d.shape != shape:
            raise ValueError(f"co_merge: expert {k} has an update of shape {tuple(d.shape)}, expert 0 {tuple(shape)}")
        if mu.shape != (shape[1],):
            raise ValueError(f"co_merge: expert {k} activations have shape {tuple(mu.shape)}, expected ({shape[1]},)")
    stacked = torch.stack([d.double() for d in deltas])                               # [K, out, in]
    strength = stacked.abs() * torch.stack([mu.double().abs() for mu in activations])[:, None, :]
    winners = strength.argmax(dim=0)                                                  # first max on ties
    merged = torch.gather(stacked, 0, winners[None]).squeeze(0)
    return merged, winners


def to_lora(delta: Tensor, rank: int) -> tuple[LoraFactors, float]:
    """Truncated SVD ``dW ~ U_r S_r V_r^T``, ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``, ``alpha = r``
    (so the LoRA scale ``alpha / r`` is 1); also the relative Frobenius reconstruction error."""
    out_features, in_features = delta.shape
    rank = max(1, min(int(rank), out_features, in_features))
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    norm = torch.linalg.matrix_norm(delta.double())
    error = torch.linalg.matrix_norm(delta.double() - up @ down)
    relative = float(error / norm) if norm > 0 else 0.0
    return LoraFactors(down=down, up=up, alpha=float(rank)), relative


def co_merge_layer(experts: Sequence[LoraFactors], activations: Sequence[Tensor], rank: int | None = None) -> MergedLayer:
    """Co-Merge one layer; ``rank`` defaults to the sum of the experts' ranks (capped by the layer size)."""
    merged, winners = co_merge_delta([e.delta() for e in experts], activations)
    r = rank if rank is not None else sum(e.rank for e in experts)
    factors, error = to_lora(merged, r)
    return MergedLayer(factors, winners, error)
