"""Hostile inputs: each gets one line naming the file, row or key and what was expected (or, with
``data.on_bad_sample=skip``, a logged and counted repair), and nothing written before is lost.
Corrupt images, image modes, missing columns, unknown categories and cost models for another encoder
are covered in test_readers.py, test_latent_cache.py and test_cost_model.py."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.errors import InputError
from tests.data.test_latent_cache import datamodule

ROOT = Path(__file__).resolve().parents[2]


def rewrite_jsonl(jsonl: Path, edit) -> None:
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    edit(lines)
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_zero_byte_image_is_named_or_skipped_and_counted(tiny_components, jsonl_pairs, tmp_path, caplog):
    (jsonl_pairs.parent / "img" / "l5.png").write_bytes(b"")
    dm, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache")
    with pytest.raises(InputError, match=r"pairs\.jsonl line 6: cannot read image .*l5\.png"):
        dm.setup("fit")
    assert not list((tmp_path / "cache").glob("*/latents.safetensors"))  # no half-written cache
    skip, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", on_bad_sample="skip")
    with caplog.at_level(logging.WARNING):
        skip.setup("fit")
    assert sorted(skip.train_set.indices) == [0, 1, 2, 3, 4, 6, 7]
    assert "skipped 1 of 8 pairs with unreadable images (first: pairs.jsonl line 6" in caplog.text.replace(
        str(jsonl_pairs.parent) + "/", "")
    # the same cache read without skip names the bad pair instead of training on zeros
    again, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache")
    with pytest.raises(InputError, match=r"line 6: cannot read image .*built with on_bad_sample=skip"):
        again.setup("fit")


def test_empty_caption_is_named_or_dropped(tiny_components, jsonl_pairs, tmp_path):
    rewrite_jsonl(jsonl_pairs, lambda lines: lines[2].update(prompt="  "))
    dm, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache")
    with pytest.raises(InputError, match=r"pairs\.jsonl line 3: empty caption"):
        dm.setup("fit")
    skip, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", on_bad_sample="skip")
    skip.setup("fit")
    assert len(skip.pairs) == 7 and all(p.prompt.strip() for p in skip.pairs)


def test_caption_beyond_the_token_limit_is_truncated_with_one_warning(tiny_components, caplog):
    from models.encoders import ConditionEncoder

    encoder = ConditionEncoder(tiny_components)
    limit = tiny_components.tokenizer.model_max_length
    long = " ".join(["a red circle"] * limit)
    with caplog.at_level(logging.WARNING):
        first = encoder.encode_prompts([long, "a red circle"])
        encoder.encode_prompts([long])
    warnings = [r for r in caplog.records if "token limit" in r.getMessage()]
    assert len(warnings) == 1 and f"{limit}-token limit" in warnings[0].getMessage()
    # what survives is the prompt's first `limit` tokens
    ids = tiny_components.tokenizer(long, truncation=True, max_length=limit, return_tensors="pt").input_ids
    assert ids.shape[1] == limit and torch.isfinite(first).all()


def test_parquet_with_the_wrong_schema_names_file_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.readers import PickAPicReader

    table = pa.table({"jpg_0": ["not bytes"], "jpg_1": ["x"], "label_0": [1.0], "caption": ["a red circle"]})
    pq.write_table(table, tmp_path / "train-0.parquet")
    with pytest.raises(InputError, match=r"train-0\.parquet row 0: column jpg_0 must hold encoded image bytes, got str"):
        PickAPicReader(tmp_path).read()
    pq.write_table(pa.table({"image": [b"x"], "text": ["y"]}), tmp_path / "train-0.parquet")
    with pytest.raises(InputError, match=r"train-0\.parquet: missing column\(s\) \['jpg_0', 'jpg_1', 'label_0', 'caption'\]"):
        PickAPicReader(tmp_path).read()


def _toy_lora(directory: Path, unet_dir: Path, truncate: bool = False) -> Path:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from models.lora_io import save_lora

    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"]), adapter_name="default")
    file = save_lora(unet, directory, "default")
    if truncate:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return directory


def _other_and_broken_loras(tiny_pipeline_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    other = _toy_lora(tmp_path / "other_arch", tiny_pipeline_dir / "unet")
    broken = _toy_lora(tmp_path / "broken", ROOT / "assets" / "toy" / "sd" / "unet", truncate=True)
    return other, broken


def test_lora_of_another_architecture_or_truncated_is_one_line(tiny_pipeline_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from workflows.merge import load_experts

    toy = UNet2DConditionModel.from_pretrained(ROOT / "assets" / "toy" / "sd" / "unet")
    other, broken = _other_and_broken_loras(tiny_pipeline_dir, tmp_path)
    with pytest.raises(InputError, match=r"merge\.experts\[0\]: .*other_arch.* does not fit the base UNet2DConditionModel"):
        load_experts(toy, [other])
    with pytest.raises(InputError, match=r"merge\.experts\[0\]: cannot read LoRA .*broken"):
        load_experts(toy, [broken])


@pytest.mark.slow
def test_evaluate_py_names_a_lora_of_another_architecture_or_truncated_in_one_line(tiny_pipeline_dir, tmp_path):
    other, broken = _other_and_broken_loras(tiny_pipeline_dir, tmp_path)
    for lora, expected in ((other, f"lora: {other} does not fit"), (broken, f"lora: cannot read LoRA {broken}")):
        result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"lora={lora}", f"hydra.run.dir={tmp_path / 'ev'}"],
                                cwd=ROOT, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and lines[-1].startswith(f"error: {expected}"), lines[-3:]


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_step=5", "unknown config key trainer.max_step (did you mean trainer.max_steps?)"),
])
def test_config_typo_is_one_line_with_a_suggestion(override, expected):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), override], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {expected}", result.stderr[-1500:]


@pytest.mark.parametrize("overrides, expected", [
    (["model.attention_backend=fa3"], "model.attention_backend: expected null or one of"),
    (["model.batch_reference=true", "model.lora=null"], "model.batch_reference: needs model.lora"),
    (["model.batch_reference=true", "model.gradient_checkpointing=true"], "model.batch_reference: cannot be combined"),
])
def test_speed_settings_are_checked_before_the_model_loads(overrides, expected):
    """A real checkpoint takes minutes to load: bad speed settings fail first."""
    from unittest import mock

    from hydra import compose, initialize_config_dir

    from workflows.align import build_alignment

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    with mock.patch("models.components.load_model", side_effect=AssertionError("the model was loaded")):
        with pytest.raises(InputError, match=expected.replace(".", r"\.")):
            build_alignment(cfg)
