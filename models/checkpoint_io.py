"""Checkpoint files that a kill can never leave half-written, loaded without unpickling code."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from data.errors import InputError


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
        if not Path(path).is_file() and "://" not in str(path):
            raise InputError(f"ckpt_path: checkpoint {path} not found")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except (RuntimeError, EOFError, OSError) as error:
            raise InputError(f"ckpt_path: cannot read checkpoint {path} ({str(error).splitlines()[0]})") from None
