"""Rebuild the toy world's model from scratch: tiny CLIP, tiny VAE, tiny UNet pretrained with ``sft``.

    python -m workflows.toy_build --out assets/toy

1. a tiny ``CLIPModel`` trained contrastively on the world's train captions and renders; its text
   tower becomes the pipeline's text encoder, and the whole CLIP is kept in ``<out>/clip``;
2. a tiny ``AutoencoderKL`` (32 px -> 8x8x4 latents) trained to reconstruct renders, with its
   ``scaling_factor`` set to the inverse latent standard deviation;
3. a random UNet assembled with them into a diffusers pipeline, then pretrained by
   ``train.py experiment=toy_pretrain`` (``objective=sft`` on the world's image-caption set);
4. the result saved as a standard StableDiffusionPipeline directory in ``<out>/sd``.
"""
from __future__ import annotations

import argparse
import logging
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPTokenizer

from data.toy.world import SIZE, VOCABULARY, Prompt, ToyWorld
from models.builders import DDPM_SD
from models.components import SDComponents
from models.tokenizer_files import write_clip_tokenizer

log = logging.getLogger("toy_build")
ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 8  # "<bos> a <colour> <shape> on <background> <eos>" is 7 tokens
UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=32, sample_size=SIZE,
)


def to_pixels(image) -> torch.Tensor:
    """A PIL image as ``[3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def render_set(world: ToyWorld, prompts: list[Prompt], seeds: int) -> torch.Tensor:
    """Renders of ``prompts`` x ``seeds`` as ``[N, 3, 32, 32]`` in [-1, 1]."""
    return torch.stack([to_pixels(world.render(prompt, seed)) for prompt in prompts for seed in range(seeds)])


def train_clip(world: ToyWorld, tokenizer: CLIPTokenizer, steps: int, seed: int) -> CLIPModel:
    """Contrastive training on batches of distinct train prompts (so no false negatives in a batch)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=SIZE, patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_channels=3),
        projection_dim=64,
    )
    model = CLIPModel(config)
    prompts = world.split["train_benign"] + world.split["train_harmful"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model.train()
    for step in tqdm(range(steps), desc="Training tiny CLIP"):
        batch = rng.sample(prompts, min(64, len(prompts)))
        pixels = torch.stack([to_pixels(world.render(p, rng.randrange(10**6))) for p in batch])
        ids = tokenizer([p.text for p in batch], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
        loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0:
            log.info("clip step %d loss %.4f", step, loss.item())
    return model.eval()


def train_vae(pixels: torch.Tensor, steps: int, seed: int, kl_weight: float = 1e-6) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    vae.train()
    g = torch.Generator().manual_seed(seed)
    for step in tqdm(range(steps), desc="Training tiny VAE"):
        x = pixels[torch.randint(0, len(pixels), (32,), generator=g)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 200 == 0:
            log.info("vae step %d loss %.5f", step, loss.item())
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


def build(out: Path, clip_steps: int, vae_steps: int, unet_steps: int, seed: int, reuse: bool = False) -> None:
    """Run every stage; with ``reuse``, keep a CLIP and VAE already built in ``out`` and redo the UNet."""
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    staging = out / "_staging"
    shutil.rmtree(staging, ignore_errors=True)
    world = ToyWorld()
    tokenizer = write_clip_tokenizer(staging / "tokenizer", VOCABULARY, model_max_length=MAX_TOKENS)

    clip_dir = out / "clip"
    if reuse and (clip_dir / "model.safetensors").is_file():
        clip = CLIPModel.from_pretrained(clip_dir).eval()
    else:
        clip = train_clip(world, tokenizer, clip_steps, seed)
        shutil.rmtree(clip_dir, ignore_errors=True)
        clip.save_pretrained(clip_dir, safe_serialization=True)
        tokenizer.save_pretrained(clip_dir)
        # images of any size (a user's data, not only the world's) come to the CLIP's 32 px as real CLIPs do
        CLIPImageProcessor(do_resize=True, size={"shortest_edge": SIZE}, do_center_crop=True,
                           crop_size={"height": SIZE, "width": SIZE}, do_rescale=True, rescale_factor=1 / 255,
                           do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(clip_dir)
    log.info("tiny CLIP ready in %s (%.0f s)", clip_dir, time.time() - start)

    vae_dir = out / "_vae"
    if reuse and (vae_dir / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    else:
        pixels = render_set(world, world.split["train_benign"] + world.split["train_harmful"], seeds=16)
        vae = train_vae(pixels, vae_steps, seed)
        vae.save_pretrained(vae_dir)
    log.info("tiny VAE ready (%.0f s)", time.time() - start)
    text_encoder = CLIPTextModel(clip.config.text_config)
    # transformers 5 flattens CLIPTextModel; 4.x nests it under .text_model
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())
    torch.manual_seed(seed)
    components = SDComponents(
        unet=UNet2DConditionModel(**UNET), vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler(**DDPM_SD), source=str(staging),
    )
    components.pipeline(scheduler=DDIMScheduler(**DDPM_SD, set_alpha_to_one=False)) \
        .save_pretrained(staging / "base", safe_serialization=True)
    log.info("random-UNet pipeline assembled (%.0f s)", time.time() - start)

    run_dir = staging / "pretrain"
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=toy_pretrain", f"model.pretrained={staging / 'base'}",
           f"trainer.max_steps={unet_steps}", f"seed={seed}", f"hydra.run.dir={run_dir}"]
    log.info("pretraining the UNet: %s", " ".join(cmd))
    subprocess.run(cmd, cwd=ROOT, check=True)

    final = out / "sd"
    tmp = out / "_sd_new"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(staging / "base", tmp)
    shutil.rmtree(tmp / "unet")
    shutil.copytree(run_dir / "unet", tmp / "unet")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(vae_dir, ignore_errors=True)
    log.info("toy pipeline written to %s in %.1f min", final, (time.time() - start) / 60)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "toy")
    parser.add_argument("--clip-steps", type=int, default=600)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="keep the CLIP and VAE already in --out")
    args = parser.parse_args()
    build(args.out, args.clip_steps, args.vae_steps, args.unet_steps, args.seed, args.reuse)


if __name__ == "__main__":
    main()
