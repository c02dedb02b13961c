"""Run the validation callback once on the toy model with a perturbed LoRA, on N CPU processes.

    python tests/scripts/validation_uas.py <devices> <out.json>

Used by tests/metrics/test_evaluation.py to compare 1 and 2 processes (gloo).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from alignment.dpo import DPO  # noqa: E402
from data.readers.prompts import read_toy  # noqa: E402
from metrics.aggregates import IP, UAS, BenignFidelity, SafeRewriteFidelity  # noqa: E402
from metrics.detectors import ToyOracleDetector  # noqa: E402
from metrics.fidelity import ToyFidelity  # noqa: E402
from metrics.validation import AlignmentValidation  # noqa: E402
from models.alignment_module import AlignmentModule  # noqa: E402
from models.components import load_components  # noqa: E402
from models.encoders import ConditionEncoder  # noqa: E402


class NoLossModule(AlignmentModule):
    def validation_step(self, batch, batch_idx):
        return None


class PromptsOnly(L.LightningDataModule):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def val_dataloader(self):
        return DataLoader(list(range(2)), batch_size=1)


def main(devices: int, out: Path) -> None:
    torch.set_num_threads(1)  # identical kernels in every process: the comparison is about sharding
    L.seed_everything(0)  # the LoRA A matrices are drawn at random: the same on every rank
    components = load_components(str(ROOT / "assets" / "toy" / "sd"))
    module = NoLossModule(components.unet, components.noise_scheduler, DPO(beta=250),
                          lora={"rank": 4, "alpha": 4, "target_modules": ["attn2.to_k", "attn2.to_v"]})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a LoRA that changes something, identical on every rank
        for name, p in sorted(module.unet.named_parameters()):
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    prompts = read_toy("heldout")
    prompts = [p for p in prompts if p.kind == "harmful"][:5] + [p for p in prompts if p.kind == "benign"][:3]
    callback = AlignmentValidation({"toy": prompts}, [ToyOracleDetector()], ToyFidelity(),
                                   [IP(), BenignFidelity(), SafeRewriteFidelity(), UAS()], images_per_prompt=1,
                                   sampler={"num_inference_steps": 4, "guidance_scale": 4.0, "batch_size": 1})
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[callback])
    trainer.validate(module, datamodule=PromptsOnly(ConditionEncoder(components)))
    if trainer.is_global_zero:
        out.write_text(json.dumps(callback.last_metrics))


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
