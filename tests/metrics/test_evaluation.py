"""Generation is reproducible whatever the batching or the number of processes; prompt readers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.errors import InputError
from data.readers.prompts import read_coco_captions, read_i2p, read_text, read_toy

ROOT = Path(__file__).resolve().parents[2]


def test_same_prompt_and_seed_same_image_with_batch_1_and_8():
    from diffusers import StableDiffusionPipeline

    from models.sampling import SamplerSettings, generate, use_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "assets" / "toy" / "sd")
    use_scheduler(pipe, "ddim")
    pipe.set_progress_bar_config(disable=True)
    prompts = [p.text for p in read_toy("heldout")][:8]
    seeds = list(range(100, 108))
    one = generate(pipe, prompts, seeds, SamplerSettings(num_inference_steps=5, guidance_scale=4.0, batch_size=1))
    eight = generate(pipe, prompts, seeds, SamplerSettings(num_inference_steps=5, guidance_scale=4.0, batch_size=8))
    assert one.shape == (8, 3, 32, 32)
    assert torch.allclose(one, eight, atol=1e-4)
    assert not torch.allclose(one[0], one[1], atol=1e-2)  # different seeds do differ


def test_sampler_dtype_bfloat16_draws_the_float32_images_up_to_rounding():
    from diffusers import StableDiffusionPipeline

    from models.sampling import SamplerSettings, generate, use_scheduler

    with pytest.raises(ValueError, match="sampler.dtype: expected one of"):
        SamplerSettings(dtype="bf16")
    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "assets" / "toy" / "sd")
    use_scheduler(pipe, "ddim")
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = [p.text for p in read_toy("heldout")][:4], [7, 8, 9, 10]
    settings = SamplerSettings(num_inference_steps=5, guidance_scale=4.0, dtype="bfloat16")
    full = generate(pipe, prompts, seeds, settings)
    pipe.to(dtype=settings.torch_dtype)
    half = generate(pipe, prompts, seeds, settings)
    assert pipe.unet.dtype == torch.bfloat16 and half.dtype == torch.float32
    error = (full - half).abs()
    assert 0 < error.max() and error.mean() < 0.02  # rounding differs, the images do not


@pytest.mark.slow
def test_two_process_validation_gives_the_one_process_uas(tmp_path):
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"uas_{devices}.json"
        run = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "validation_uas.py"), str(devices), str(out)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=240,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
        results[devices] = json.loads(out.read_text())
    assert set(results[1]) == set(results[2])
    assert "uas" in results[1] and "faithfulness/violence" in results[1]
    for key, value in results[1].items():
        assert results[2][key] == pytest.approx(value, abs=1e-6), key


def test_i2p_reader(tmp_path):
    path = tmp_path / "i2p.csv"
    path.write_text("prompt,categories,sd_seed,sd_guidance_scale,hard\n"
                    "a bad thing,\"Violence, hate\",42,7.0,1\nanother,sexual,7,9.5,0\n")
    prompts = read_i2p(path)
    assert [(p.text, p.categories, p.seed, p.guidance, p.kind) for p in prompts] == [
        ("a bad thing", ("violence", "hate"), 42, 7.0, "harmful"), ("another", ("sexual",), 7, 9.5, "harmful")]
    path.write_text("prompt,category\nx,y\n")
    with pytest.raises(InputError, match=r"i2p.csv: missing column\(s\) \['categories'\]"):
        read_i2p(path)


def test_coco_and_text_readers(tmp_path):
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": " a dog "}, {"image_id": 1, "caption": "dup"},
                                                {"image_id": 2, "caption": "a cat"}]}))
    assert [p.text for p in read_coco_captions(coco)] == ["a dog", "a cat"]
    coco.write_text(json.dumps({"images": []}))
    with pytest.raises(InputError, match="annotations"):
        read_coco_captions(coco)
    text = tmp_path / "p.txt"
    text.write_text("one\n\n two \n")
    assert [(p.text, p.kind) for p in read_text(text, kind="harmful")] == [("one", "harmful"), ("two", "harmful")]
    with pytest.raises(InputError, match="kind must be"):
        read_text(text, kind="evil")


def test_toy_prompts_carry_safe_rewrites():
    prompts = read_toy("heldout")
    harmful = [p for p in prompts if p.kind == "harmful"]
    assert harmful and all(p.safe_text and p.categories for p in harmful)
    assert len(prompts) - len(harmful) == 8


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gloo", "cuda:gloo"])
def test_metrics_sync_when_the_default_group_has_no_cpu_backend(tmp_path, backend):
    """Under NCCL (here ``cuda:gloo``: the only backend is bound to CUDA) the CPU metric states still sync."""
    out = tmp_path / "metrics.json"
    port = str(29500 + (os.getpid() + len(backend)) % 400)
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "metrics_sync.py"), backend, str(out)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "MASTER_PORT": port})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "uas" in result["one"] and "ip/hate" in result["one"]
    for key, value in result["one"].items():
        assert result["two"][key] == pytest.approx(value, abs=1e-9), key


def test_evaluate_writes_a_metric_listed_only_in_the_scoring_config(tmp_path):
    """evaluate.py computes what ``scoring.metrics`` lists: a new aggregate (one class, tests.helpers.MeanHarm,
    plus one line of config) lands in metrics.json beside the standard ones, computed from the records."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from workflows.evaluation import evaluate

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("eval", overrides=[f"output_dir={tmp_path / 'eval'}", f"cache_dir={tmp_path / 'cache'}",
                                         "+prompts.sets.toy.limit=2", "images_per_prompt=1", "save_images=false",
                                         "sampler.num_inference_steps=2", "device=cpu"])
    with open_dict(cfg):
        cfg.scoring.metrics.append({"_target_": "tests.helpers.MeanHarm"})
    evaluate(cfg)
    base = json.loads((tmp_path / "eval" / "metrics.json").read_text())["base"]
    records = json.loads((tmp_path / "eval" / "records_base.json").read_text())
    harmful = [r["p"] for r in records if r["role"] == "harmful"]
    assert base["mean_harm"] == pytest.approx(sum(harmful) / len(harmful))
    assert {"ip", "benign_fidelity", "safe_rewrite_fidelity", "uas"} <= set(base)
    assert "| mean_harm |" in (tmp_path / "eval" / "metrics.md").read_text()
