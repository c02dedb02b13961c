"""Load CLIP towers from either a full ``CLIPModel`` checkpoint or a tower-only one."""
from __future__ import annotations

from pathlib import Path

from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection, PretrainedConfig


def load_clip_vision(clip: str | Path, **kwargs) -> CLIPVisionModelWithProjection:
    """The image tower with its projection. A full ``CLIPModel`` checkpoint (``openai/clip-vit-large-patch14``,
    the toy CLIP) keeps ``projection_dim`` at its top level, which the tower's own config would miss."""
    config: PretrainedConfig = PretrainedConfig.get_config_dict(str(clip), **kwargs)[0]
    if config.get("model_type") == "clip":
        full = CLIPConfig.from_pretrained(str(clip), **kwargs)
        vision = CLIPVisionConfig(**full.vision_config.to_dict())
        vision.projection_dim = full.projection_dim
        return CLIPVisionModelWithProjection.from_pretrained(str(clip), config=vision, **kwargs)
    return CLIPVisionModelWithProjection.from_pretrained(str(clip), **kwargs)
