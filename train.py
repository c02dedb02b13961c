"""Align a text-to-image diffusion model with a preference objective, or run another task.

    python train.py                                       # the toy model on the toy world (dpo)
    python train.py objective=scdpo
    python train.py objective=dpo data=pickapic data.path=... model=sd15
    python train.py task=experts objective=safetydpo       # SafetyDPO: experts, Co-Merge, evaluation

Everything is chosen by Hydra config groups under configs/ (task, objective, model, data, trainer, logger,
callbacks, experiment). ``task=<name>`` runs ``configs/task/<name>.yaml``'s workflow from ``workflows/``.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from common.library_notices import quiet_library_notices

quiet_library_notices()  # first: the model code's imports print notices it hides

from workflows.cli import check_group_choices, run_reporting_user_errors, run_task  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run_reporting_user_errors(run_task, cfg)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], "train")
    main()
