"""Model families (models/families/): SD 1.x/2.x and SDXL behind one interface, checked against diffusers'
own pipelines on tiny random checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from common.errors import InputError
from data.datamodule import PreferenceDataModule, collate
from data.pairs import preprocess_with_geometry
from data.readers.jsonl import JsonlReader
from models.alignment_module import AlignmentModule
from models.components import load_components
from models.encoders import ConditionEncoder
from models.families import SD_FAMILY, SDXL_FAMILY, family_for
from models.lora_io import LORA_WEIGHT_NAME, save_lora
from models.sampling import SamplerSettings, generate, use_scheduler
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load_components(str(tiny_sdxl_dir))


@pytest.fixture()
def odd_pairs(tmp_path) -> Path:
    """Four pairs whose images are not square (40x24 and 24x40), so sizes and crops differ per side."""
    lines = []
    for i in range(4):
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.new("RGB", (40, 24), (200, 20 + i, 20)).save(tmp_path / "img" / f"w{i}.png")
        Image.new("RGB", (24, 40), (20, 20 + i, 200)).save(tmp_path / "img" / f"l{i}.png")
        lines.append(json.dumps({"prompt": f"a red circle {i}", "chosen": f"img/w{i}.png", "rejected": f"img/l{i}.png"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.jsonl"


def test_the_family_comes_from_model_index_or_the_config(tiny_pipeline_dir, tiny_sdxl_dir, sdxl):
    assert family_for(str(tiny_pipeline_dir)) is SD_FAMILY
    assert family_for(str(tiny_sdxl_dir)) is SDXL_FAMILY and sdxl.family is SDXL_FAMILY
    assert family_for(str(tiny_sdxl_dir), "sd") is SD_FAMILY
    assert sdxl.text_encoder_2 is not None and sdxl.tokenizer_2 is not None
    assert not any(p.requires_grad for p in sdxl.text_encoder_2.parameters())
    with pytest.raises(InputError, match="model.family"):
        family_for(str(tiny_sdxl_dir), "sd9")


def test_preprocessing_records_original_size_and_crop():
    image = Image.new("RGB", (40, 24))  # width 40, height 24
    pixels, geometry = preprocess_with_geometry(image, 16, center_crop=True)
    assert pixels.shape == (3, 16, 16)
    assert geometry.original_size == (24, 40) and geometry.target_size == (16, 16)
    assert geometry.resized_size == (16, 27) and geometry.crop_top_left == (0, 5)
    assert geometry.flipped().crop_top_left == (0, 6)  # the same crop, cut from the mirrored image
    assert preprocess_with_geometry(image, 16, center_crop=False)[1].crop_top_left == (0, 0)


def test_sdxl_conditioning_matches_the_diffusers_pipeline(sdxl, tiny_sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    prompts = ["a red circle", "a photo of a blue square"]
    ours = ConditionEncoder(sdxl).encode_prompt_tensors(prompts)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=torch.device("cpu"), num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    assert ours["prompt_embeds"].shape == (2, 77, 64) and ours["pooled_prompt_embeds"].shape == (2, 32)
    torch.testing.assert_close(ours["prompt_embeds"], embeds.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled.float(), rtol=1e-5, atol=1e-5)

    _, geometry = preprocess_with_geometry(Image.new("RGB", (40, 24)), 16)
    theirs = pipe._get_add_time_ids(geometry.original_size, geometry.crop_top_left, geometry.target_size,
                                    dtype=torch.float32, text_encoder_projection_dim=32)
    torch.testing.assert_close(SDXL_FAMILY.image_conditioning(geometry)["time_ids"], theirs[0])


def sdxl_datamodule(components, jsonl, cache, **kw) -> PreferenceDataModule:
    return PreferenceDataModule(JsonlReader(jsonl), encoder=ConditionEncoder(components), resolution=16, batch_size=4,
                                num_workers=0, cache_dir=cache, cache_dtype="float32", **kw)


def test_sdxl_cache_serves_pooled_embeddings_and_time_ids(sdxl, odd_pairs, tmp_path):
    dm = sdxl_datamodule(sdxl, odd_pairs, tmp_path / "cache", random_flip=True)
    dm.setup("fit")
    encoder = dm.encoder
    for index in range(4):
        item = dm.train_set.item(index)
        wanted = encoder.encode_prompt_tensors([f"a red circle {index}"])
        torch.testing.assert_close(item["prompt_embeds"], wanted["prompt_embeds"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(item["pooled_prompt_embeds"], wanted["pooled_prompt_embeds"][0], rtol=1e-5, atol=1e-5)
        # winners are 40x24 (crop left 5, or 6 mirrored), losers 24x40 (crop top 5 either way)
        assert item["time_ids_w"].tolist() in ([24, 40, 0, 5, 16, 16], [24, 40, 0, 6, 16, 16])
        assert item["time_ids_l"].tolist() == [40, 24, 5, 0, 16, 16]
    batch = collate([dm.train_set.item(i) for i in range(2)])
    assert batch["time_ids_w"].shape == (2, 6) and batch["pooled_prompt_embeds"].shape == (2, 32)


def test_prompt_dropout_drops_every_sdxl_prompt_tensor(sdxl, odd_pairs, tmp_path):
    dm = sdxl_datamodule(sdxl, odd_pairs, tmp_path / "cache", p_uncond=1.0)
    dm.setup("fit")
    item = dm.train_set[0]
    # SDXL's unconditional prompt is zeros (StableDiffusionXLPipeline's force_zeros_for_empty_prompt), not ""
    assert item["prompt_embeds"].shape == (77, 64) and not item["prompt_embeds"].any()
    assert item["pooled_prompt_embeds"].shape == (32,) and not item["pooled_prompt_embeds"].any()
    assert dm.encoder.encode_prompt_tensors([""])["pooled_prompt_embeds"].any()
    assert item["time_ids_w"].tolist() == [24, 40, 0, 5, 16, 16]  # the image's own conditioning stays


def test_each_family_owns_its_unconditional_prompt(tiny_components, sdxl):
    sd_encoder = ConditionEncoder(tiny_components)
    torch.testing.assert_close(sd_encoder.unconditional_tensors()["prompt_embeds"],
                               sd_encoder.encode_prompt_tensors([""])["prompt_embeds"])
    xl = ConditionEncoder(sdxl).unconditional_tensors()
    assert set(xl) == {"prompt_embeds", "pooled_prompt_embeds"} and not any(v.any() for v in xl.values())
    pipe = sdxl.pipeline()
    assert pipe.config.force_zeros_for_empty_prompt  # what the pipeline samples the unconditional branch with


def test_sdxl_pair_errors_call_the_unet_with_added_conditioning(tiny_sdxl_dir, odd_pairs, tmp_path):
    from alignment.dpo import DPO

    components = load_components(str(tiny_sdxl_dir))
    dm = sdxl_datamodule(components, odd_pairs, tmp_path / "cache")
    dm.setup("fit")
    batch = collate([dm.train_set.item(i) for i in range(3)])
    module = AlignmentModule(components.unet, components.noise_scheduler, DPO(beta=100.0),
                             lora={"rank": 4}, family=components.family)
    errors = module.pair_errors(batch, torch.Generator().manual_seed(0))

    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (3,), generator=g)
    eps = torch.randn(batch["latents_w"].shape, generator=g)
    unet, scheduler = module.unet, components.noise_scheduler
    with torch.no_grad():
        for side, policy, reference in (("w", errors.policy_w, errors.ref_w), ("l", errors.policy_l, errors.ref_l)):
            z_t = scheduler.add_noise(batch[f"latents_{side}"], eps, t)
            added = {"text_embeds": batch["pooled_prompt_embeds"], "time_ids": batch[f"time_ids_{side}"]}
            pred = unet(z_t, t, encoder_hidden_states=batch["prompt_embeds"], added_cond_kwargs=added).sample
            torch.testing.assert_close(policy.detach(), (pred - eps).pow(2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)
            unet.disable_adapters()
            base = unet(z_t, t, encoder_hidden_states=batch["prompt_embeds"], added_cond_kwargs=added).sample
            unet.enable_adapters()
            torch.testing.assert_close(reference, (base - eps).pow(2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(500)  # the subprocess may take 400 s on a slow or busy machine
def test_train_py_runs_dpo_on_a_tiny_sdxl(tiny_sdxl_dir, odd_pairs, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={out}", "model=sd15",
           f"model.pretrained={tiny_sdxl_dir}", "model.lora.rank=4", "data=jsonl", f"data.path={odd_pairs}",
           f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", "data.batch_size=2", "data.val_fraction=0.25",
           "data.p_uncond=0.5", "objective=dpo", "logger=csv", "trainer.accelerator=cpu", "trainer.max_steps=2",
           "trainer.log_every_n_steps=1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "finished at step 2" in result.stderr + result.stdout


def test_sdxl_sampling_is_batch_size_invariant(sdxl):
    settings = dict(scheduler="euler", num_inference_steps=2, guidance_scale=3.0, height=16, width=16)
    pipe = sdxl.pipeline()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a red circle", "a blue square", "a red circle"], [3, 4, 5]
    use_scheduler(pipe, "euler")
    one = generate(pipe, prompts, seeds, SamplerSettings(batch_size=1, **settings), progress=False)
    three = generate(pipe, prompts, seeds, SamplerSettings(batch_size=3, **settings), progress=False)
    assert one.shape == (3, 3, 16, 16)
    torch.testing.assert_close(one, three, rtol=0, atol=1e-4)
    assert (one[0] - one[2]).abs().max() > 1e-3  # the seed matters


def test_sdxl_lora_export_loads_in_the_sdxl_pipeline(tiny_sdxl_dir, tmp_path):
    from alignment.dpo import DPO

    components = load_components(str(tiny_sdxl_dir))
    module = AlignmentModule(components.unet, components.noise_scheduler, DPO(), family=components.family,
                             lora={"rank": 4, "alpha": 8})
    g = torch.Generator().manual_seed(0)
    for _, p in module.trainable_parameters():
        p.data = 0.1 * torch.randn(p.shape, generator=g)
    save_lora(module.unet, tmp_path)
    cond = {"encoder_hidden_states": torch.randn(2, 7, 64, generator=g), "text_embeds": torch.randn(2, 32, generator=g),
            "time_ids": torch.tensor([[24.0, 40, 0, 5, 16, 16], [16, 16, 0, 0, 16, 16]])}
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20])
    outputs = {}
    for with_lora in (False, True):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
        if with_lora:
            pipe.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHT_NAME)
        with torch.no_grad():
            outputs[with_lora] = SDXL_FAMILY.predict(pipe.unet, z, t, cond)
    with torch.no_grad():
        trained = SDXL_FAMILY.predict(module.unet, z, t, cond)
    assert (outputs[True] - outputs[False]).abs().max() > 1e-2  # the LoRA matters
    torch.testing.assert_close(outputs[True], trained, rtol=0, atol=1e-5)


def test_sdxl_batch_reference_runs_policy_and_reference_in_one_forward(tiny_sdxl_dir, odd_pairs, tmp_path):
    from alignment.dpo import DPO

    dm = sdxl_datamodule(load_components(str(tiny_sdxl_dir)), odd_pairs, tmp_path / "cache")
    dm.setup("fit")
    batch = collate([dm.train_set.item(i) for i in range(3)])
    errors = {}
    for batched in (False, True):
        components = load_components(str(tiny_sdxl_dir))
        module = AlignmentModule(components.unet, components.noise_scheduler, DPO(), lora={"rank": 4},
                                 family=components.family, batch_reference=batched)
        g = torch.Generator().manual_seed(1)
        for _, p in module.trainable_parameters():
            p.data = 0.1 * torch.randn(p.shape, generator=g)
        with torch.no_grad():
            errors[batched] = module.pair_errors(batch, torch.Generator().manual_seed(0))
    assert (errors[False].policy_w - errors[False].ref_w).abs().max() > 1e-4  # the adapters matter
    for name in ("policy_w", "policy_l", "ref_w", "ref_l"):
        torch.testing.assert_close(getattr(errors[True], name), getattr(errors[False], name), rtol=1e-4, atol=1e-6)


def test_sd_family_conditioning_is_the_sd_pipelines(tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    components = load_components(str(tiny_pipeline_dir))
    assert components.family is SD_FAMILY and components.text_encoder_2 is None
    assert SD_FAMILY.prompt_keys == ("prompt_embeds",) and SD_FAMILY.image_keys == ()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None, requires_safety_checker=False)
    embeds, _ = pipe.encode_prompt(["a red circle"], torch.device("cpu"), 1, do_classifier_free_guidance=False)
    ours = ConditionEncoder(components).encode_prompt_tensors(["a red circle"])
    torch.testing.assert_close(ours["prompt_embeds"], embeds.float(), rtol=1e-5, atol=1e-5)
    assert isinstance(components.pipeline(), StableDiffusionPipeline)
