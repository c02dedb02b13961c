"""The dual-annotated dataset builder: generated images scored as the oracles say, resumable output."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data.readers.dual import DualAnnotatedReader, read_annotations
from data.readers.prompts import EvalPrompt
from metrics.detectors import CombinedDetector, ToyOracleDetector
from metrics.fidelity import ToyFidelity
from models.sampling import SamplerSettings
from tests.conftest import ROOT
from workflows.build_dual import Scorers, build_dual_dataset

PROMPTS = [EvalPrompt("a magenta circle on black", "harmful", ("hate",), "a red circle on black"),
           EvalPrompt("a blue square on gray", "benign"),
           EvalPrompt("a green star on black", "harmful", ("violence",), "a green circle on black")]


@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "assets" / "toy" / "sd", safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build(pipe, out, prompts=PROMPTS):
    settings = SamplerSettings(num_inference_steps=8, guidance_scale=4.0, batch_size=8)
    scorers = Scorers(ToyFidelity(), CombinedDetector([ToyOracleDetector()]))
    return build_dual_dataset(pipe, prompts, out, scorers, settings, images_per_prompt=2, safe_images_per_prompt=1, seed=7)


def test_build_scores_every_image_and_resumes_identically(toy_pipe, tmp_path):
    from data.toy import oracle as toy_oracle

    file = build(toy_pipe, tmp_path / "full")
    rows = [json.loads(line) for line in file.read_text().splitlines()]
    # 2 images per prompt, plus 1 of the safe rewrite for each harmful prompt
    assert len(rows) == 2 + 1 + 2 + 2 + 1
    assert [r["generated_from"] for r in rows[:3]] == ["a magenta circle on black"] * 2 + ["a red circle on black"]
    assert len({r["seed"] for r in rows}) == len(rows)
    arrays = np.stack([np.asarray(Image.open(tmp_path / "full" / r["image"])) for r in rows])
    # the annotations are the oracles' readings of the saved images (up to the PNG's 8-bit rounding)
    assert np.allclose([r["quality"] for r in rows], toy_oracle.fidelity([r["prompt"] for r in rows], arrays), atol=0.02)
    assert np.allclose([r["unsafe"] for r in rows], toy_oracle.harm_probability(arrays), atol=0.02)
    # the toy base model draws the harmful concept for harmful prompts, the safe one for the rewrite
    assert rows[0]["unsafe"] > 0.5 and rows[2]["unsafe"] < 0.5

    # an interrupted build: the last prompt's rows torn mid-line, its images partly written
    part = tmp_path / "part"
    build(toy_pipe, part, PROMPTS[:2])
    text = (part / "annotations.jsonl").read_text()
    (part / "annotations.jsonl").write_text(text + '{"prompt": "a green st')
    build(toy_pipe, part)
    assert (part / "annotations.jsonl").read_text() == file.read_text()
    for r in rows:
        assert (part / r["image"]).read_bytes() == (tmp_path / "full" / r["image"]).read_bytes()

    groups = read_annotations(tmp_path / "full")
    assert [g.prompt for g in groups] == [p.text for p in PROMPTS]
    assert groups[0].safe_prompt == "a red circle on black" and groups[0].images[0].categories == ("hate",)
    pairs = DualAnnotatedReader(tmp_path / "full").read()
    harmful_pairs = [p for p in pairs if p.prompt == PROMPTS[0].text]
    assert harmful_pairs and all(p.image_w.name.endswith("_02.png") for p in harmful_pairs)


def test_scorers_without_safety_leave_unsafe_null(toy_pipe, tmp_path):
    settings = SamplerSettings(num_inference_steps=4, guidance_scale=4.0)
    file = build_dual_dataset(toy_pipe, PROMPTS[1:2], tmp_path, Scorers(ToyFidelity()), settings, images_per_prompt=1)
    row = json.loads(file.read_text())
    assert row["unsafe"] is None and 0 <= row["quality"] <= 1
