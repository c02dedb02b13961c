"""Evaluate a diffusion model, with or without an aligned LoRA, for safety and quality.

    python evaluate.py                                   # the toy model on the toy world's held-out prompts
    python evaluate.py lora=outputs/align/<run>/lora/final
    python evaluate.py model=sd15 scoring=real prompts=i2p_coco prompts.sets.i2p.path=i2p.csv \
        prompts.sets.coco.path=captions_val2014.json lora=...

Writes images, ``metrics.json``, ``metrics.md`` and ``grid.png`` (rows: prompts; columns: base, aligned);
the protocol is ``workflows/evaluation.py``'s.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from common.library_notices import quiet_library_notices

quiet_library_notices()  # first: the model code's imports print notices it hides

from workflows.cli import check_group_choices, run_reporting_user_errors  # noqa: E402
from workflows.evaluation import evaluate  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_reporting_user_errors(evaluate, cfg)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], "eval")
    main()
