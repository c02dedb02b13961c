"""Export LoRA adapters in the diffusers format that ``StableDiffusionPipeline.load_lora_weights`` reads."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def read_lora(path: str | Path, key: str) -> tuple[Path, dict]:
    """The LoRA file at ``path`` (a directory holding it, or the file) and its tensors; an unreadable or
    truncated file is one line naming the config ``key`` and the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from data.errors import InputError

    path = Path(path).expanduser()
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    try:
        return file, load_file(str(file))
    except (FileNotFoundError, SafetensorError, OSError) as error:
        raise InputError(f"{key}: cannot read LoRA {file} ({str(error).splitlines()[0]})") from None


def save_unet_lora(unet: UNet2DConditionModel, directory: str | Path, adapter_name: str = "default") -> Path:
    """Write one adapter of ``unet`` to ``directory/pytorch_lora_weights.safetensors``, atomically.

    The adapter's LoRA config (rank, alpha, targets) travels in the file's metadata, so a loader
    applies the same scale as training did.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter_name))
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    metadata = unet.peft_config[adapter_name].to_dict()
    staging = Path(tempfile.mkdtemp(prefix=".lora-", dir=directory))
    try:
        StableDiffusionPipeline.save_lora_weights(
            save_directory=staging,
            unet_lora_layers=state,
            unet_lora_adapter_metadata=metadata,
            safe_serialization=True,
        )
        target = directory / LORA_WEIGHT_NAME
        os.replace(staging / LORA_WEIGHT_NAME, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
