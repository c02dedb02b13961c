"""What a run leaves behind: the last k checkpoints with their LoRA exports, the kohya-ss file, the model card."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import random_batch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def lora_module(components, **lora):
    from alignment.sft import SFT
    from models.alignment_module import AlignmentModule

    return AlignmentModule(components.unet, components.noise_scheduler, SFT(), lora={"rank": 4, "alpha": 8, **lora},
                           optimizer={"lr": 1e-2})


def fit(module, components, root: Path, callbacks: list, max_steps: int, batches: int = 4, accumulate: int = 1,
        ckpt_path: str | None = None):
    """Lightning's Trainer on CPU over ``batches`` fixed random batches (same order every epoch)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from common.checkpoint_io import AtomicCheckpointIO

    loader = DataLoader([random_batch(components, n=2, seed=i) for i in range(batches)], batch_size=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
                        callbacks=callbacks, default_root_dir=root, plugins=[AtomicCheckpointIO()])
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


def checkpoint_every_step(root: Path, keep: int):
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=root / "checkpoints", filename="step={step:06d}", auto_insert_metric_name=False,
                           every_n_train_steps=1, save_top_k=keep, monitor="step", mode="max", save_last=True)


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.mark.parametrize("targets, count, example", [
    (None, 32, "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0"),  # 8 attentions x 4
    (["proj_in", "ff.net.0.proj", "conv1"], 4 + 4 + 8, "lora_unet_mid_block_resnets_1_conv1"),
    # attention and other layers in one file: every layer must survive the reload, whichever key sorts first
    (["proj_in", "to_k"], 4 + 8, "lora_unet_down_blocks_0_attentions_0_proj_in"),
])
def test_kohya_file_loads_in_diffusers_as_the_same_lora(tiny_pipeline_dir, tmp_path, targets, count, example):
    """diffusers detects the kohya keys and converts them back: the UNet computes what the diffusers file gives."""
    from diffusers import StableDiffusionPipeline

    from models.components import load_components
    from models.lora_io import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, save_kohya_lora, save_lora

    # alpha 8 / rank 4: the scale 2 must carry over
    module = lora_module(load_components(str(tiny_pipeline_dir)), **({"target_modules": targets} if targets else {}))
    g = torch.Generator().manual_seed(0)
    for _, p in module.trainable_parameters():
        p.data = 0.1 * torch.randn(p.shape, generator=g)
    save_lora(module.unet, tmp_path)
    save_kohya_lora(module.unet, tmp_path)

    kohya = load_file(tmp_path / KOHYA_WEIGHT_NAME)
    modules = {k.rsplit(".", 1)[0] if k.endswith(".alpha") else k.rsplit(".", 2)[0] for k in kohya}
    assert len(kohya) == 3 * len(modules) == 3 * count
    assert all(m.startswith("lora_unet_") and "." not in m for m in modules) and example in modules
    assert all(kohya[f"{m}.alpha"].shape == () and float(kohya[f"{m}.alpha"]) == 8.0 for m in modules)
    assert all(kohya[f"{m}.lora_down.weight"].shape[0] == 4 == kohya[f"{m}.lora_up.weight"].shape[1] for m in modules)

    z, c, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g), torch.tensor([500])
    outputs = {}
    for weight_name in (None, LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None,
                                                       requires_safety_checker=False)
        if weight_name:
            pipe.load_lora_weights(str(tmp_path), weight_name=weight_name)
        with torch.no_grad():
            outputs[weight_name] = pipe.unet(z, t, encoder_hidden_states=c).sample
    assert (outputs[LORA_WEIGHT_NAME] - outputs[None]).abs().max() > 1e-2  # the LoRA matters
    torch.testing.assert_close(outputs[KOHYA_WEIGHT_NAME], outputs[LORA_WEIGHT_NAME], rtol=0, atol=1e-5)
    with torch.no_grad():
        trained = module.unet(z, t, encoder_hidden_states=c).sample
    torch.testing.assert_close(outputs[KOHYA_WEIGHT_NAME], trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs[LORA_WEIGHT_NAME], trained, rtol=0, atol=1e-5)


def test_keeps_the_last_k_checkpoints_with_their_exports_across_a_resume_and_writes_a_card(tmp_path):
    from models.builders import build_components
    from models.ema import EMACallback
    from models.lora_export import LoraExportCallback
    from models.lora_io import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME

    def components():
        return build_components(tmp_path / "tiny", words=["a", "red", "circle"], seed=0)

    card = {"base_model": "org/base-model", "objective": {"_target_": "alignment.dpo.DPO", "beta": 250},
            "data": {"path": "/data/pairs.jsonl", "categories": ("violence", "hate")}}
    comps = components()
    module = lora_module(comps)
    trainer = fit(module, comps, tmp_path, [checkpoint_every_step(tmp_path, 2),
                                            LoraExportCallback(tmp_path / "lora", card=card),
                                            EMACallback(enabled=False)], max_steps=5)
    assert names(tmp_path / "checkpoints") == {"step=000004.ckpt", "step=000005.ckpt", "last.ckpt"}
    assert names(tmp_path / "lora") == {"step_000004", "step_000005", "final"}
    assert names(tmp_path / "lora" / "final") == {LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME, "README.md"}
    assert names(tmp_path / "lora" / "step_000005") == {LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME}
    # EMA switched off: the export is the training weights
    kohya = load_file(tmp_path / "lora" / "final" / KOHYA_WEIGHT_NAME)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    weight = dict(module.trainable_parameters())[f"unet.{name}.lora_B.default.weight"]
    torch.testing.assert_close(kohya[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"], weight.detach())

    text = (tmp_path / "lora" / "final" / "README.md").read_text()
    assert text.startswith("---\nbase_model: org/base-model\nlibrary_name: diffusers\n")
    assert "# LoRA of org/base-model" in text and "Safety alignment with `DPO`" in text and "5 optimizer steps." in text
    assert "beta: 250" in text and "- violence\n- hate" in text and "optimizer_steps: 5" in text
    assert "rank: 4" in text and "alpha: 8" in text and KOHYA_WEIGHT_NAME in text
    loss = float(trainer.callback_metrics["train/loss"])
    assert f"| train/loss | {loss:.6g} |" in text

    # resumed in the same directory, without card facts: the pruning goes on over the earlier run's files
    comps = components()
    fit(lora_module(comps), comps, tmp_path,
        [checkpoint_every_step(tmp_path, 2), LoraExportCallback(tmp_path / "lora")], max_steps=7,
        ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert names(tmp_path / "checkpoints") == {"step=000006.ckpt", "step=000007.ckpt", "last.ckpt"}
    assert names(tmp_path / "lora") == {"step_000006", "step_000007", "final"}
    text = (tmp_path / "lora" / "final" / "README.md").read_text()
    assert "# LoRA of a Stable Diffusion model" in text and "7 optimizer steps." in text
    assert "base_model" not in text


@pytest.mark.parametrize("keep, steps", [(-1, [1, 2, 3]), (0, [])])
def test_save_top_k_minus_one_keeps_every_checkpoint_and_export_and_zero_none(tiny_components, tmp_path, keep, steps):
    from models.lora_export import LoraExportCallback

    fit(lora_module(tiny_components), tiny_components, tmp_path,
        [checkpoint_every_step(tmp_path, keep), LoraExportCallback(tmp_path / "lora")], max_steps=3)
    assert names(tmp_path / "checkpoints") == {f"step={s:06d}.ckpt" for s in steps} | {"last.ckpt"}
    assert names(tmp_path / "lora") == {f"step_{s:06d}" for s in steps} | {"final"}


def composed_callbacks(*overrides: str) -> list:
    from hydra import compose, initialize_config_dir

    from workflows.fit import build_callbacks

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("train", overrides=["output_dir=/tmp/run", *overrides])
    return cfg, build_callbacks(cfg.callbacks)


@pytest.mark.parametrize("group, ema_on", [("default", False), ("ema", True), ("uas_validation", False)])
def test_callback_configs_keep_three_checkpoints_fill_the_card_and_switch_the_ema(group, ema_on):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from models.ema import EMACallback
    from models.lora_export import LoraExportCallback

    cfg, callbacks = composed_callbacks(f"callbacks={group}", "objective=scdpo")
    (checkpoint,) = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    assert (checkpoint.save_top_k, checkpoint.monitor, checkpoint.mode) == (3, "step", "max") and checkpoint.save_last
    (export,) = [c for c in callbacks if isinstance(c, LoraExportCallback)]
    assert export.card["base_model"] == cfg.model.pretrained
    assert export.card["objective"]["_target_"] == "alignment.scdpo.SCDPO"  # a config for the card, not an object
    assert export.card["data"]["batch_size"] == cfg.data.batch_size and export.card["seed"] == cfg.seed
    (ema,) = [c for c in callbacks if isinstance(c, EMACallback)]
    assert ema.enabled is ema_on and ema.decay == 0.9999


def test_retention_and_ema_from_the_command_line():
    from lightning.pytorch.callbacks import ModelCheckpoint

    from models.ema import EMACallback

    _, callbacks = composed_callbacks("callbacks.model_checkpoint.save_top_k=-1", "callbacks.ema.enabled=true",
                                      "callbacks.ema.decay=0.99")
    (checkpoint,) = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    (ema,) = [c for c in callbacks if isinstance(c, EMACallback)]
    assert checkpoint.save_top_k == -1 and ema.enabled and ema.decay == 0.99


@pytest.mark.slow
def test_train_py_with_ema_keeps_two_checkpoints_and_exports_the_average(tiny_pipeline_dir, jsonl_pairs, tmp_path):
    """train.py end to end: retention by config, kohya file and card beside the final LoRA, EMA in the checkpoint."""
    from tests.workflows.test_train_integration import common, run_train

    out = tmp_path / "run"
    result = run_train(out, *common(tiny_pipeline_dir, jsonl_pairs, tmp_path / "cache", steps=4), "objective=sft",
                       "callbacks=ema", "callbacks.model_checkpoint.save_top_k=2", "callbacks.ema.decay=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert names(out / "checkpoints") == {"step=000003.ckpt", "step=000004.ckpt", "last.ckpt"}
    assert names(out / "lora") == {"step_000003", "step_000004", "final"}
    card = (out / "lora" / "final" / "README.md").read_text()
    assert f"base_model: {tiny_pipeline_dir}" in card and "Safety alignment with `SFT`" in card
    assert "decay: 0.5" in card and "(weights: exponential moving average)" in card
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    ema = state["callbacks"]["EMACallback"]
    assert ema["num_updates"] == 4
    exported = load_file(out / "lora" / "final" / "pytorch_lora_weights.safetensors")
    for name, average in ema["shadow"].items():
        key = "unet." + name.removeprefix("unet.").replace(".default.weight", ".weight")
        torch.testing.assert_close(exported[key], average, rtol=0, atol=1e-6)
        assert not torch.equal(state["state_dict"][name], average)  # the checkpoint keeps the training weights


@pytest.mark.parametrize("targets", [None, ["to_k", "proj_in", "ff.net.0.proj", "conv1", "time_emb_proj"]])
def test_sdxl_kohya_file_loads_in_the_sdxl_pipeline_as_the_same_lora(tiny_sdxl_dir, tmp_path, targets):
    """SDXL's kohya-ss file has the same scheme (``lora_unet_<module path, dots as _>``): the keys convert back to
    the UNet's modules, and StableDiffusionXLPipeline loads it to the UNet the diffusers export gives."""
    from diffusers import StableDiffusionXLPipeline

    from models.components import load_components
    from models.lora_io import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, save_kohya_lora, save_lora

    module = lora_module(load_components(str(tiny_sdxl_dir)), **({"target_modules": targets} if targets else {}))
    g = torch.Generator().manual_seed(0)
    for _, p in module.trainable_parameters():
        p.data = 0.1 * torch.randn(p.shape, generator=g)
    save_lora(module.unet, tmp_path)
    save_kohya_lora(module.unet, tmp_path)

    kohya = load_file(tmp_path / KOHYA_WEIGHT_NAME)
    adapted = {n for n, m in module.unet.named_modules() if "default" in getattr(m, "lora_A", {})}
    by_key = {"lora_unet_" + n.replace(".", "_"): n for n in adapted}
    assert len(by_key) == len(adapted)  # the key scheme is one-to-one on this UNet
    modules = {k.rsplit(".", 1)[0] if k.endswith(".alpha") else k.rsplit(".", 2)[0] for k in kohya}
    assert modules == set(by_key) and len(kohya) == 3 * len(adapted)

    config = module.unet.config
    z = torch.randn(1, 4, 8, 8, generator=g)
    c = torch.randn(1, 5, config.cross_attention_dim, generator=g)
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled_dim, generator=g),
             "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])}
    t = torch.tensor([500])
    outputs, images = {}, {}
    for weight_name in (None, LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
        if weight_name:
            pipe.load_lora_weights(str(tmp_path), weight_name=weight_name)
        with torch.no_grad():
            outputs[weight_name] = pipe.unet(z, t, encoder_hidden_states=c, added_cond_kwargs=added).sample
        pipe.set_progress_bar_config(disable=True)
        images[weight_name] = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="pt",
                                   generator=torch.Generator().manual_seed(1)).images
    assert (outputs[LORA_WEIGHT_NAME] - outputs[None]).abs().max() > 1e-2  # the LoRA matters
    assert (images[LORA_WEIGHT_NAME] - images[None]).abs().max() > 1e-3  # ... to the image a fixed seed gives
    torch.testing.assert_close(images[KOHYA_WEIGHT_NAME], images[LORA_WEIGHT_NAME], rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs[KOHYA_WEIGHT_NAME], outputs[LORA_WEIGHT_NAME], rtol=0, atol=1e-5)
    with torch.no_grad():
        trained = module.unet(z, t, encoder_hidden_states=c, added_cond_kwargs=added).sample
    torch.testing.assert_close(outputs[KOHYA_WEIGHT_NAME], trained, rtol=0, atol=1e-5)
