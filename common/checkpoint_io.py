"""Checkpoint files that a kill can never leave half-written, loaded without unpickling code."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from common.errors import InputError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the checkpoint's own directory, fsync, then rename over the target.

    Lightning's default stages the file in the system temp directory and moves it, which is a copy (not
    atomic) when that is another filesystem; a SIGKILL during the copy leaves a truncated ``last.ckpt``.
    Local paths only; remote URLs fall back to Lightning's fsspec transaction.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(staging, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)

    def load_checkpoint(self, path: _PATH, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Tensors and plain containers only (``weights_only=True``); a damaged file is one line naming it."""
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return read_checkpoint(Path(path), "ckpt_path", map_location)


def read_checkpoint(path: Path, key: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True``: a missing, truncated or foreign file, or one holding objects
    that unpickling would have to construct (which could run code), is one line naming ``key`` and the file."""
    if not Path(path).is_file():
        raise InputError(f"{key}: checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap or None)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        text = str(error)
        if "GLOBAL" in text or "global" in text.split("WeightsUnpickler error", 1)[-1]:
            raise InputError(f"{key}={path}: holds objects other than tensors and plain containers; not loaded "
                             "(unpickling them could run code)") from None
        raise InputError(f"{key}={path}: not a checkpoint (unreadable, truncated or another format)") from None
