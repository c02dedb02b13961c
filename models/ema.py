"""An exponential moving average of the trainable weights, kept by a callback and used for the exports."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

import lightning as L
import torch
from torch import Tensor

from common.errors import InputError

log = logging.getLogger(__name__)


def trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimizer updates (LoRA adapters, or the whole UNet), by name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


class EMACallback(L.Callback):
    """After each optimizer step (not each micro-batch under gradient accumulation), move a float32 copy of
    the trainable weights towards them: ``ema = ema + (1 - d_n) * (w - ema)`` at update ``n = 0, 1, ...``.

    ``d_n`` is ``decay``, or with ``warmup`` diffusers' ``EMAModel`` schedule ``min(decay, (1 + n) / (10 + n))``
    (``d_0 = 0``: the first update copies the weights), which lets short runs average their recent steps.
    The average is saved in and restored from the Lightning checkpoint (a resumed run continues it exactly).
    Exports read it through :meth:`swapped`. ``enabled=False`` makes the callback inert, so configs can
    carry it switched off.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, enabled: bool = True) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise InputError(f"callbacks.ema.decay: expected a number in [0, 1), got {decay}")
        self.decay, self.warmup, self.enabled = float(decay), bool(warmup), bool(enabled)
        self.num_updates = 0
        self.shadow: dict[str, Tensor] | None = None
        self._restored: dict[str, Any] | None = None
        self._last_step: int | None = None

    def decay_at(self, n: int) -> float:
        """The decay of update ``n`` (0-based)."""
        if not self.warmup:
            return self.decay
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    # ------------------------------------------------------------ lifecycle
    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Start from the weights as they are (on their device), or from the checkpoint's average."""
        if not self.enabled:
            return
        params = trainable(module)
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}
        if self._restored is not None:
            self._load(self._restored)
            self._restored = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """``global_step`` counts optimizer steps: it moves only on the last micro-batch of an accumulation."""
        if not self.enabled or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        self.update(module)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """One EMA update from the module's current trainable weights."""
        if self.shadow is None:
            raise RuntimeError("EMACallback.update before on_fit_start")
        params = trainable(module)
        names = list(self.shadow)
        weight = 1.0 - self.decay_at(self.num_updates)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names], weight)
        self.num_updates += 1

    # ------------------------------------------------------------- swapping
    @contextmanager
    def swapped(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Inside, the module's trainable weights are the EMA (copied into the same tensors, so optimizer,
        DDP and compiled graphs keep theirs); on exit the training weights are copied back, bit for bit."""
        if not self.enabled or self.shadow is None:
            yield module
            return
        params = trainable(module)
        targets = [params[n].data for n in self.shadow]
        backup = [t.clone() for t in targets]
        try:
            with torch.no_grad():
                torch._foreach_copy_(targets, [s.to(t.dtype) for s, t in zip(self.shadow.values(), targets)])
            yield module
        finally:
            with torch.no_grad():
                torch._foreach_copy_(targets, backup)

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        if not self.enabled or self.shadow is None:
            return {}
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {n: t.detach().cpu().clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning restores callbacks before the model reaches its device (DDP) or after (FSDP): keep the
        state until :meth:`on_fit_start` made the shadow, or copy it in now."""
        if not self.enabled or not state_dict:
            return
        if self.shadow is None:
            self._restored = state_dict
        else:
            self._load(state_dict)

    def _load(self, state: dict[str, Any]) -> None:
        assert self.shadow is not None
        saved = state["shadow"]
        if set(saved) != set(self.shadow) or any(saved[n].shape != t.shape for n, t in self.shadow.items()):
            raise InputError(f"callbacks.ema: the checkpoint's average holds {len(saved)} tensors that do not match "
                             f"this model's {len(self.shadow)} trainable ones (another LoRA config or model?)")
        for name, tensor in self.shadow.items():
            tensor.copy_(saved[name])
        self.num_updates = int(state["num_updates"])
        log.info("EMA restored from the checkpoint (%d updates)", self.num_updates)


def find_ema(trainer: L.Trainer | None) -> EMACallback | None:
    """The trainer's enabled EMA callback, if any."""
    callbacks = getattr(trainer, "callbacks", None) or []
    return next((c for c in callbacks if isinstance(c, EMACallback) and c.enabled), None)
