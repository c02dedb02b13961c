"""Policy and reference in one UNet forward, through peft's mixed-adapter batches.

peft's LoRA layers take an ``adapter_names`` forward argument (one name per sample, ``"__base__"`` for
"adapters off") and apply each adapter to its own samples only. A diffusers UNet does not pass that
argument down, so each LoRA layer gets a forward pre-hook that adds it while :meth:`MixedAdapterBatch.assign`
is active. The hooks are registered once, so a compiled UNet sees the same modules every step.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from peft.tuners.lora import LoraLayer
from torch import nn

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


class MixedAdapterBatch:
    """Routes sample ``i`` of every forward through adapter ``names[i]`` inside :meth:`assign`."""

    def __init__(self, model: nn.Module) -> None:
        assigned: list[list[str] | None] = [None]

        # A plain closure, not a bound method: deep copies of the model share it instead of copying this object.
        def add_adapter_names(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
            if assigned[0] is None:
                return None
            return args, {**kwargs, "adapter_names": assigned[0]}

        self._assigned = assigned
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        if not layers:
            raise ValueError(f"{type(model).__name__} has no LoRA layers to route a mixed batch through")
        for layer in layers:
            layer.register_forward_pre_hook(add_adapter_names, with_kwargs=True)

    @contextmanager
    def assign(self, names: list[str]) -> Iterator[None]:
        self._assigned[0] = list(names)
        try:
            yield
        finally:
            self._assigned[0] = None
