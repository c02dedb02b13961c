"""The code paths of a real run that the toy defaults do not take: gradient accumulation with resume,
a half-precision frozen base, full fine-tuning with the evaluation callbacks, validation triggers."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.workflows.test_workflow import LORA, step_of, toy, train


@pytest.mark.slow
def test_resume_with_accumulation_across_a_partial_epoch_end_matches_the_uninterrupted_run(tmp_path):
    """6 batches an epoch, accumulation 4: Lightning steps after batches 4 and 6 of each epoch (2 steps an
    epoch). Killed at step 3 (inside the second epoch, after its first step), the resumed run continues at
    batch 4 of epoch 1, and its flips and prompt dropout are those of the uninterrupted run."""
    cache = tmp_path / "cache"
    args = [*toy(cache, 5), "trainer.accumulate_grad_batches=4", "data.random_flip=true", "data.p_uncond=0.3"]
    whole = train(tmp_path / "whole", *args)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "killed"
    killed = train(out, *args, "+callbacks.kill._target_=tests.helpers.KillAtStep", "+callbacks.kill.step=3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert step_of(out / "checkpoints" / "last.ckpt") == 3
    resumed = train(out, *args, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming inside epoch 1: skipping its first 4 batches" in (out / "train.log").read_text()
    a, b = load_file(tmp_path / "whole" / LORA), load_file(out / LORA)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def quick_report_and_validation(every: int = 1) -> list[str]:
    """The default callbacks and UAS validation, each sampling little (2 steps, 1 image per prompt)."""
    return ["callbacks=uas_validation", "callbacks.toy_report.seeds_per_prompt=1",
            "callbacks.toy_report.num_inference_steps=2", f"callbacks.alignment_validation.every_n_steps={every}",
            "callbacks.alignment_validation.images_per_prompt=1",
            "callbacks.alignment_validation.sampler.num_inference_steps=2"]


def untouched_toy_statistics() -> tuple[dict, dict]:
    """The toy report's 'before' metrics and the validation's base means of the shipped, untouched model."""
    from types import SimpleNamespace

    from alignment.sft import SFT
    from data.readers.prompts import read_toy
    from data.toy.world import ToyWorld
    from metrics.detectors import ToyOracleDetector
    from metrics.evaluation import Scorer, base_means, generate_records, make_jobs
    from metrics.fidelity import ToyFidelity
    from metrics.toy_report import ToyAlignmentReport
    from models.alignment_module import AlignmentModule
    from models.components import load_components
    from models.encoders import ConditionEncoder
    from models.sampling import SamplerSettings, use_scheduler
    from tests.helpers import toy_scoring
    from tests.workflows.test_workflow import ROOT

    components = load_components(str(ROOT / "assets" / "toy" / "sd"))
    module = AlignmentModule(components.unet, components.noise_scheduler, SFT())
    trainer = SimpleNamespace(datamodule=SimpleNamespace(encoder=ConditionEncoder(components)))
    toy_report = ToyAlignmentReport("unused", **toy_scoring(), seeds_per_prompt=1, num_inference_steps=2)
    before, _ = toy_report._evaluate(trainer, module, ToyWorld(), base=True)
    toy_report.qbar = base_means(before, sync=False)
    report = toy_report.metrics_of(before, ToyWorld())
    pipe = components.pipeline()
    use_scheduler(pipe, "ddim")
    pipe.set_progress_bar_config(disable=True)
    settings = SamplerSettings(scheduler="ddim", num_inference_steps=2, guidance_scale=4.0, batch_size=16)
    jobs = make_jobs(read_toy("heldout"), 1, 1234, 4.0, with_safe_rewrites=True)
    records, _ = generate_records(pipe, jobs, settings, Scorer([ToyOracleDetector()], ToyFidelity()), progress=False)
    return report, base_means(records)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "sft"])
def test_full_fine_tuning_evaluates_the_untouched_base(tmp_path, objective):
    """model.lora=null: the toy report's 'before' and the validation's base means are the shipped model's,
    not the policy's (dpo keeps a frozen copy; sft keeps none, so the base is measured before step 1)."""
    out = tmp_path / objective
    args = [a for a in toy(tmp_path / "cache", 2) if a != "~callbacks.toy_report"]
    run = train(out, *args, "model.lora=null", f"objective={objective}",
                *quick_report_and_validation(), "trainer.accumulate_grad_batches=2")
    assert run.returncode == 0, run.stderr[-3000:]
    report, qbar = untouched_toy_statistics()
    logged = json.loads((out / "validation" / "base_means.json").read_text())
    for key, value in qbar.items():
        assert logged[key] == pytest.approx(value, abs=1e-6), key
    before = json.loads((out / "toy_eval.json").read_text())["before"]
    assert before == pytest.approx(report, abs=1e-6)
    # validation ran once per optimizer step (accumulation 2), never at step 0
    assert sorted(p.name for p in (out / "validation").glob("step_*")) == ["step_000001", "step_000002"]
    rows = [line for line in (out / "csv" / "metrics.csv").read_text().splitlines()[1:]]
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    uas = header.index("val/uas")
    assert sum(1 for row in rows if row.split(",")[uas]) == 2


@pytest.mark.slow
def test_bf16_frozen_base_under_bf16_mixed_trains_reports_and_validates(tmp_path):
    out = tmp_path / "bf16"
    args = [a for a in toy(tmp_path / "cache", 2) if a != "~callbacks.toy_report"]
    run = train(out, *args, "model.frozen_dtype=bfloat16", "trainer.precision=bf16-mixed",
                *quick_report_and_validation(every=2))
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "toy_eval.json").read_text())
    assert set(results) == {"before", "after"} and 0.0 <= results["after"]["benign_fidelity"] <= 1.0
    assert (out / "validation" / "step_000002" / "metrics.json").is_file()


@pytest.mark.slow  # train.py in a subprocess
def test_half_precision_frozen_base_without_autocast_is_refused_before_loading(tmp_path):
    run = train(tmp_path / "run", "model.frozen_dtype=bfloat16", "trainer.precision=32-true", "logger=none")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "error: model.frozen_dtype=bfloat16: needs trainer.precision=bf16-mixed (or 16-mixed), which runs the "
        "frozen base under autocast; got trainer.precision=32-true")


def test_logged_loss_is_the_optimized_loss_with_the_benign_anchor(tiny_components):
    from alignment.dpo import DPO
    from models.alignment_module import AlignmentModule
    from tests.conftest import random_batch

    module = AlignmentModule(tiny_components.unet, tiny_components.noise_scheduler, DPO(beta=100.0),
                             lora={"rank": 2, "alpha": 2}, benign_anchor=50.0)
    with torch.no_grad():
        for name, p in module.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # the policy drifts from the reference: the anchor term is > 0
    batch = random_batch(tiny_components)
    batch["meta"] = {"categories": [("hate",), (), ()]}
    out = module.compute(batch, torch.Generator().manual_seed(0))
    assert out.metrics["benign_drift"] > 0
    torch.testing.assert_close(out.metrics["loss"], out.loss.detach())
    torch.testing.assert_close(out.metrics["objective_loss"] + 50.0 * out.metrics["benign_drift"], out.loss.detach())


@pytest.mark.slow  # train.py in a subprocess
def test_hub_id_missing_from_the_local_cache_is_one_line_with_the_download_command(tmp_path):
    run = train(tmp_path / "run", "model=sd15", "model.pretrained=nobody-here/no-such-model", "logger=none")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines[-1] == ("error: model.pretrained=nobody-here/no-such-model: not in the local Hugging Face cache "
                         "(HF_HUB_OFFLINE=1); download it first with `hf download nobody-here/no-such-model`, or "
                         "set model.pretrained to a local directory")


@pytest.mark.parametrize("load", ["clip_score", "image_features"])
def test_clip_loaders_take_local_files_only_and_say_what_to_download(load, monkeypatch):
    from common.errors import InputError
    from metrics.fidelity import ClipFidelity
    from models.cost_model import ImageFeatures

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    loader = ClipFidelity if load == "clip_score" else ImageFeatures
    with pytest.raises(InputError) as error:
        loader("nobody-here/no-such-clip", local_files_only=True)
    message = str(error.value)
    assert "nobody-here/no-such-clip: not in the local Hugging Face cache (local_files_only is set)" in message
    assert "`hf download nobody-here/no-such-clip`" in message and "\n" not in message


def test_ddp_waits_longer_than_lightnings_30_minutes_at_barriers():
    from datetime import timedelta

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.workflows.test_workflow import ROOT

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=ddp", "trainer.strategy.timeout.hours=6"])
    strategy = instantiate(cfg.trainer.strategy)
    assert strategy._timeout == timedelta(hours=6)
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        assert instantiate(compose("train", overrides=["trainer=ddp"]).trainer.strategy)._timeout >= timedelta(hours=24)


@pytest.mark.slow  # train.py in a subprocess
def test_bad_optimizer_is_refused_before_the_model_loads(tmp_path):
    run = train(tmp_path / "run", "model.optimizer._target_=torch.optim.AdamQ", "logger=none")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == "error: model.optimizer._target_: torch.optim has no 'AdamQ'"


def test_progress_bar_counts_optimizer_steps_out_of_max_steps_across_epochs():
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from models.progress import StepProgressBar

    class Bar(StepProgressBar):
        seen: list = []

        def _show(self, trainer, module=None):
            super()._show(trainer, module)
            self.seen.append((self.train_progress_bar.n, self.train_progress_bar.total, self.train_progress_bar.desc))

    bar = Bar()
    trainer = L.Trainer(max_steps=7, max_epochs=-1, accumulate_grad_batches=2, limit_train_batches=5,
                        limit_val_batches=0, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu")
    bar._should_update = lambda current, total: True  # tqdm disables itself without a terminal; count every update
    trainer.fit(BoringModel())
    # 5 batches an epoch, accumulation 2: 3 steps an epoch; the bar never goes back at an epoch boundary
    assert all(total == 7 for _, total, _ in bar.seen)
    steps = [n for n, _, _ in bar.seen]
    assert steps == sorted(steps) and steps[-1] == 7
    assert any("epoch 2" in desc for _, _, desc in bar.seen) and not any("/-2" in desc for _, _, desc in bar.seen)


def test_full_unet_recipe_scales_the_learning_rate_by_the_effective_batch(tiny_components):
    """The Diffusion-DPO recipe's 1e-8 is per pair of its 2048-pair batch: 2.048e-5, on 1 GPU or 8."""
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from alignment.dpo import DPO
    from models.alignment_module import AlignmentModule
    from tests.workflows.test_workflow import ROOT

    for devices, accumulate in ((1, None), (8, 32)):
        overrides = ["experiment=dpo_pickapic_sd15_full", "data.path=/data"]
        overrides += [f"trainer.accumulate_grad_batches={accumulate}"] if accumulate else []
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        m = cfg.model
        assert m.lora is None and m.scale_lr and cfg.objective.beta == 5000
        module = AlignmentModule(tiny_components.unet, tiny_components.noise_scheduler, DPO(),
                                 optimizer=OmegaConf.to_container(m.optimizer), scale_lr=m.scale_lr,
                                 lr_scheduler=OmegaConf.to_container(m.lr_scheduler))
        module._trainer = SimpleNamespace(world_size=devices, accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
                                          datamodule=SimpleNamespace(batch_size=cfg.data.batch_size),
                                          estimated_stepping_batches=cfg.trainer.max_steps)
        assert module.effective_batch() == 2048
        optimizer = module.configure_optimizers()["optimizer"]
        assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(2.048e-5, rel=1e-9)
        assert type(optimizer).__name__ == "AdamW"
    plain = AlignmentModule(tiny_components.unet, tiny_components.noise_scheduler, DPO(), optimizer={"lr": 1e-5})
    plain._trainer = module._trainer
    assert plain.configure_optimizers()["optimizer"].param_groups[0]["initial_lr"] == pytest.approx(1e-5)


def test_data_resolution_is_honoured(tmp_path):
    """data.resolution (default: model.resolution, else the model's native size) is the size images are cached at."""
    from hydra import compose, initialize_config_dir

    from tests.workflows.test_workflow import ROOT
    from workflows.align import build_alignment

    sizes = {}
    for override in ([], ["data.resolution=16"], ["model.resolution=24"]):
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=[f"output_dir={tmp_path}", "data.reader.images_per_prompt=1", *override])
        _, datamodule = build_alignment(cfg)
        sizes[tuple(override)] = datamodule.resolution
    assert sizes == {(): 32, ("data.resolution=16",): 16, ("model.resolution=24",): 24}


@pytest.mark.parametrize("present", [True, False])
def test_ckpt_path_last_if_present_resumes_only_when_there_is_a_checkpoint(tmp_path, present):
    from hydra import compose, initialize_config_dir

    from tests.workflows.test_workflow import ROOT
    from workflows.config_checks import checkpoint_file

    last = tmp_path / "checkpoints" / "last.ckpt"
    if present:
        last.parent.mkdir()
        torch.save({"state_dict": {}, "global_step": 1}, last)
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={tmp_path}", "ckpt_path=last_if_present"])
    assert checkpoint_file(cfg) == (last if present else None)
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={tmp_path}", "ckpt_path=last"])
    if present:
        assert checkpoint_file(cfg) == last


def compose_train(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from tests.workflows.test_workflow import ROOT

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"output_dir={tmp_path}", *overrides])


def test_valid_resumes_and_settings_pass_the_checks(tmp_path):
    """What the checks must not refuse: a cost model's checkpoint (no LoRA), FSDP's sharded checkpoint folder,
    ckpt_path=last for the experts workflow (each stage resumes its own), device lists as strings."""
    from workflows.config_checks import check_train_config

    cost = tmp_path / "cost.ckpt"
    torch.save({"state_dict": {"adapter.net.0.weight": torch.zeros(2, 2)}, "global_step": 5}, cost)
    check_train_config(compose_train(tmp_path / "a", "task=cost_model", f"ckpt_path={cost}"))
    sharded = tmp_path / "b" / "checkpoints" / "last.ckpt"
    sharded.mkdir(parents=True)
    torch.save({"global_step": 5}, sharded / "meta.pt")
    check_train_config(compose_train(tmp_path / "b", "ckpt_path=last"))
    check_train_config(compose_train(tmp_path / "c", "task=experts", "objective=safetydpo", "ckpt_path=last"))
    for devices in ("'0,1'", "'2'", "auto", "-1"):
        check_train_config(compose_train(tmp_path / "d", f"trainer.devices={devices}"))


def test_experts_stages_resume_each_from_its_own_last_checkpoint(tmp_path):
    from workflows.experts import stage

    cfg = compose_train(tmp_path, "task=experts", "objective=safetydpo", "ckpt_path=last")
    sub = stage(cfg, tmp_path / "experts" / "hate", {})
    assert sub.ckpt_path == "last_if_present" and sub.output_dir == str(tmp_path / "experts" / "hate")


def test_a_dataset_in_the_hub_cache_keeps_its_symlinked_images_inside(tmp_path, monkeypatch):
    import data.readers.base
    from data.readers.base import outside

    snapshot = tmp_path / "hub" / "datasets--someone--pairs" / "snapshots" / "abc"
    blob = tmp_path / "hub" / "datasets--someone--pairs" / "blobs" / "f00d"
    snapshot.mkdir(parents=True)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"png")
    (snapshot / "img.png").symlink_to(blob)
    (snapshot / "escape.png").symlink_to(tmp_path / "elsewhere.png")
    monkeypatch.setattr(data.readers.base, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert not outside(snapshot / "img.png", snapshot)
    assert outside(snapshot / "escape.png", snapshot) and outside(snapshot / ".." / "abc2" / "x.png", snapshot)
    monkeypatch.setattr(data.readers.base, "HF_HUB_CACHE", str(tmp_path / "other"))
    assert outside(snapshot / "img.png", snapshot)
