"""Which kernel ``scaled_dot_product_attention`` runs in the UNet (``model.attention_backend``).

PyTorch tries flash, memory-efficient, math and cuDNN attention in that order. On Hopper GPUs cuDNN's
kernels are reported faster for training shapes, so the config can put one backend first; the others stay
allowed behind it, so a shape the chosen kernel cannot serve still runs.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from torch.nn.attention import SDPBackend, sdpa_kernel

from common.errors import InputError

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def check_attention_backend(name: str | None, key: str = "model.attention_backend") -> str | None:
    """``name`` if it is null or a known backend, else an :class:`InputError` naming ``key``."""
    if name is not None and name not in SDPA_BACKENDS:
        raise InputError(f"{key}: expected null or one of {sorted(SDPA_BACKENDS)}, got {name!r}")
    return name


def attention_backend(name: str | None) -> AbstractContextManager:
    """A context in which ``name`` is the first choice of every attention call (null: PyTorch's order)."""
    if name is None:
        return nullcontext()
    first = SDPA_BACKENDS[name]
    return sdpa_kernel([first] + [b for b in SDPA_BACKENDS.values() if b != first], set_priority=True)
