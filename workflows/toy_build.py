"""Rebuild the toy world's model from scratch: tiny CLIP, tiny VAE, tiny UNet pretrained with ``sft``.

    python -m workflows.toy_build --out assets/toy

1. a tiny ``CLIPModel`` trained contrastively on the world's train captions and renders; its text
   tower becomes the pipeline's text encoder, and the whole CLIP is kept in ``<out>/clip``;
2. a tiny ``AutoencoderKL`` (32 px -> 8x8x4 latents) trained to reconstruct renders, with its
   ``scaling_factor`` set to the inverse latent standard deviation;
3. a random UNet assembled with them into a diffusers pipeline, then pretrained by
   ``train.py experiment=toy_pretrain`` (``objective=sft`` on the world's image-caption set);
4. the result saved as a standard StableDiffusionPipeline directory in ``<out>/sd``.

With ``--family sd3`` it builds the toy flow model instead, on the CLIP and VAE already in ``<out>``:

    python -m workflows.toy_build --family sd3 --out assets/toy

an SD 3-style MMDiT (``FLOW_TRANSFORMER``) conditioned on the toy CLIP's text tower with its projection (as both
of SD 3's CLIP encoders, no T5), pretrained by ``train.py experiment=toy_pretrain model=toy_flow`` (rectified-flow
``sft``) and saved as a StableDiffusion3Pipeline directory in ``<out>/flow``.
"""
from __future__ import annotations

import argparse
import copy
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
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from tqdm.auto import tqdm
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from data.toy.world import SIZE, VOCABULARY, Prompt, ToyWorld
from models.builders import DDPM_SD
from models.components import SDComponents
from models.families.base import Components
from models.families.sd3 import SD3_FAMILY
from models.tokenizer_files import write_clip_tokenizer, write_t5_tokenizer

log = logging.getLogger("toy_build")
ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 8  # "<bos> a <colour> <shape> on <background> <eos>" is 7 tokens
UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
)
# the toy flow model's transformer: 4 x 4 tokens of 2 x 2 latent patches, 128 wide; its text input is the two CLIP
# states concatenated (2 x 64 = 128), its pooled input the two 64-wide projections
FLOW_TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=128,
    pos_embed_max_size=8,
)
FLOW_SHIFT = 1.0  # 16 image tokens: no shift towards high noise (SD 3 shifts by 3 at 4096)
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


def install(base: Path, run_dir: Path, denoiser: str, final: Path) -> Path:
    """The pipeline directory ``base`` with the pretrained ``denoiser`` subfolder of ``run_dir``, moved into place
    as ``final`` (a copy staged beside it first)."""
    tmp = final.with_name(f"_{final.name}_new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    shutil.rmtree(tmp / denoiser)
    shutil.copytree(run_dir / denoiser, tmp / denoiser)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def store_half(directory: Path, model_type) -> None:
    """Rewrites the diffusers model folder ``directory`` with float16 weights."""
    model_type.from_pretrained(directory).half().save_pretrained(directory, safe_serialization=True)


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

    final = install(staging / "base", run_dir, "unet", out / "sd")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(vae_dir, ignore_errors=True)
    log.info("toy pipeline written to %s in %.1f min", final, (time.time() - start) / 60)


def build_flow(out: Path, steps: int, seed: int) -> None:
    """The toy flow model from the CLIP and VAE of ``out`` (built by the default family first)."""
    start = time.time()
    if not (out / "clip" / "model.safetensors").is_file() or not (out / "sd" / "vae").is_dir():
        raise SystemExit(f"{out}: build the toy world's CLIP and VAE first (python -m workflows.toy_build --out {out})")
    staging = out / "_flow_staging"
    shutil.rmtree(staging, ignore_errors=True)
    clip = CLIPModel.from_pretrained(out / "clip").eval()
    text_config = clip.config.text_config
    text_config.projection_dim = clip.config.projection_dim
    encoder = CLIPTextModelWithProjection(text_config)
    getattr(encoder, "text_model", encoder).load_state_dict(clip.text_model.state_dict())
    encoder.text_projection.load_state_dict(clip.text_projection.state_dict())
    encoder.requires_grad_(False).eval()
    tokenizer = CLIPTokenizer.from_pretrained(out / "sd" / "tokenizer")
    vae = AutoencoderKL.from_pretrained(out / "sd" / "vae")
    vae.register_to_config(shift_factor=0.0)  # StableDiffusion3Pipeline decodes with (latents / scale) + shift
    torch.manual_seed(seed)
    components = Components(
        unet=SD3Transformer2DModel(**FLOW_TRANSFORMER), vae=vae,
        text_encoder=encoder, tokenizer=tokenizer, text_encoder_2=copy.deepcopy(encoder), tokenizer_2=tokenizer,
        noise_scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT),
        source=str(staging), tokenizer_3=write_t5_tokenizer(staging / "t5", VOCABULARY, model_max_length=4),
        family=SD3_FAMILY,
    )
    components.pipeline().save_pretrained(staging / "base", safe_serialization=True)
    run_dir = staging / "pretrain"
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=toy_pretrain", "model=toy_flow",
           f"model.pretrained={staging / 'base'}", f"trainer.max_steps={steps}", f"seed={seed}",
           f"hydra.run.dir={run_dir}"]
    log.info("pretraining the transformer: %s", " ".join(cmd))
    subprocess.run(cmd, cwd=ROOT, check=True)
    # stored in float16 (half the bytes; diffusers loads them in float32), the text encoders stay float32
    store_half(run_dir / "transformer", SD3Transformer2DModel)
    store_half(staging / "base" / "vae", AutoencoderKL)
    final = install(staging / "base", run_dir, "transformer", out / "flow")
    shutil.rmtree(staging, ignore_errors=True)
    log.info("toy flow pipeline written to %s in %.1f min", final, (time.time() - start) / 60)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "toy")
    parser.add_argument("--clip-steps", type=int, default=600)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="keep the CLIP and VAE already in --out")
    parser.add_argument("--family", choices=["sd", "sd3"], default="sd",
                        help="sd: the toy UNet pipeline (<out>/sd); sd3: the toy flow model (<out>/flow) on its CLIP and VAE")
    parser.add_argument("--flow-steps", type=int, default=3000)
    args = parser.parse_args()
    if args.family == "sd3":
        build_flow(args.out, args.flow_steps, args.seed)
    else:
        build(args.out, args.clip_steps, args.vae_steps, args.unet_steps, args.seed, args.reuse)


if __name__ == "__main__":
    main()
