"""The safety cost model: shipped toy model quality, save/load, refusals; cost caching; SCP-style data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from common.errors import InputError
from data.readers.mixed import MixedReader
from data.readers.toy import ToyReader
from data.toy import oracle as toy_oracle
from models.cost_model import CostAdapter, SafetyCostModel

ROOT = Path(__file__).resolve().parents[2]
TOY_COST = ROOT / "assets" / "toy" / "cost_model"


@pytest.fixture(scope="module")
def cost_model() -> SafetyCostModel:
    return SafetyCostModel.load(TOY_COST)


def _images(refs) -> list[np.ndarray]:
    from data.pairs import load_rgb

    return [np.asarray(load_rgb(r, "test")) for r in refs]


def test_shipped_cost_model_separates_heldout_images(cost_model):
    pairs = ToyReader(kind="pairs", split="heldout", images_per_prompt=4).read()
    harmful = cost_model.cost(_images([p.image_l for p in pairs]))
    safe = cost_model.cost(_images([p.image_w for p in pairs]))
    scores = torch.cat([harmful, safe])
    labels = torch.cat([torch.ones_like(harmful), torch.zeros_like(safe)]).long()
    assert float(binary_auroc(scores, labels)) >= 0.95
    assert float((harmful > safe).float().mean()) >= 0.95      # pair ordering
    assert float(((scores > 0).long() == labels).float().mean()) >= 0.9  # anchored at zero
    p = cost_model.probability(_images([pairs[0].image_l]))
    assert 0.5 < float(p) <= 1.0


def test_images_of_any_size_are_brought_to_the_encoders_size(cost_model):
    """A user's images are not 32 px: the toy CLIP's processor resizes and crops like a real CLIP's, so the
    ranking survives a 4x upscale and a non-square crop, and sizes can mix in one batch."""
    from PIL import Image

    pairs = ToyReader(kind="pairs", split="heldout", images_per_prompt=1).read()[:8]
    harmful, safe = _images([p.image_l for p in pairs]), _images([p.image_w for p in pairs])
    big = lambda a, w, h: np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.NEAREST))  # noqa: E731
    mixed = [big(a, 128, 128) if i % 2 else big(a, 96, 128) for i, a in enumerate(harmful + safe)]
    costs = cost_model.cost(mixed)
    assert costs.shape == (16,) and torch.isfinite(costs).all()
    assert float((costs[:8] > costs[8:]).float().mean()) >= 0.85
    torch.testing.assert_close(cost_model.cost(harmful), cost_model.cost([big(a, 32, 32) for a in harmful]))


def test_save_and_load_round_trip(cost_model, tmp_path):
    cost_model.save(tmp_path / "copy", encoder_reference=str(ROOT / "assets" / "toy" / "clip"))
    again = SafetyCostModel.load(tmp_path / "copy")
    features = torch.randn(5, cost_model.adapter.feature_dim)
    assert torch.allclose(again(features), cost_model(features))


def test_cost_model_for_another_encoder_is_refused(cost_model, tmp_path):
    wrong = SafetyCostModel.__new__(SafetyCostModel)
    torch.nn.Module.__init__(wrong)
    wrong.features, wrong.adapter = cost_model.features, CostAdapter(128, 8)
    wrong.save(tmp_path / "wrong", encoder_reference=str(ROOT / "assets" / "toy" / "clip"))
    with pytest.raises(InputError, match="adapter expects 128-d features.*64-d"):
        SafetyCostModel.load(tmp_path / "wrong")


def test_truncated_cost_model_weights_are_refused(cost_model, tmp_path):
    cost_model.save(tmp_path / "cut", encoder_reference=str(ROOT / "assets" / "toy" / "clip"))
    weights = tmp_path / "cut" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InputError, match="adapter.safetensors: cannot read cost model weights"):
        SafetyCostModel.load(tmp_path / "cut")
    with pytest.raises(InputError, match="no cost_model.json"):
        SafetyCostModel.load(tmp_path)


def test_costs_are_attached_and_cached(tmp_path):
    from models.pair_costs import attach_costs

    pairs = ToyReader(kind="pairs", split="heldout", images_per_prompt=1).read()[:6]
    attach_costs(pairs, TOY_COST, tmp_path)
    cached = sorted(tmp_path.glob("costs_*.safetensors"))
    assert len(cached) == 1
    assert all(p.extras["cost_l"] > p.extras["cost_w"] for p in pairs)
    again = ToyReader(kind="pairs", split="heldout", images_per_prompt=1).read()[:6]
    stamp = cached[0].stat().st_mtime_ns
    attach_costs(again, TOY_COST, tmp_path)
    assert sorted(tmp_path.glob("costs_*.safetensors")) == cached and cached[0].stat().st_mtime_ns == stamp
    assert [p.extras["cost_w"] for p in again] == [p.extras["cost_w"] for p in pairs]


def test_toy_clean_pairs_prefer_the_faithful_image():
    pairs = ToyReader(kind="clean_pairs", split="train", images_per_prompt=3).read()
    assert pairs and all(not p.categories for p in pairs)
    prompts = [p.prompt for p in pairs]
    q_w = toy_oracle.fidelity(prompts, _images([p.image_w for p in pairs]))
    q_l = toy_oracle.fidelity(prompts, _images([p.image_l for p in pairs]))
    assert (q_w > q_l + 0.2).all()
    assert (toy_oracle.harm_probability(_images([p.image_l for p in pairs])) < 0.5).all()


def test_mixed_reader_ratio():
    harmful = ToyReader(kind="pairs", split="heldout", images_per_prompt=1)
    clean = ToyReader(kind="clean_pairs", split="heldout", images_per_prompt=1)
    n_h, n_c = len(harmful.read()), len(clean.read())
    for fraction in (0.5, 0.25, 0.9):
        pairs = MixedReader(harmful=harmful, clean=clean, harmful_fraction=fraction).read()
        n_safety = sum(bool(p.categories) for p in pairs)
        assert n_safety == n_h
        assert n_safety / len(pairs) == pytest.approx(fraction, abs=0.02)
    assert n_c < n_h  # so 0.25 needed repeats
    with pytest.raises(InputError, match="harmful_fraction"):
        MixedReader(harmful=harmful, clean=clean, harmful_fraction=0.0)
