"""Hostile inputs, one table: each goes through train.py's (or evaluate.py's) entry code in this process and
must end with exit status 2 and exactly one line on stderr naming the key, file or row, before any VAE call.

The config, checkpoint and file-system cases are here; the data cases (CSV, JSONL, parquet, images) come
from hostile_data_cases.py. The entry code is what ``python train.py ...`` runs: the group and key checks of
``check_group_choices``, composition, then ``run_reporting_user_errors``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.hostile_data_cases import CASES as DATA_CASES
from tests.hostile_data_cases import HostileCase

ROOT = Path(__file__).resolve().parents[2]
Make = Callable[[Path, Path], list[str]]


def fixed(*overrides: str) -> Make:
    return lambda tmp, pipeline: list(overrides)


def with_file(write: Callable[[Path], Path], template: str, *more: str) -> Make:
    """Overrides naming a file ``write`` makes under the temporary folder (``{}`` in ``template``)."""
    return lambda tmp, pipeline: [template.format(write(tmp)), *more]


def text_file(name: str, content: bytes = b"not a model") -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        (tmp / name).write_bytes(content)
        return tmp / name
    return write


def symlink_loop(tmp: Path) -> Path:
    (tmp / "loop").symlink_to(tmp / "loop")
    return tmp / "loop"


def code_pickle(tmp: Path) -> Path:
    class Runs:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"state_dict": {}, "global_step": 1, "x": Runs()}, tmp / "evil.ckpt")
    return tmp / "evil.ckpt"


def checkpoint(rank: int = 4, target: str = "to_k", adapter: str = "default", lora: bool = True,
               base: str | None = None, unet_config: str | None = None) -> Callable[[Path], Path]:
    """A Lightning-shaped checkpoint of train.py (tensors only) with one LoRA layer of the given shape."""
    def write(tmp: Path) -> Path:
        name = f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.{target}"
        state = ({f"{name}.lora_A.{adapter}.weight": torch.zeros(rank, 32), f"{name}.lora_B.{adapter}.weight": torch.zeros(32, rank)}
                 if lora else {f"{name}.weight": torch.zeros(32, 32)})
        content = {"state_dict": state, "global_step": 3, "alignment": {"base_model": base, "unet_config": unet_config}}
        torch.save(content, tmp / "run.ckpt")
        return tmp / "run.ckpt"
    return write


def truncated_checkpoint(tmp: Path) -> Path:
    checkpoint()(tmp)
    data = (tmp / "run.ckpt").read_bytes()
    (tmp / "cut.ckpt").write_bytes(data[: len(data) // 2])
    return tmp / "cut.ckpt"


def no_unet(tmp: Path) -> Path:
    (tmp / "pipe").mkdir()
    (tmp / "pipe" / "model_index.json").write_text("{}")
    return tmp / "pipe"


LORA = "model.lora.rank=4 model.lora.target_modules=[to_k]".split()
TRAIN: list[HostileCase] = [HostileCase(*c) for c in [
    # values of the wrong type: caught while Hydra composes
    ("type-batch-size-text", fixed("data.batch_size=abc"), r"^config key data\.batch_size: Value 'abc'.*Integer"),
    ("type-rank-float", fixed("model.lora.rank=2.5"), r"^config key model\.lora\.rank: .*Integer"),
    ("type-seed-text", fixed("seed=abc"), r"seed"),
    ("type-steps-text", fixed("trainer.max_steps=many"), r"^config key trainer\.max_steps"),
    ("type-flip-text", fixed("data.random_flip=sometimes"), r"^config key data\.random_flip"),
    # unknown names
    ("unknown-objective", fixed("objective=dpoo"), r"^unknown objective 'dpoo'; available: dpo"),
    ("unknown-experiment", fixed("experiment=nope"), r"^unknown experiment 'nope'"),
    ("mistyped-key", fixed("trainer.max_step=5"), r"^unknown config key trainer\.max_step \(did you mean trainer\.max_steps\?\)"),
    ("mistyped-objective-key", fixed("objective.betta=5"), r"^unknown config key objective\.betta \(did you mean objective\.beta\?\)"),
    ("mistyped-group", fixed("objectiv=dpo"), r"^unknown config key objectiv \(did you mean objective\?\)"),
    ("unknown-lr-scheduler", fixed("model.lr_scheduler.name=cosin"), r"^model\.lr_scheduler\.name: expected one of .*got 'cosin'"),
    ("unknown-precision", fixed("trainer.precision=bf17"), r"^trainer\.precision: expected one of .*got 'bf17'"),
    ("unknown-accelerator", fixed("trainer.accelerator=gpuu"), r"^trainer\.accelerator: expected one of"),
    ("unknown-frozen-dtype", fixed("model.frozen_dtype=bf16"), r"^model\.frozen_dtype: expected one of"),
    ("unknown-cache-dtype", fixed("data.cache_dtype=float8"), r"^data\.cache_dtype: expected one of"),
    ("unknown-on-bad-sample", fixed("data.on_bad_sample=ignore"), r"^data\.on_bad_sample: expected one of error, skip"),
    ("unknown-condition-on", fixed("data.condition_on=all"), r"^data\.condition_on: expected one of unsafe, safe, both"),
    ("unknown-compile-mode", fixed("model.compile=fastest"), r"^model\.compile: expected true, false or a torch\.compile mode"),
    ("unknown-attention-backend", fixed("model.attention_backend=flashy"), r"^model\.attention_backend"),
    ("unknown-encode-device", fixed("data.encode_device=tpu9"), r"^data\.encode_device: expected auto, cpu"),
    ("unknown-loss-type", fixed("objective.loss_type=sigmod"), r"^objective\.loss_type: expected one of sigmoid, hinge, ipo"),
    ("unknown-target-modules", fixed(*LORA[:1], "model.lora.target_modules=[to_kk]"),
     r"^model\.lora\.target_modules: \['to_kk'\] name no module of the UNet2DConditionModel of"),
    ("optimizer-unknown-class", fixed("model.optimizer._target_=torch.optim.AdamQ"), r"^model\.optimizer\._target_: torch\.optim has no 'AdamQ'"),
    ("optimizer-not-an-optimizer", fixed("model.optimizer._target_=torch.nn.Linear"), r"is not a torch\.optim\.Optimizer class"),
    ("optimizer-unknown-argument", fixed("+model.optimizer.momentum_x=1"), r"^model\.optimizer: torch\.optim\.AdamW takes no argument momentum_x"),
    # out of range
    ("batch-size-zero", fixed("data.batch_size=0"), r"^data\.batch_size: expected an integer >= 1, got 0"),
    ("batch-size-negative", fixed("data.batch_size=-3"), r"^data\.batch_size: expected an integer >= 1, got -3"),
    ("encode-batch-size-zero", fixed("data.encode_batch_size=0"), r"^data\.encode_batch_size: expected an integer >= 1"),
    ("num-workers-negative", fixed("data.num_workers=-1"), r"^data\.num_workers: expected an integer >= 0"),
    ("accumulate-zero", fixed("trainer.accumulate_grad_batches=0"), r"^trainer\.accumulate_grad_batches: expected an integer >= 1, got 0"),
    ("max-steps-zero", fixed("trainer.max_steps=0"), r"^trainer\.max_steps: expected a number of steps >= 1"),
    ("devices-zero", fixed("trainer.devices=0"), r"^trainer\.devices: expected a count >= 1"),
    ("clip-negative", fixed("trainer.gradient_clip_val=-1"), r"^trainer\.gradient_clip_val: expected a number >= 0"),
    ("log-every-zero", fixed("trainer.log_every_n_steps=0"), r"^trainer\.log_every_n_steps: expected an integer >= 1"),
    ("lr-nan", fixed("model.optimizer.lr=nan"), r"^model\.optimizer\.lr: expected a number > 0, got nan"),
    ("lr-negative", fixed("model.optimizer.lr=-1e-4"), r"^model\.optimizer\.lr: expected a number > 0, got -0\.0001"),
    ("lr-zero", fixed("model.optimizer.lr=0"), r"^model\.optimizer\.lr: expected a number > 0, got 0"),
    ("lr-infinite", fixed("model.optimizer.lr=inf"), r"^model\.optimizer\.lr: expected a number > 0, got inf"),
    ("weight-decay-negative", fixed("model.optimizer.weight_decay=-0.1"), r"^model\.optimizer\.weight_decay: expected a number >= 0"),
    ("warmup-negative", fixed("model.lr_scheduler.warmup_steps=-5"), r"^model\.lr_scheduler\.warmup_steps: expected an integer >= 0"),
    ("beta-zero", fixed("objective.beta=0"), r"^objective\.beta: expected a finite number > 0, got 0"),
    ("beta-negative", fixed("objective.beta=-5"), r"^objective\.beta: expected a finite number > 0, got -5"),
    ("beta-nan", fixed("objective.beta=nan"), r"^objective\.beta: expected a finite number > 0, got nan"),
    ("sft-weight-negative", fixed("objective.sft_weight=-1"), r"^objective\.sft_weight: expected a finite number >= 0"),
    ("scdpo-gamma-negative", fixed("objective=scdpo", "objective.gamma=-1"), r"^objective\.gamma: expected a finite number >= 0"),
    ("spo-eta-nan", fixed("objective=spo", "objective.eta=nan"), r"^objective\.eta: expected a finite number >= 0, got nan"),
    ("rank-zero", fixed("model.lora.rank=0"), r"^model\.lora\.rank: expected an integer >= 1, got 0"),
    ("alpha-zero", fixed("model.lora.alpha=0"), r"^model\.lora\.alpha: expected a number > 0, got 0"),
    ("alpha-negative", fixed("model.lora.alpha=-4"), r"^model\.lora\.alpha: expected a number > 0"),
    ("lora-dropout-one", fixed("model.lora.dropout=1.0"), r"^model\.lora\.dropout: expected a number in \[0, 1\)"),
    ("no-target-modules", fixed("model.lora.target_modules=[]"), r"^model\.lora\.target_modules: expected a list of module names"),
    ("p-uncond-above-one", fixed("data.p_uncond=1.5"), r"^data\.p_uncond: expected a number in \[0, 1\], got 1\.5"),
    ("p-uncond-negative", fixed("data.p_uncond=-0.1"), r"^data\.p_uncond: expected a number in \[0, 1\]"),
    ("val-fraction-one", fixed("data.val_fraction=1"), r"^data\.val_fraction: expected a number in \[0, 1\)"),
    ("val-fraction-negative", fixed("data.val_fraction=-0.2"), r"^data\.val_fraction: expected a number in \[0, 1\)"),
    ("harmful-fraction-above-one", fixed("objective=scdpo", "data.reader.harmful_fraction=2"),
     r"^data\.reader\.harmful_fraction: expected a number in \[0, 1\], got 2"),
    ("dual-delta-negative", fixed("objective=spo", "data.reader.delta=-0.5"), r"^data\.reader\.delta: expected a number >= 0"),
    ("data-resolution-odd", fixed("data.resolution=30"), r"^data\.resolution: expected a multiple of 8"),
    ("data-resolution-negative", fixed("data.resolution=-8"), r"^data\.resolution: expected an integer >= 8"),
    ("model-family-unknown", fixed("model.family=sd9"), r"^model\.family: expected one of auto, .*sdxl, got 'sd9'$"),
    ("model-resolution-odd", fixed("model.resolution=100"), r"^model\.resolution: expected a multiple of 8"),
    ("benign-anchor-negative", fixed("model.benign_anchor=-1"), r"^model\.benign_anchor: expected a number >= 0"),
    ("t-min-negative", fixed("model.t_min=-1"), r"^model\.t_min: expected an integer >= 0"),
    ("t-max-below-t-min", fixed("model.t_min=500", "model.t_max=100"), r"^model\.t_max: expected an integer >= 500"),
    ("t-max-beyond-schedule", fixed("model.t_max=5000"), r"^model\.t_min/t_max: expected 0 <= t_min <= t_max < 1000 \(the scheduler's num_train_timesteps\)"),
    ("sampling-steps-zero", fixed("model.sampling.num_inference_steps=0"), r"^model\.sampling\.num_inference_steps"),
    ("seed-negative", fixed("seed=-1"), r"^seed: expected an integer >= 0"),
    ("validation-tau", fixed("callbacks=uas_validation", "callbacks.alignment_validation.tau=2"),
     r"^callbacks\.alignment_validation\.tau: expected a number in \[0, 1\], got 2"),
    ("validation-every-zero", fixed("callbacks=uas_validation", "callbacks.alignment_validation.every_n_steps=0"),
     r"^callbacks\.alignment_validation\.every_n_steps: expected an integer >= 1"),
    ("checkpoint-every-zero", fixed("callbacks.model_checkpoint.every_n_train_steps=0"),
     r"^callbacks\.model_checkpoint\.every_n_train_steps: expected an integer >= 1"),
    ("keep-checkpoints-below-minus-one", fixed("callbacks.model_checkpoint.save_top_k=-2"),
     r"^callbacks\.model_checkpoint\.save_top_k: expected an integer >= -1"),
    ("ema-decay-above-one", fixed("callbacks.ema.decay=1.5"), r"^callbacks\.ema\.decay: expected a number in \[0, 1\)"),
    ("toy-report-seeds-zero", fixed("callbacks.toy_report.seeds_per_prompt=0"), r"^callbacks\.toy_report\.seeds_per_prompt"),
    ("toy-report-tau", fixed("callbacks.toy_report.tau=2"), r"^callbacks\.toy_report\.tau: expected a number in \[0, 1\], got 2"),
    ("validation-metrics-empty", fixed("callbacks=uas_validation", "callbacks.alignment_validation.metrics=[]"),
     r"^callbacks\.alignment_validation\.metrics: expected a list of aggregate metrics, each with a _target_"),
    # rules across keys
    ("bf16-base-without-autocast", fixed("model.frozen_dtype=bfloat16", "trainer.precision=32-true"),
     r"^model\.frozen_dtype=bfloat16: needs trainer\.precision=bf16-mixed"),
    ("batch-reference-with-checkpointing", fixed("model.batch_reference=true", "model.gradient_checkpointing=true"),
     r"^model\.batch_reference: cannot be combined with model\.gradient_checkpointing"),
    ("batch-reference-full-ft", fixed("model.batch_reference=true", "model.lora=null"), r"^model\.batch_reference: needs model\.lora"),
    ("scale-lr-without-lr", fixed("model.scale_lr=true", "model.optimizer.lr=null"),
     r"^model\.scale_lr: needs model\.optimizer\.lr"),
    ("anchors-without-weight", fixed("data.anchor_others=true", "data.categories=[hate]"),
     r"^data\.anchor_others: needs model\.benign_anchor > 0"),
    ("unset-data-path", fixed("data=jsonl"), r"^config key data\.path must be set"),
    # paths
    ("model-missing-dir", fixed("model.pretrained=/nonexistent/models/sd15"), r"^model\.pretrained=/nonexistent/models/sd15: does not exist"),
    ("model-is-a-file", with_file(text_file("model.bin"), "model.pretrained={}"), r"^model\.pretrained=.*model\.bin: expected a diffusers pipeline directory"),
    ("model-without-unet", with_file(no_unet, "model.pretrained={}"), r"^model\.pretrained=.*pipe: expected a diffusers pipeline directory with unet/config\.json"),
    ("model-not-cached", fixed("model.pretrained=nobody-here/no-model"), r"^model\.pretrained=nobody-here/no-model: not in the local Hugging Face cache"),
    ("model-symlink-loop", with_file(symlink_loop, "model.pretrained={}"), r"^model\.pretrained=.*loop: is a symlink loop"),
    ("jsonl-data-path-missing", fixed("data=jsonl", "data.path=/nonexistent/pairs.jsonl"), r"^data\.path=/nonexistent/pairs\.jsonl: does not exist"),
    ("cost-model-missing", fixed("data.cost_model=/nonexistent/cost"), r"^data\.cost_model=/nonexistent/cost: does not exist"),
    ("cost-model-is-a-file", with_file(text_file("cost.json"), "data.cost_model={}"), r"^data\.cost_model=.*cost\.json: expected a cost model directory"),
    ("cache-dir-is-a-file", with_file(text_file("cache"), "data.cache_dir={}"), r"^data\.cache_dir=.*cache: is a file, expected a directory"),
    ("cache-dir-not-writable", fixed("data.cache_dir=/proc/version/cache"), r"^data\.cache_dir=/proc/version/cache: (is a file|not a writable directory)"),
    ("output-dir-not-writable", fixed("output_dir=/proc/t2i-run"), r"^output_dir=/proc/t2i-run: not a writable directory"),
    ("output-dir-is-a-file", with_file(text_file("out"), "output_dir={}"), r"^output_dir=.*out: is a file, expected a directory"),
    # checkpoints to resume
    ("resume-last-in-a-new-run", fixed("ckpt_path=last"), r"^ckpt_path=last: no .*checkpoints/last\.ckpt \(a new or mistyped hydra\.run\.dir\?\)"),
    ("resume-missing-file", fixed("ckpt_path=/nonexistent/last.ckpt"), r"^ckpt_path=/nonexistent/last\.ckpt: does not exist"),
    ("resume-directory", lambda tmp, pipeline: [f"ckpt_path={tmp}"], r"^ckpt_path=.*: is a directory, expected a checkpoint file"),
    ("resume-garbage", with_file(text_file("junk.ckpt", b"\x00garbage" * 64), "ckpt_path={}"), r"^ckpt_path=.*junk\.ckpt: not a checkpoint"),
    ("resume-truncated", with_file(truncated_checkpoint, "ckpt_path={}", *LORA), r"^ckpt_path=.*cut\.ckpt: not a checkpoint"),
    ("resume-code-pickle", with_file(code_pickle, "ckpt_path={}"),
     r"^ckpt_path=.*evil\.ckpt: holds objects other than tensors and plain containers; not loaded \(unpickling them could run code\)$"),
    ("resume-not-lightning", with_file(lambda tmp: (torch.save({"a": torch.zeros(1)}, tmp / "t.pt"), tmp / "t.pt")[1], "ckpt_path={}"),
     r"^ckpt_path=.*t\.pt: not a Lightning checkpoint written by train\.py"),
    ("resume-other-rank", with_file(checkpoint(rank=8), "ckpt_path={}", *LORA), r"^ckpt_path=.*: LoRA rank 8 in the checkpoint, model\.lora\.rank=4"),
    ("resume-other-targets", with_file(checkpoint(target="to_q"), "ckpt_path={}", *LORA),
     r"^ckpt_path=.*: its LoRA adapts other modules than model\.lora\.target_modules=\['to_k'\]"),
    ("resume-other-adapter", with_file(checkpoint(adapter="expert_hate"), "ckpt_path={}", *LORA), r"adapter expert_hate in the checkpoint, model\.adapter_name=default"),
    ("resume-full-ft-into-lora", with_file(checkpoint(lora=False), "ckpt_path={}", *LORA), r"a full fine-tuning checkpoint, but model\.lora is set"),
    ("resume-lora-into-full-ft", with_file(checkpoint(), "ckpt_path={}", "model.lora=null"), r"a LoRA checkpoint, but model\.lora=null"),
    ("resume-other-base-model", with_file(checkpoint(base="stabilityai/sdxl", unet_config="0" * 16), "ckpt_path={}", *LORA),
     r"trained on base model stabilityai/sdxl, whose UNet config differs from that of model\.pretrained="),
    ("resume-symlink-loop", with_file(symlink_loop, "ckpt_path={}"), r"^ckpt_path=.*loop: is a symlink loop"),
]]

EVAL: list[HostileCase] = [HostileCase(*c) for c in [
    ("eval-tau-above-one", fixed("tau=2"), r"^tau: expected a number in \[0, 1\], got 2"),
    ("eval-tau-negative", fixed("tau=-0.1"), r"^tau: expected a number in \[0, 1\]"),
    ("eval-tau-text", fixed("tau=half"), r"^config key tau: Value 'half'"),
    ("eval-images-zero", fixed("images_per_prompt=0"), r"^images_per_prompt: expected an integer >= 1"),
    ("eval-grid-rows-negative", fixed("grid_rows=-1"), r"^grid_rows: expected an integer >= 0"),
    ("eval-unknown-scheduler", fixed("sampler.scheduler=ddpmx"), r"^sampler\.scheduler: expected one of ddim, dpm, euler"),
    ("eval-unknown-dtype", fixed("sampler.dtype=bf16"), r"^sampler\.dtype: expected one of"),
    ("eval-sampling-steps-zero", fixed("sampler.num_inference_steps=0"), r"^sampler\.num_inference_steps: expected an integer >= 1"),
    ("eval-height-not-multiple-of-8", fixed("sampler.height=100"), r"^sampler\.height: expected a multiple of 8"),
    ("eval-batch-zero", fixed("sampler.batch_size=0"), r"^sampler\.batch_size: expected an integer >= 1"),
    ("eval-unknown-device", fixed("device=tpu"), r"^device: expected auto, cpu, cuda"),
    ("eval-lora-missing", fixed("lora=/nonexistent/lora"), r"^lora=/nonexistent/lora: does not exist"),
    ("eval-lora-garbage", with_file(text_file("pytorch_lora_weights.safetensors", b"\x00" * 40), "lora={}"), r"^lora: cannot read LoRA .*pytorch_lora_weights\.safetensors"),
    ("eval-cache-dir-is-a-file", with_file(text_file("evalcache"), "cache_dir={}"), r"^cache_dir=.*evalcache: is a file, expected a directory"),
    ("eval-metrics-missing", fixed("~scoring.metrics"), r"^scoring\.metrics: missing; the scoring config lists"),
    ("eval-metrics-not-a-list", fixed("scoring.metrics=ip"), r"^scoring\.metrics: expected a list of aggregate metrics"),
    ("eval-nudenet-threshold", fixed("scoring=real", "scoring.detectors.0.threshold=1.5"), r"^scoring\.detectors\.0\.threshold: expected a number in \[0, 1\]"),
    ("eval-unknown-prompts", fixed("prompts=i2pp"), r"^unknown prompts 'i2pp'"),
    ("eval-model-family-unknown", fixed("model.family=sd9"), r"^model\.family: expected one of auto, .*sdxl, got 'sd9'$"),
    ("eval-model-missing", fixed("model.pretrained=/nonexistent/sd"), r"^model\.pretrained=/nonexistent/sd: does not exist"),
]]


def entry(command: str, argv: list[str], capsys) -> tuple[int | None, list[str]]:
    """What ``python <command>.py <argv>`` does, in this process: exit status and stderr lines."""
    from hydra import compose, initialize_config_dir

    from workflows import cli
    from workflows.evaluation import evaluate

    config = "train" if command == "train" else "eval"
    job = cli.run_task if command == "train" else evaluate
    code = None
    try:
        cli.check_group_choices(argv, config)
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config, overrides=argv)
        cli.run_reporting_user_errors(job, cfg)
    except SystemExit as stop:
        code = stop.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture()
def no_vae(monkeypatch):
    """Any VAE call fails the case: everything here must be refused before the latent cache or sampling.
    (Log records go to stdout from the command line; here a handler left by another test may hold a closed
    stream, which must not print logging's own complaint to stderr.)"""
    import logging

    from diffusers import AutoencoderKL

    monkeypatch.setattr(logging, "raiseExceptions", False)
    def refuse(*args, **kwargs):
        raise AssertionError("the VAE was called")

    monkeypatch.setattr(AutoencoderKL, "encode", refuse)
    monkeypatch.setattr(AutoencoderKL, "decode", refuse)


def check(command: str, case: HostileCase, base: list[str], tmp_path: Path, pipeline: Path, capsys,
          progress_allowed: bool = False) -> None:
    """Exit status 2 and one line on stderr matching the case; with ``progress_allowed`` (an image found bad
    while the cache is built) the line may follow the cache's progress bar."""
    work = tmp_path / "work"
    work.mkdir()
    argv = [*base, *case.make(work, pipeline)]
    code, lines = entry(command, argv, capsys)
    assert code == 2, f"exit status {code}; stderr: {lines[-5:]}"
    if progress_allowed:
        assert all("Caching latents" in line or "Loading weights" in line for line in lines[:-1]), lines
        lines = lines[-1:]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: ") and re.search(case.expect, line[len("error: "):]), line
    assert "weights_only=False" not in line and "Traceback" not in line


def train_base(tmp_path: Path) -> list[str]:
    return [f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "logger=none",
            "trainer.max_steps=1", "trainer.enable_progress_bar=false"]


def test_the_table_has_over_80_distinct_hostile_inputs():
    ids = [c.id for c in TRAIN + EVAL + DATA_CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 80


@pytest.mark.parametrize("case", TRAIN, ids=[c.id for c in TRAIN])
def test_train_config_and_checkpoint(case, tmp_path, tiny_pipeline_dir, capsys, no_vae):
    check("train", case, train_base(tmp_path), tmp_path, tiny_pipeline_dir, capsys)


@pytest.mark.parametrize("case", EVAL, ids=[c.id for c in EVAL])
def test_evaluate_config(case, tmp_path, tiny_pipeline_dir, capsys, no_vae):
    base = [f"output_dir={tmp_path / 'eval'}", f"cache_dir={tmp_path / 'eval_cache'}"]
    check("evaluate", case, base, tmp_path, tiny_pipeline_dir, capsys)


@pytest.mark.slow  # loads the tiny pipeline for most cases; tests/data/test_hostile_data.py tests each reader check directly
@pytest.mark.parametrize("case", DATA_CASES, ids=[c.id for c in DATA_CASES])
def test_train_data(case, tmp_path, tiny_pipeline_dir, capsys, monkeypatch, request):
    """Rows, columns, names and paths are refused while the data is read, before the model loads; an image is
    judged when the cache loads it (from its header, before decoding), after the pairs before it were encoded."""
    import logging

    monkeypatch.setattr(logging, "raiseExceptions", False)
    image = case.id.startswith("image") or case.id in IMAGE_BYTES_CASES
    if not image:
        request.getfixturevalue("no_vae")
    base = [*train_base(tmp_path), "~callbacks.toy_report", f"model.pretrained={tiny_pipeline_dir}"]
    check("train", case, base, tmp_path, tiny_pipeline_dir, capsys, progress_allowed=image)


IMAGE_BYTES_CASES = {"pickapic-garbage-bytes"}  # encoded images inside a parquet: judged when decoded
