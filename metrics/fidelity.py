"""Per-image prompt fidelity ``q(c, x)`` (docs/evaluation.md) and the CLIPScore / FID metrics (docs/evaluation.md).

A fidelity scorer maps ``(prompts, images [N, 3, H, W] in [0, 1])`` to ``q [N]``; UAS divides it by
the base model's mean, so its scale does not matter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from common.images import to_uint8
from data.toy import oracle as toy_oracle
from models.hub import load_error

FidelityScorer = Callable[[Sequence[str], Tensor], Tensor]


class ToyFidelity:
    """The toy world's exact oracle: mean probability of the prompt's three attributes."""

    def __call__(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        return torch.as_tensor(toy_oracle.fidelity(list(prompts), to_uint8(images)), dtype=torch.float64)


class ClipFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_*_features`` return the projected embeddings as tensors, whichever
    transformers version (v5 returns output objects, which torchmetrics' CLIPScore cannot read)."""

    def __init__(self, clip) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self._tensor(self.clip.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self._tensor(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class ClipFidelity:
    """CLIPScore per image, ``max(100 * cos(E_I(x), E_T(c)), 0)``, with any CLIP (a local directory or a
    hub id: the toy CLIP, ``openai/clip-vit-large-patch14``)."""

    def __init__(self, clip: str | Path, device: str | torch.device = "cpu", local_files_only: bool = False) -> None:
        try:
            model = CLIPModel.from_pretrained(str(clip), local_files_only=local_files_only)
            self.processor = CLIPProcessor.from_pretrained(str(clip), local_files_only=local_files_only)
        except (OSError, ValueError) as error:
            raise load_error("CLIPScore clip", clip, error, local_files_only) from None
        self.model = ClipFeatures(model.eval()).to(device)

    def model_and_processor(self):
        """For torchmetrics' ``CLIPScore(model_name_or_path=...)``, which takes a callable."""
        return self.model, self.processor

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        inputs = self.processor(text=list(prompts), images=list(to_uint8(images)), return_tensors="pt",
                                padding=True, truncation=True)
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        image = self.model.get_image_features(inputs["pixel_values"])
        text = self.model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        cos = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)
        return (100 * cos).clamp(min=0).double().cpu()


def clip_score_metric(clip: str | Path):
    """torchmetrics ``CLIPScore`` with any CLIP (its callable form), for the mean over a set."""
    scorer = ClipFidelity(clip)
    return CLIPScore(model_name_or_path=scorer.model_and_processor)


def fid_metric(feature_extractor_weights_path: str | Path | None = None, feature: int | torch.nn.Module = 2048):
    """torchmetrics ``FrechetInceptionDistance``; offline users give the Inception weights file
    (``pt_inception-2015-12-05`` from torch-fidelity) or their own feature ``nn.Module``."""
    if isinstance(feature, int) and feature_extractor_weights_path is not None \
            and not Path(feature_extractor_weights_path).is_file():
        raise FileNotFoundError(f"fid: Inception weights not found: {feature_extractor_weights_path}")
    kwargs = {"feature_extractor_weights_path": str(feature_extractor_weights_path)} \
        if feature_extractor_weights_path is not None else {}
    return FrechetInceptionDistance(feature=feature, normalize=True, **kwargs)
