"""How large a model family's per-sample training errors are on the toy world, the scale dpo's ``beta`` multiplies.

    python benchmarks/error_scale.py                      # the toy UNet (epsilon) and the toy flow model (velocity)
    python benchmarks/error_scale.py --models assets/toy/flow --draws 64

For each pipeline: the toy world's training pairs (harmful image as loser, its safe rewrite's as winner), each
pair's error difference ``d = e(x_w) - e(x_l)`` under the pretrained model at one shared noise level and noise
(drawn as the family trains), over ``--draws`` draws. dpo's logit is ``-(beta/2)(d_theta - d_ref)``, and what
training can move ``d_theta`` by is a fraction of how far ``d`` spreads, so two families get comparable logits at
betas in the inverse ratio of their spreads (the last column, relative to the first model).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.toy.world import ToyWorld
from models.components import load_components
from models.encoders import ConditionEncoder


def pixels(images) -> torch.Tensor:
    array = np.stack([np.asarray(image, dtype=np.float32) / 127.5 - 1 for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2)


@torch.no_grad()
def error_differences(pretrained: str, pairs: int, draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample errors ``[draws, 2 * pairs]`` and differences ``[draws, pairs]`` (winner minus loser)."""
    index = json.loads((Path(pretrained) / "model_index.json").read_text())
    no_t5 = index.get("text_encoder_3", [None])[0] is None and "transformer" in index  # SD 3 without T5
    components = load_components(pretrained, family_options={"t5": False, "max_sequence_length": 4} if no_t5 else None)
    family, denoiser, scheduler = components.family, components.unet.eval(), components.noise_scheduler
    encoder = ConditionEncoder(components)
    world = ToyWorld()
    harmful = [p for p in world.split["train_harmful"]][:pairs]
    prompts = [p.text for p in harmful]
    z_w = encoder.encode_images(pixels([world.render(p.safe_rewrite(), 0) for p in harmful]))
    z_l = encoder.encode_images(pixels([world.render(p, 0) for p in harmful]))
    cond = family.conditioning(encoder.encode_prompt_tensors(prompts), ("w", "l"))
    latents = torch.cat([z_w, z_l])
    n = len(prompts)
    generator = torch.Generator().manual_seed(seed)
    steps = scheduler.config.num_train_timesteps
    errors, diffs = [], []
    for _ in range(draws):
        noise = torch.randn(z_w.shape, generator=generator).repeat(2, 1, 1, 1)
        t = family.draw_timesteps(scheduler, z_w.shape, 0, steps - 1, generator=generator).repeat(2)
        noisy, target = family.noisy_and_target(scheduler, latents, noise, t)
        e = (family.predict(denoiser, noisy, t, cond) - target).pow(2).mean(dim=(1, 2, 3))
        errors.append(e.numpy())
        diffs.append((e[:n] - e[n:]).numpy())
    return np.stack(errors), np.stack(diffs)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[str(ROOT / "assets" / "toy" / "sd"),
                                                        str(ROOT / "assets" / "toy" / "flow")])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = []
    for pretrained in args.models:
        errors, diffs = error_differences(pretrained, args.pairs, args.draws, args.seed)
        rows.append({"model": pretrained, "mean_error": float(errors.mean()), "median_error": float(np.median(errors)),
                     "spread": float(diffs.std())})
    print("| model | mean error | median error | std of e(x_w) - e(x_l) | beta for the same logits |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        ratio = rows[0]["spread"] / row["spread"]
        print(f"| {Path(row['model']).name} | {row['mean_error']:.4f} | {row['median_error']:.4f} | "
              f"{row['spread']:.4f} | {ratio:.2f} x |")
    return rows


if __name__ == "__main__":
    main()
