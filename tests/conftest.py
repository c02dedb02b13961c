"""Shared fixtures: a tiny random Stable Diffusion pipeline saved in diffusers layout, and toy images."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import workflows.cli  # noqa: E402,F401 - registers the config schema and the ${repo:...} resolver


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    from models.builders import build_components, save_components

    directory = tmp_path_factory.mktemp("tiny_sd")
    words = ["a", "red", "blue", "green", "circle", "square", "photo", "of"]
    save_components(build_components(directory / "_build", words=words), directory / "pipeline")
    return directory / "pipeline"


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny random SDXL pipeline (two text encoders, text_time added conditioning) in diffusers layout."""
    from models.builders import build_sdxl_components, save_components

    directory = tmp_path_factory.mktemp("tiny_sdxl")
    words = ["a", "red", "blue", "green", "circle", "square", "photo", "of"]
    save_components(build_sdxl_components(directory / "_build", words=words), directory / "pipeline")
    return directory / "pipeline"


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    """A tiny random SD 3 pipeline (two CLIP encoders with projection, T5 with 16 tokens, an MMDiT transformer,
    the flow-matching scheduler) in diffusers layout."""
    from models.builders import build_sd3_components, save_components

    directory = tmp_path_factory.mktemp("tiny_sd3")
    words = ["a", "red", "blue", "green", "circle", "square", "photo", "of"]
    save_components(build_sd3_components(directory / "_build", words=words), directory / "pipeline")
    return directory / "pipeline"


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    """A tiny random FLUX pipeline (CLIP pooled + T5 with 16 tokens, a guidance-embedding transformer on packed
    latents, the resolution-dependent flow-matching scheduler) in diffusers layout."""
    from models.builders import build_flux_components, save_components

    directory = tmp_path_factory.mktemp("tiny_flux")
    words = ["a", "red", "blue", "green", "circle", "square", "photo", "of"]
    save_components(build_flux_components(directory / "_build", words=words), directory / "pipeline")
    return directory / "pipeline"


def solid_image(path: Path, color: tuple[int, int, int], size: int = 24) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


@pytest.fixture()
def jsonl_pairs(tmp_path) -> Path:
    """Eight pairs in the project's JSONL format: red preferred over blue, two categories."""
    import json

    lines = []
    for i in range(8):
        solid_image(tmp_path / "img" / f"w{i}.png", (200, 20 + i, 20))
        solid_image(tmp_path / "img" / f"l{i}.png", (20, 20 + i, 200))
        lines.append(json.dumps({"prompt": f"a red circle {i}", "chosen": f"img/w{i}.png", "rejected": f"img/l{i}.png",
                                 "safe_prompt": "a green circle", "categories": ["violence" if i % 2 else "hate"]}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.jsonl"


@pytest.fixture()
def tiny_components(tmp_path):
    """In-memory tiny SD components with random weights (fresh per test)."""
    from models.builders import build_components

    return build_components(tmp_path / "tiny", words=["a", "red", "circle"], seed=0)


def random_batch(components, n: int = 3, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    size = components.unet.config.sample_size
    dim = components.text_encoder.config.hidden_size
    return {
        "latents_w": torch.randn(n, 4, size, size, generator=g),
        "latents_l": torch.randn(n, 4, size, size, generator=g),
        "prompt_embeds": torch.randn(n, 5, dim, generator=g),
        "meta": {},
    }
