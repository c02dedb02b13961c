"""Co-Merge on a peft-adapted UNet: calibration hooks, per-layer merge, and the merged adapter.

For each expert the UNet runs the calibration batches with that expert alone active while forward
hooks on every LoRA layer record the mean absolute input activation per input feature (``mu_k``).
The per-layer math is ``alignment.merging``; the result becomes a new peft adapter of rank ``r*``.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import Tensor

from alignment.merging import LoraFactors, co_merge_layer

log = logging.getLogger(__name__)


def lora_layers(model: torch.nn.Module, adapter: str) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def expert_factors(layer: LoraLayer, adapter: str) -> LoraFactors:
    r = layer.r[adapter]
    alpha = layer.scaling[adapter] * r  # peft stores alpha / r (or alpha / sqrt(r) with rsLoRA) as scaling
    return LoraFactors(down=layer.lora_A[adapter].weight.detach().double().cpu(),
                       up=layer.lora_B[adapter].weight.detach().double().cpu(), alpha=float(alpha))


@torch.no_grad()
def input_activation_means(model: torch.nn.Module, adapter: str, run_calibration: Callable[[], None]) -> dict[str, Tensor]:
    """``mu[layer][j] = E|h_j|`` over every position of every calibration input, with ``adapter`` alone active."""
    layers = lora_layers(model, adapter)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(module, inputs, output) -> None:
            x = inputs[0].detach().abs().double().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.sum(0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    previous = getattr(model, "active_adapters", None)
    previous = previous() if callable(previous) else previous
    try:
        model.set_adapter(adapter)
        run_calibration()
    finally:
        for handle in handles:
            handle.remove()
        if previous:
            model.set_adapter(previous)
    missing = sorted(set(layers) - set(sums))
    if missing:
        raise RuntimeError(f"co-merge calibration never reached {len(missing)} LoRA layer(s), e.g. {missing[0]}")
    return {name: sums[name] / counts[name] for name in layers}


def co_merge_adapters(model: torch.nn.Module, experts: Sequence[str], run_calibration: Callable[[], None],
                      merged_name: str = "merged", rank: int | None = None) -> dict[str, float]:
    """Add adapter ``merged_name`` = Co-Merge of ``experts``; returns the relative SVD error per layer
    (and ``mean``/``max``). Experts must adapt the same layers with the same shapes."""
    layer_sets = {e: lora_layers(model, e) for e in experts}
    names = set(layer_sets[experts[0]])
    for e in experts[1:]:
        if set(layer_sets[e]) != names:
            raise ValueError(f"co-merge: experts {experts[0]!r} and {e!r} adapt different layers")
    activations = {e: input_activation_means(model, e, run_calibration) for e in experts}
    r_star = rank if rank is not None else sum(next(iter(layer_sets[e].values())).r[e] for e in experts)
    first = model.peft_config[experts[0]]
    model.add_adapter(LoraConfig(r=r_star, lora_alpha=r_star, target_modules=list(first.target_modules),
                                 init_lora_weights=False), adapter_name=merged_name)
    errors: dict[str, float] = {}
    with torch.no_grad():
        for name in sorted(names):
            layer = layer_sets[experts[0]][name]
            merged = co_merge_layer([expert_factors(layer, e) for e in experts],
                                    [activations[e][name] for e in experts], r_star)
            r = merged.factors.rank  # below r_star when the layer is smaller: pad with zeros, exact
            down = torch.zeros_like(layer.lora_A[merged_name].weight, dtype=torch.float64)
            up = torch.zeros_like(layer.lora_B[merged_name].weight, dtype=torch.float64)
            down[:r], up[:, :r] = merged.factors.down, merged.factors.up
            layer.lora_A[merged_name].weight.copy_(down)
            layer.lora_B[merged_name].weight.copy_(up)
            errors[name] = merged.relative_error
    values = list(errors.values())
    errors["mean"], errors["max"] = sum(values) / len(values), max(values)
    log.info("co-merge of %s: rank %d, relative SVD error mean %.3g max %.3g", list(experts), r_star,
             errors["mean"], errors["max"])
    return errors
