"""Merging a UNet's LoRA experts into one new adapter: Co-Merge and peft's weighted-adapter baselines.

Co-Merge: for each expert the UNet runs the calibration batches with that expert alone active while
forward hooks on every LoRA layer record the mean absolute input activation per input feature
(``mu_k``; per input channel for a conv layer, repeated over its kernel positions). The per-layer math is
``alignment.co_merge``, on conv layers flattened; the result becomes a new adapter of rank ``r*``.
The baselines (docs/methods/safetydpo.md) are peft's ``LoraModel.add_weighted_adapter``, run on the same UNet.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, Sequence

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel
from torch import Tensor

from alignment.co_merge import LoraFactors, co_merge_layer, kernel_activations
from common.errors import InputError

log = logging.getLogger(__name__)


def lora_layers(model: torch.nn.Module, adapter: str) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def expert_factors(layer: LoraLayer, adapter: str) -> LoraFactors:
    """The layer's A and B of ``adapter`` as matrices (a conv layer's flattened), in float64 on the CPU."""
    r = layer.r[adapter]
    alpha = layer.scaling[adapter] * r  # peft stores alpha / r (or alpha / sqrt(r) with rsLoRA) as scaling
    return LoraFactors.from_weights(layer.lora_A[adapter].weight.detach().double().cpu(),
                                    layer.lora_B[adapter].weight.detach().double().cpu(), alpha)


def _kernel_positions(layer: LoraLayer, adapter: str) -> int:
    """1 for a linear layer; the number of positions of the kernel (``kh * kw``) for a conv layer."""
    return int(layer.lora_A[adapter].weight[0, 0].numel())


@torch.no_grad()
def input_activation_means(model: torch.nn.Module, adapter: str, run_calibration: Callable[[], None]) -> dict[str, Tensor]:
    """``mu[layer][j] = E|h_j|`` over every position of every calibration input, with ``adapter`` alone active;
    ``j`` indexes the columns of the layer's update as :func:`expert_factors` gives it (for a conv layer, input
    channel then kernel position: the channel's mean over the batch and the spatial positions)."""
    layers = lora_layers(model, adapter)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        conv = layers[name].lora_A[adapter].weight.ndim > 2

        def record(module, inputs, output) -> None:
            x = inputs[0].detach().abs().double()
            x = x.movedim(1, -1) if conv else x  # conv inputs are [batch, channels, *spatial]
            x = x.reshape(-1, x.shape[-1])
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
    return {name: kernel_activations(sums[name] / counts[name], _kernel_positions(layer, adapter))
            for name, layer in layers.items()}


def co_merge_adapters(model: torch.nn.Module, experts: Sequence[str], run_calibration: Callable[[], None],
                      merged_name: str = "merged", rank: int | None = None) -> dict[str, float]:
    """Add adapter ``merged_name`` = Co-Merge of ``experts``; returns the relative SVD error per layer
    (and ``mean``/``max``). Experts must adapt the same layers with the same shapes."""
    layer_sets = {e: lora_layers(model, e) for e in experts}
    names = set(layer_sets[experts[0]])
    for e in experts[1:]:
        if set(layer_sets[e]) != names:
            raise ValueError(f"co-merge: experts {experts[0]!r} and {e!r} adapt different layers")
    for name, layer in layer_sets[experts[0]].items():
        groups = getattr(layer.get_base_layer(), "groups", 1)
        if groups != 1:
            raise InputError(f"co-merge: layer {name} is a grouped convolution (groups={groups}); Co-Merge merges "
                             "linear and ungrouped conv LoRA layers only")
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
            # conv: A [r*, in, *kernel] and B [out, r*, 1, ...] take the flattened factors through views
            down.view(down.shape[0], -1)[:r], up.view(up.shape[0], -1)[:, :r] = merged.factors.down, merged.factors.up
            layer.lora_A[merged_name].weight.copy_(down)
            layer.lora_B[merged_name].weight.copy_(up)
            errors[name] = merged.relative_error
    values = list(errors.values())
    errors["mean"], errors["max"] = sum(values) / len(values), max(values)
    log.info("co-merge of %s: rank %d, relative SVD error mean %.3g max %.3g", list(experts), r_star,
             errors["mean"], errors["max"])
    return errors


# combination types of peft's add_weighted_adapter compared in docs/methods/safetydpo.md (all but cat end in one SVD)
PEFT_METHODS = ("linear", "cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("co_merge",) + PEFT_METHODS


def peft_merge_adapters(model: torch.nn.Module, experts: Sequence[str], method: str, merged_name: str = "merged",
                        rank: int | None = None, weights: Sequence[float] | None = None,
                        density: float = 0.5) -> None:
    """Add adapter ``merged_name`` with ``LoraModel.add_weighted_adapter(combination_type=method)``.

    A diffusers UNet carries its adapters without being a peft ``LoraModel``; peft's documented way to
    reach its tuner methods on such a model is a ``LoraModel`` built over it, which shares the model's
    ``peft_config``. Building one injects an adapter, so it gets a throwaway one that is deleted again.
    ``rank`` (the ``*_svd`` methods) defaults to the sum of the experts' ranks, Co-Merge's ``r*``.
    """
    if method not in PEFT_METHODS:
        raise InputError(f"merge.method: {method!r} is not a peft combination; available: {', '.join(PEFT_METHODS)}")
    ranks = [model.peft_config[e].r for e in experts]
    if method == "linear" and len(set(ranks)) > 1:
        raise InputError(f"merge.method=linear needs experts of one rank; got ranks {ranks} (use svd or cat)")
    weights = [1.0] * len(experts) if weights is None else [float(w) for w in weights]
    if len(weights) != len(experts):
        raise InputError(f"merge.weights: {len(weights)} weights for {len(experts)} experts")
    targets = sorted(set().union(*(model.peft_config[e].target_modules for e in experts)))
    host = "_weighted_merge_host"
    with warnings.catch_warnings():  # peft warns that the model already has adapters: that is the point
        warnings.simplefilter("ignore")
        tuner = LoraModel(model, LoraConfig(r=1, target_modules=targets), host)
        tuner.delete_adapter(host)
    tuner.add_weighted_adapter(list(experts), weights, merged_name, combination_type=method,
                               svd_rank=rank or sum(ranks), density=density)
    log.info("%s merge of %s: rank %d", method, list(experts), model.peft_config[merged_name].r)


def merge_adapters(model: torch.nn.Module, experts: Sequence[str], method: str,
                   run_calibration: Callable[[], None] | None = None, merged_name: str = "merged",
                   rank: int | None = None, weights: Sequence[float] | None = None,
                   density: float = 0.5) -> dict[str, float]:
    """Add ``merged_name`` by ``method`` (one of :data:`METHODS`); returns Co-Merge's SVD errors (else empty)."""
    if method == "co_merge":
        if run_calibration is None:
            raise ValueError("co_merge needs calibration forward passes")
        return co_merge_adapters(model, experts, run_calibration, merged_name, rank)
    if method not in METHODS:
        raise InputError(f"merge.method: unknown method {method!r}; available: {', '.join(METHODS)}")
    peft_merge_adapters(model, experts, method, merged_name, rank, weights, density)
    return {}
