"""Image tensors as arrays: the one conversion every scorer, grid and saved PNG uses."""
from __future__ import annotations

import numpy as np
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [0, 1] -> ``[N, H, W, 3]`` uint8."""
    return (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
