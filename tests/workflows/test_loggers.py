"""wandb goes offline unless credentials exist, so a run never blocks on the network."""
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from workflows import cli, fit

CFG = OmegaConf.create({
    "csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": "x"},
    "wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "p", "offline": "auto", "save_dir": "x"},
})


def test_wandb_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    csv_logger, wandb_logger = fit.build_loggers(CFG)
    assert isinstance(csv_logger, CSVLogger)
    assert wandb_logger._offline is True


def test_wandb_online_with_api_key(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert fit.build_loggers(CFG)[1]._offline is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert fit.build_loggers(CFG)[1]._offline is True


def test_unknown_group_choice_checks_every_group():
    assert cli.unknown_group_choice(["model=sd15", "objective=dpo,sft"]) is None
    assert cli.unknown_group_choice(["data=parquet"]).startswith("unknown data 'parquet'; available: coprov2, dual, jsonl")
    assert cli.unknown_group_choice(["hydra.searchpath=[file:///x]", "objective=mine"]) is None
