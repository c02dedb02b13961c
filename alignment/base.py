"""The contract between the training loop and every alignment objective.

An objective sees only per-sample denoising errors (docs/methods/diffusion-dpo.md) and per-pair metadata; it never
touches a model. That keeps each loss a pure function that tests can check by hand, and lets a new
objective plug in by ``_target_`` without a change to the training loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor


@dataclass
class PairErrors:
    """Per-sample errors ``e(x) = mean_{C,H,W} (unet(z_t, t, c) - y)^2``, each of shape ``[B]``.

    ``policy_l``, ``ref_w`` and ``ref_l`` are ``None`` when the objective did not ask for them.
    ``drift_w``/``drift_l`` are ``mean_{C,H,W} (unet_theta - unet_ref)^2``, how far the policy's prediction
    moved from the reference's on the same input; only the benign anchor (:func:`benign_drift`) asks for them.
    """

    policy_w: Tensor
    policy_l: Tensor | None = None
    ref_w: Tensor | None = None
    ref_l: Tensor | None = None
    drift_w: Tensor | None = None
    drift_l: Tensor | None = None

    def select(self, keep: Tensor) -> "PairErrors":
        """The errors of the pairs where the boolean mask ``keep`` is true."""
        return PairErrors(**{k: None if v is None else v[keep] for k, v in vars(self).items()})

    def margin(self, beta: float) -> Tensor:
        """Implicit reward margin ``h = -(beta / 2) * (d_w - d_l)``."""
        return -(beta / 2) * self.delta()

    def delta(self) -> Tensor:
        """``d_w - d_l`` with ``d = e_theta - e_ref``."""
        if self.policy_l is None or self.ref_w is None or self.ref_l is None:
            raise ValueError("this objective needs losers and reference errors, but the batch has none")
        return (self.policy_w - self.ref_w) - (self.policy_l - self.ref_l)


@dataclass
class ObjectiveOutput:
    """A scalar loss to minimize and detached scalars to log (names without a stage prefix)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Objective:
    """Base class: subclasses implement :meth:`loss` and say which errors they need.

    ``uses_losers`` and ``uses_reference`` let the training loop skip UNet passes an objective does
    not read (``sft`` needs neither).
    """

    uses_losers: bool = True
    uses_reference: bool = True

    def loss(self, errors: PairErrors, meta: Mapping[str, Any]) -> ObjectiveOutput:
        raise NotImplementedError

    def __call__(self, errors: PairErrors, meta: Mapping[str, Any] | None = None) -> ObjectiveOutput:
        out = self.loss(errors, meta or {})
        out.metrics = {"loss": out.loss.detach(), **_standard_metrics(errors), **out.metrics}
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def coefficient(name: str, value: Any, positive: bool = False) -> float:
    """``objective.<name>`` as a finite float, ``> 0`` when ``positive`` else ``>= 0``; one-line ValueError otherwise
    (NaN passes a plain ``value <= 0`` test)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value <= 0 if positive else value < 0):
        raise ValueError(f"objective.{name}: expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _standard_metrics(errors: PairErrors) -> dict[str, Tensor]:
    """The per-step diagnostics of docs/methods/diffusion-dpo.md that do not depend on the objective."""
    out = {"mse_w": errors.policy_w.detach().mean()}
    if errors.policy_l is not None:
        out["mse_l"] = errors.policy_l.detach().mean()
    refs = [e for e in (errors.ref_w, errors.ref_l) if e is not None]
    if refs:
        out["ref_mse"] = torch.cat([e.detach() for e in refs]).mean()
    return out


def add_sft_term(loss: Tensor, metrics: dict[str, Tensor], errors: PairErrors, weight: float) -> Tensor:
    """``loss + weight * mean(e_theta(x_w))``: the ``sft`` loss on winners as a regularizer (docs/methods/diffusion-dpo.md);
    logs it as ``sft_term``. Returns ``loss`` unchanged when ``weight`` is 0."""
    if not weight:
        return loss
    sft = errors.policy_w.mean()
    metrics["sft_term"] = sft.detach()
    return loss + weight * sft


def select_meta(meta: Mapping[str, Any], keep: Tensor) -> dict[str, Any]:
    """Per-pair metadata of the pairs where ``keep`` is true (tensors indexed, lists filtered)."""
    rows = keep.nonzero().flatten().tolist()
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if isinstance(value, Tensor):
            value = value[keep.to(value.device)]
        elif isinstance(value, list):
            value = [value[i] for i in rows]
        out[key] = value
    return out


def anchor_flags(meta: Mapping[str, Any], n: int, device: torch.device) -> Tensor:
    """``meta["anchor"]``: pairs served only to hold the model still (``data.anchor_others``); none by default."""
    flags = meta.get("anchor")
    return torch.zeros(n, dtype=torch.bool, device=device) if flags is None else flags.to(device=device, dtype=torch.bool)


def benign_mask(meta: Mapping[str, Any], n: int, device: torch.device) -> Tensor:
    """Pairs the benign anchor holds at the reference: those whose prompt involves no harm category
    (``meta["categories"]`` empty: quality pairs under clean prompts, benign groups of dual-annotated data;
    a batch without categories counts as all benign) and anchor pairs (:func:`anchor_flags`)."""
    categories = meta.get("categories")
    if categories is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    clean = torch.tensor([not c for c in categories], dtype=torch.bool, device=device)
    return clean | anchor_flags(meta, n, device)


def benign_drift(errors: PairErrors, meta: Mapping[str, Any]) -> Tensor:
    """Mean prediction drift from the reference over the winners and losers of benign pairs (0 when the
    batch has none): a regularizer that keeps what the model does for harmless prompts where it was, so
    the safety update stays on the harmful concepts (the "anchor"/"preservation" loss of concept-erasure
    methods, applied to any objective)."""
    if errors.drift_w is None:
        raise ValueError("benign_drift needs drift_w (the training loop computes it when the anchor weight is > 0)")
    keep = benign_mask(meta, errors.drift_w.shape[0], errors.drift_w.device)
    drifts = [errors.drift_w] + ([errors.drift_l] if errors.drift_l is not None else [])
    per_pair = torch.stack(drifts).mean(0)
    return (per_pair * keep).sum() / keep.sum().clamp(min=1)


def preference_metrics(h: Tensor) -> dict[str, Tensor]:
    """Diagnostics of an implicit reward margin ``h``."""
    h = h.detach()
    return {"implicit_acc": (h > 0).float().mean(), "margin": h.mean()}
