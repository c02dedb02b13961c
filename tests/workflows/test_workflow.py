"""Scale and workflow (train.py end to end on the toy model): DDP, a simulated wandb agent, kill and
resume, a non-finite loss, atomic checkpoints."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
LORA = Path("lora") / "final" / "pytorch_lora_weights.safetensors"


def train(out: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={out}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})


def toy(cache: Path, steps: int) -> list[str]:
    """A short dpo run on the toy world: 48 pairs, batch 8 (6 batches an epoch), no validation split."""
    return ["data.reader.images_per_prompt=1", "data.batch_size=8", "data.val_fraction=0", f"data.cache_dir={cache}",
            f"trainer.max_steps={steps}", "~callbacks.toy_report", "logger=csv", "trainer.log_every_n_steps=1",
            "callbacks.model_checkpoint.every_n_train_steps=1"]


def step_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_lora_of_an_uninterrupted_run(tmp_path):
    """SIGKILL at step 8 (inside the second epoch); ckpt_path=last continues at the right step, learning
    rate and data position: the final LoRA equals the uninterrupted run's."""
    cache = tmp_path / "cache"
    whole = train(tmp_path / "whole", *toy(cache, 11))
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "killed"
    killed = train(out, *toy(cache, 11), "+callbacks.kill._target_=tests.helpers.KillAtStep", "+callbacks.kill.step=8")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert step_of(out / "checkpoints" / "last.ckpt") == 8 and not (out / LORA).exists()
    resumed = train(out, *toy(cache, 11), "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming inside epoch 1: skipping its first 2 batches" in (out / "train.log").read_text()
    a, b = load_file(tmp_path / "whole" / LORA), load_file(out / LORA)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert not list(out.glob("checkpoints/.*.tmp"))
    steps = [int(row.split(",")[2]) for row in (out / "csv" / "metrics.csv").read_text().splitlines()[1:]]
    assert min(steps) == 0 and max(steps) == 10  # the killed run's rows are kept, the resumed run's appended


@pytest.mark.slow
def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    result = train(out, *toy(tmp_path / "cache", 10), "objective._target_=tests.helpers.NaNAfter", "+objective.calls=3")
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: step 3: the loss is not finite") and line.endswith("last.ckpt"), line
    assert step_of(out / "checkpoints" / "last.ckpt") == 3
    assert not (out / "checkpoints" / "step=000004.ckpt").exists()
    assert not (out / "lora" / "final").exists() and not (out / "lora" / "step_000004").exists()


@pytest.mark.slow
@pytest.mark.timeout(500)  # the subprocess may take 400 s on a slow or busy machine
def test_ddp_on_two_cpu_processes_shards_the_data_and_saves_once(tmp_path):
    out = tmp_path / "ddp"
    result = train(out, *toy(tmp_path / "cache", 4), "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                   "+callbacks.record._target_=tests.helpers.RecordBatches", f"+callbacks.record.dirpath={out}",
                   timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((out / f"batches_rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(s) for s in seen] == [4, 4] and all(len(b) == 8 for s in seen for b in s)
    first_epoch = [{i for batch in s[:3] for i in batch} for s in seen]  # 48 pairs / 2 ranks / batch 8 = 3 batches
    assert len(first_epoch[0]) == len(first_epoch[1]) == 24 and not first_epoch[0] & first_epoch[1]
    assert step_of(out / "checkpoints" / "last.ckpt") == 4 and (out / LORA).is_file()
    import csv

    with open(out / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["train/loss"]]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]  # rank 0 writes, once per step


def sample(spec: dict, rng: random.Random):
    if "values" in spec:
        return rng.choice(spec["values"])
    if spec.get("distribution") == "log_uniform_values":
        return float(torch.exp(torch.empty(()).uniform_(*torch.log(torch.tensor([spec["min"], spec["max"]])).tolist())))
    raise ValueError(f"sampler for {spec} not simulated")


@pytest.mark.slow
@pytest.mark.parametrize("sweep", ["dpo_beta", "scdpo_lambda_gamma"])
def test_wandb_agent_command_reaches_the_config(sweep, tmp_path):
    """What `wandb agent` runs: the sweep's command with ${args_no_hyphens} = key=value per sampled parameter."""
    spec = yaml.safe_load((ROOT / "configs" / "sweep" / f"{sweep}.yaml").read_text())
    assert spec["metric"] == {"name": "val/uas", "goal": "maximize"}
    values = {key: sample(p, random.Random(0)) for key, p in spec["parameters"].items()}
    macros = {"${env}": [], "${interpreter}": [sys.executable], "${program}": [str(ROOT / spec["program"])],
              "${args_no_hyphens}": [f"{k}={v}" for k, v in values.items()]}
    cmd = [part for item in spec["command"] for part in macros.get(item, [item])]
    out = tmp_path / "agent_run"
    extra = [f"hydra.run.dir={out}", *toy(tmp_path / "cache", 2), "logger=wandb",
             "callbacks.alignment_validation.every_n_steps=2", "callbacks.alignment_validation.images_per_prompt=1"]
    result = subprocess.run(cmd + extra, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((out / ".hydra" / "config.yaml").read_text())
    for key, value in values.items():
        group, name = key.split(".", 1)
        node = config[group]
        for part in name.split("."):
            node = node[part]
        assert node == pytest.approx(value), key
    rows = (out / "csv" / "metrics.csv").read_text().splitlines()
    assert "val/uas" in rows[0]
    assert list((out / "wandb").glob("offline-run-*"))


def test_atomic_checkpoint_write_keeps_the_old_file_when_saving_fails(tmp_path):
    from common.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "bad": Unpicklable()}, target)
    assert io.load_checkpoint(target)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    target.write_bytes(target.read_bytes()[:50])
    from common.errors import InputError

    with pytest.raises(InputError, match=r"ckpt_path=.*last\.ckpt: not a checkpoint \(unreadable, truncated"):
        io.load_checkpoint(target)
