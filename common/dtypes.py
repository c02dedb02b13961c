"""Dtype names as configs spell them, read into torch dtypes with the project's one-line error."""
from __future__ import annotations

import torch

from common.errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, key: str) -> torch.dtype:
    """``DTYPES[name]``, or an :class:`InputError` naming the config ``key`` and the names it takes."""
    if name not in DTYPES:
        raise InputError(f"{key}: expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]
