"""Export LoRA adapters in the diffusers format that the model family's pipeline reads with ``load_lora_weights``
(keys ``unet.*`` for the UNet families, ``transformer.*`` for SD 3 and FLUX), and for the UNet families in the
kohya-ss format that AUTOMATIC1111, ComfyUI and kohya's scripts read: one key scheme for SD 1.x/2.x and SDXL,
``lora_unet_<module path, dots as _>``."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from common.errors import InputError
from common.files import atomic_write
from models.families.base import DEFAULT_FAMILY, FAMILIES, ModelFamily

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Beside the diffusers file; diffusers still picks LORA_WEIGHT_NAME when given only the directory.
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"


def read_lora(path: str | Path, key: str) -> tuple[Path, dict]:
    """The LoRA file at ``path`` (a directory holding it, or the file) and its tensors; an unreadable or
    truncated file is one line naming the config ``key`` and the file."""
    path = Path(path).expanduser()
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    try:
        return file, load_file(str(file))
    except (FileNotFoundError, SafetensorError, OSError) as error:
        raise InputError(f"{key}: cannot read LoRA {file} ({str(error).splitlines()[0]})") from None


def save_lora(denoiser: Any, directory: str | Path, adapter_name: str = "default",
              family: ModelFamily | None = None) -> Path:
    """Write one adapter of the ``family``'s denoiser (SD's UNet by default) to
    ``directory/pytorch_lora_weights.safetensors``, atomically, as the family's pipeline saves LoRAs.

    The adapter's LoRA config (rank, alpha, targets) travels in the file's metadata, so a loader
    applies the same scale as training did.
    """
    family = family or FAMILIES[DEFAULT_FAMILY]
    unet = denoiser
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # peft's own key names for every layer: diffusers' conversion renames only the attention projections, and
    # its loader picks one naming from the file's first key, so a mixed file would lose the other layers
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    metadata = unet.peft_config[adapter_name].to_dict()
    staging = Path(tempfile.mkdtemp(prefix=".lora-", dir=directory))
    try:
        name = family.denoiser_name
        family.pipeline_type.save_lora_weights(save_directory=staging, safe_serialization=True,
                                               **{f"{name}_lora_layers": state, f"{name}_lora_adapter_metadata": metadata})
        target = directory / LORA_WEIGHT_NAME
        os.replace(staging / LORA_WEIGHT_NAME, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def kohya_state_dict(unet: UNet2DConditionModel, adapter_name: str = "default") -> dict[str, Tensor]:
    """One adapter of ``unet`` in kohya-ss keys: per adapted module ``lora_unet_<path, dots as _>`` with
    ``.lora_down.weight`` (peft's A), ``.lora_up.weight`` (B) and ``.alpha``, a scalar with
    ``alpha / rank`` = the scale peft applies (so rslora and per-module ranks or alphas carry over)."""
    state: dict[str, Tensor] = {}
    for name, module in unet.named_modules():
        if adapter_name not in getattr(module, "lora_A", {}):
            continue
        down, up = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = down.detach().float().cpu().contiguous()
        state[f"{key}.lora_up.weight"] = up.detach().float().cpu().contiguous()
        state[f"{key}.alpha"] = torch.tensor(float(module.scaling[adapter_name]) * down.shape[0])
    if not state:
        raise ValueError(f"the UNet has no LoRA adapter named {adapter_name!r}")
    return state


def save_kohya_lora(unet: UNet2DConditionModel, directory: str | Path, adapter_name: str = "default") -> Path:
    """Write one adapter of ``unet`` to ``directory/lora_kohya.safetensors`` in kohya-ss keys, atomically."""
    state = kohya_state_dict(unet, adapter_name)
    config = unet.peft_config[adapter_name]
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
                "ss_network_alpha": str(config.lora_alpha)}
    target = Path(directory) / KOHYA_WEIGHT_NAME
    atomic_write(target, lambda path: save_file(state, str(path), metadata=metadata))
    return target
