"""Training-step and sampling throughput: the public Diffusion-DPO/SafetyDPO recipe against this project.

    python benchmarks/train_step.py --model toy                        # CPU, the shipped toy pipeline
    python benchmarks/train_step.py --model sd15-arch --batch 8 --device cuda --dtype bf16
    python benchmarks/train_step.py --model sd15-arch --resolution 64 --batch 1 --steps 3   # GPU path, tiny, on CPU
    python benchmarks/train_step.py --model sdxl-arch --batch 4 --device cuda                # SDXL base 1.0's shapes
    python benchmarks/train_step.py --model sdxl-tiny --batch 2 --steps 1                     # the SDXL path, tiny
    python benchmarks/train_step.py --model sd3-arch --resolution 128 --batch 1 --steps 2    # SD 3 medium's shapes
    python benchmarks/train_step.py --model sd3-tiny --batch 2 --steps 1                      # the flow path, tiny

The model family decides what a step computes (``models/families/``): SDXL's reference encodes the prompts with
both text encoders every step and its UNets take the pooled embedding and the time ids; ours reads them cached.
SD 3 draws logit-normal noise levels and regresses velocities (rectified flow); ``sd3-arch`` leaves T5-XXL out
(4.7 B parameters, 19 GB in float32; SD 3 trains and samples without it, its tokens then zeros), so the reference's
per-step text encoding is the two CLIP towers'.

Both variants run in this process, side by side, on the same random-weight components and batches:

* ``reference``: what the public train.py does every step: VAE-encode both images and text-encode the
  prompt, run the LoRA policy UNet and a second, frozen UNet as the reference, fp16 autocast with a
  gradient scaler on GPUs (fp32 on CPU), PyTorch SDPA attention, AdamW.
* ``ours``: the project's training path, ``AlignmentModule.compute`` on cached latents and text
  embeddings (what the DataLoader yields), the reference through disabled adapters (one UNet), plus the
  switchable optimizations given by ``--ours`` (bf16, channels_last, fused AdamW, torch.compile, cuDNN
  attention first, policy and reference batched in one forward).

Each variant: ``--warmup`` steps, then ``--repeats`` timed runs of ``--steps`` steps; pairs/s is
``batch * steps / time`` per run (median, min, max), the FLOPs of one step (``torch.utils.flop_counter``:
matrix products, convolutions, attention) and the TFLOP/s they run at; on GPUs also peak memory and MFU.
A last table gives sampling images/s.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import itertools
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers.models.attention_processor import AttnProcessor2_0
from peft import LoraConfig
from torch.profiler import ProfilerActivity, profile
from torch.utils import flop_counter
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from alignment.dpo import DPO
from data.pairs import square_geometry
from models.alignment_module import AlignmentModule
from models.builders import (
    SD15_TEXT,
    SD15_UNET,
    SD15_VAE,
    SDXL_PROJECTION,
    SDXL_TEXT,
    SDXL_TEXT_2,
    SDXL_UNET,
    SDXL_VAE,
    build_components,
    build_sd3_components,
    build_sdxl_components,
)
from models.components import SDComponents, load_components
from models.sampling import SamplerSettings, generate, use_scheduler

# dense bf16/fp16 tensor-core peak, TFLOP/s (NVIDIA datasheets, SXM parts)
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
# benchmark option -> model.compile value
COMPILE_MODES = {"autotune": "max-autotune-no-cudagraphs", "cudagraphs": "reduce-overhead", "compile": True}
OPTIONS = {"bf16", "channels_last", "fused", "cudnn_benchmark", "cudnn_attention", "batched", "lightning", *COMPILE_MODES}
MODELS = ("toy", "sd15-arch", "sdxl-arch", "sdxl-tiny", "sd3-arch", "sd3-tiny")
# Stable Diffusion 3 medium (published config values of its transformer/, vae/, text_encoder/ and text_encoder_2/);
# build_sd3_components derives the transformer's text width (T5's 4096) and pooled input (768 + 1280)
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)
SD3_VAE = {**SD15_VAE, "latent_channels": 16, "sample_size": 1024, "use_quant_conv": False, "use_post_quant_conv": False}
SD3_TEXT_2 = {**SDXL_TEXT_2}  # OpenCLIP ViT-bigG/14 text tower (both CLIPs keep their projections in SD 3)
PROMPT = "a photo of a red circle"
LORA = dict(rank=8, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def components_for(model: str, tmp: Path) -> SDComponents:
    if model == "toy":
        return load_components(str(ROOT / "assets" / "toy" / "sd"))

    words = ["a", "photo", "of", "red", "circle"]
    if model == "sdxl-arch":
        return build_sdxl_components(tmp / "sdxl", unet=SDXL_UNET, vae=SDXL_VAE, text=SDXL_TEXT, text_2=SDXL_TEXT_2,
                                     projection_dim=SDXL_PROJECTION, words=words)
    if model == "sdxl-tiny":
        return build_sdxl_components(tmp / "sdxl_tiny", words=words)
    if model == "sd3-arch":  # no T5 (see the module docstring); both CLIP towers project to 768 / 1280
        return build_sd3_components(tmp / "sd3", transformer=SD3_TRANSFORMER, vae=SD3_VAE, text=SDXL_TEXT,
                                    text_2=SD3_TEXT_2, t5=None, t5_width=4096, projection_dim=(768, 1280),
                                    max_sequence_length=256, words=words)
    if model == "sd3-tiny":
        return build_sd3_components(tmp / "sd3_tiny", words=words)
    return build_components(tmp / "sd15", unet=SD15_UNET, vae=SD15_VAE, text=SD15_TEXT, words=words)


def cached_keys(components: SDComponents) -> tuple[str, ...]:
    """What ours' latent cache yields per batch: both sides' latents, the family's per-prompt tensors and its
    per-image-side ones (SDXL's time ids)."""
    family = components.family
    return ("latents_w", "latents_l", *family.prompt_keys, *(f"{k}_{s}" for k in family.image_keys for s in "wl"))


def make_batch(components: SDComponents, pairs: int, resolution: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """What each variant's data loader hands over, in host memory: images and token ids (``input_ids_<i>`` per
    text encoder) for the reference; cached latents, the family's prompt tensors and per-image tensors for ours."""
    g = torch.Generator().manual_seed(seed)
    family = components.family
    ids = {f"input_ids_{i}": token_ids(tokenizer, [PROMPT] * pairs)
           for i, (_, _, tokenizer) in enumerate(components.text_encoders())}
    latent = resolution // (2 ** (len(components.vae.config.block_out_channels) - 1))
    channels = components.vae.config.latent_channels
    with torch.no_grad():
        encoded = family.encode_prompts(components, [PROMPT], torch.device("cpu"))
    batch = {
        "pixels": torch.randint(0, 256, (2 * pairs, 3, resolution, resolution), generator=g, dtype=torch.uint8),
        **ids,
        "latents_w": torch.randn(pairs, channels, latent, latent, generator=g),
        "latents_l": torch.randn(pairs, channels, latent, latent, generator=g),
        **{k: v.float().repeat(pairs, *([1] * (v.ndim - 1))) for k, v in encoded.items()},
    }
    image = family.image_conditioning(square_geometry(resolution))  # square images, no crop (SDXL's time ids)
    for key, value in image.items():
        for side in "wl":
            batch[f"{key}_{side}"] = value.float().repeat(pairs, 1)
    return batch


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


class IdsTokenizer:
    """Stands in for a tokenizer inside the reference's text encoding: the data loader tokenized already, so
    ``encode_prompts`` gets the batch's ids back (whatever the "prompts" it is given)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids = tokenizer, None
        self.model_max_length = tokenizer.model_max_length

    def __call__(self, prompts, **kwargs):
        return type("Tokens", (), {"input_ids": self.ids})()


def recipe_dpo_loss(err: torch.Tensor, ref_err: torch.Tensor, beta: float) -> torch.Tensor:
    """The public recipe's loss on per-sample errors ``[winners; losers]``, written as it writes it."""
    n = err.shape[0] // 2
    diff = (err[:n] - err[n:]) - (ref_err[:n] - ref_err[n:])
    return -torch.nn.functional.logsigmoid(-beta * 0.5 * diff).mean()


def variant_copy(module: torch.nn.Module, share: bool) -> torch.nn.Module:
    """A variant's own copy of a component. With ``share`` (on the CPU, where the tables report no memory) the
    copy's parameters and buffers are the original's tensors: variants only read frozen weights, and SDXL's
    reference (two UNets, two text encoders beside the originals) would not fit in 24 GiB of RAM otherwise."""
    if not share:
        return copy.deepcopy(module)
    return copy.deepcopy(module, {id(t): t for t in itertools.chain(module.parameters(), module.buffers())})


class Variant:
    """One side of the comparison: a training ``step`` on a host batch, timed by :meth:`rates`."""
    device: torch.device

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def rates(self, batch: dict, pairs: int, steps: int, warmup: int, repeats: int) -> list[float]:
        """Pairs/s of ``repeats`` runs of ``steps`` steps after ``warmup`` steps (peak memory counted from the
        first timed step)."""
        for _ in range(warmup):
            self.step(batch)
        synchronize(self.device)
        reset_peak_memory(self.device)
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                self.step(batch)
            synchronize(self.device)
            rates.append(pairs * steps / (time.perf_counter() - start))
        return rates


class Reference(Variant):
    """The public recipe, rebuilt with our components (see module docstring)."""
    def __init__(self, components: SDComponents, device: torch.device, beta: float) -> None:

        self.device, self.beta = device, beta
        share = device.type == "cpu"  # nothing below casts or moves weights on the CPU
        self.vae = variant_copy(components.vae, share).requires_grad_(False).to(device)
        # the family's text encoding on copies of its encoders, fed the loader's token ids
        self.family, self.tokenizers = components.family, [IdsTokenizer(t) for _, _, t in components.text_encoders()]
        texts = [variant_copy(e, share).requires_grad_(False).to(device) for _, e, _ in components.text_encoders()]
        names = [name for name, _, _ in components.text_encoders()]
        self.encoders = dataclasses.replace(components, **{name: text for name, text in zip(names, texts)},
                                            **{name.replace("text_encoder", "tokenizer"): tokenizer
                                               for name, tokenizer in zip(names, self.tokenizers)})
        self.scheduler = components.noise_scheduler
        self.ref = variant_copy(components.unet, share).requires_grad_(False).to(device).eval()
        self.policy = variant_copy(components.unet, share).requires_grad_(False)
        self.policy.add_adapter(LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"],
                                           init_lora_weights="gaussian"))
        if components.family.denoiser_name == "unet":  # the transformers' default processors are SDPA already
            for unet in (self.ref, self.policy):
                unet.set_attn_processor(AttnProcessor2_0())
        self.policy.to(device).train()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        fp16 = device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.float16) if fp16 else nullcontext()
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        pixels = batch["pixels"].to(self.device, non_blocking=True).float().div(127.5).sub(1)
        for i, tokenizer in enumerate(self.tokenizers):
            tokenizer.ids = batch[f"input_ids_{i}"].to(self.device, non_blocking=True)
        n = pixels.shape[0] // 2
        image = {k: batch[k].to(self.device, non_blocking=True) for k in batch if k.startswith("time_ids_")}
        with self.autocast:
            with torch.no_grad():
                shift = self.vae.config.get("shift_factor") or 0.0
                latents = (self.vae.encode(pixels).latent_dist.sample() - shift) * self.vae.config.scaling_factor
                encoded = self.family.encode_prompts(self.encoders, [PROMPT] * n, self.device)
                cond = self.family.conditioning({**encoded, **image}, ("w", "l"))
            noise = torch.randn_like(latents[:n]).repeat(2, 1, 1, 1)
            # the family's training draw: integer timesteps (DDPM) or shifted logit-normal noise levels (flow)
            steps = self.scheduler.config.num_train_timesteps
            t = self.family.draw_timesteps(self.scheduler, latents[:n].shape, 0, steps - 1, device=self.device).repeat(2)
            noisy, target = self.family.noisy_and_target(self.scheduler, latents, noise, t)
            pred = self.family.predict(self.policy, noisy, t, cond)
            with torch.no_grad():
                ref = self.family.predict(self.ref, noisy, t, cond)
            err = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
            ref_err = (ref.float() - target).pow(2).mean(dim=(1, 2, 3))
            loss = recipe_dpo_loss(err, ref_err, self.beta)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


class Ours(Variant):
    """The project's path: ``AlignmentModule`` (as ``train.py`` builds it) on cached latents."""

    def __init__(self, components: SDComponents, device: torch.device, beta: float, options: set[str]) -> None:
        self.device, self.keys = device, cached_keys(components)
        self.bf16 = bf16 = "bf16" in options
        share = device.type == "cpu" and not options & {"bf16", "channels_last"}  # those two convert the weights
        self.module = AlignmentModule(
            variant_copy(components.unet, share), components.noise_scheduler, DPO(beta=beta), lora=LORA, family=components.family,
            optimizer={"lr": 1e-5, "fused": "fused" in options}, frozen_dtype="bfloat16" if bf16 else "float32",
            channels_last="channels_last" in options, batch_reference="batched" in options,
            attention_backend="cudnn" if "cudnn_attention" in options else None,
            compile=next((mode for option, mode in COMPILE_MODES.items() if option in options), False),
        ).to(device)
        self.optimizer = self.module.configure_optimizers()["optimizer"]
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.generator = torch.Generator().manual_seed(0)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        on_device = {k: batch[k].to(self.device, non_blocking=True) for k in self.keys}
        with self.autocast:
            out = self.module.compute(on_device, self.generator)
        self.module.backward(out.loss)  # the module's hook, as Lightning calls it
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class OursTrainer(Ours):
    """``ours`` run as ``train.py`` runs it: Lightning's Trainer with a DataLoader, the batch's device transfer,
    ``training_step`` (per-step generator, finite-loss check, logging), optimizer and scheduler steps. Only the
    progress bar is off. Its FLOPs and ``--profile`` come from the bare step, which does the same work."""

    def rates(self, batch: dict, pairs: int, steps: int, warmup: int, repeats: int) -> list[float]:
        cached = {k: batch[k] for k in self.keys}
        boundaries = [warmup + r * steps for r in range(repeats + 1)]
        timer = BoundaryTimer(self.device, boundaries)
        loader = DataLoader([cached] * (boundaries[-1] + 1), batch_size=None, pin_memory=self.device.type == "cuda")
        trainer = L.Trainer(accelerator="gpu" if self.device.type == "cuda" else "cpu", devices=1,
                            precision="bf16-mixed" if self.bf16 else "32-true", max_steps=boundaries[-1] + 1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[timer])
        trainer.fit(self.module, train_dataloaders=loader)
        t = timer.times
        return [pairs * steps / (t[b1] - t[b0]) for b0, b1 in zip(boundaries, boundaries[1:])]


class BoundaryTimer(L.Callback):
    """Notes the time (after a device sync) as each of the given batch indices starts; only there, so the host
    runs ahead of the device between boundaries as in training."""

    def __init__(self, device: torch.device, boundaries: list[int]) -> None:
        self.device, self.boundaries, self.first = device, set(boundaries), min(boundaries)
        self.times: dict[int, float] = {}

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        if batch_idx in self.boundaries:
            synchronize(self.device)
            if batch_idx == self.first:
                reset_peak_memory(self.device)
            self.times[batch_idx] = time.perf_counter()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def count_cpu_flash_attention() -> None:
    """FlopCounterMode knows the GPU attention kernels but not the CPU flash kernel; count it as it counts them
    (the backward's 5 matrix products included), so CPU and GPU FLOPs per step agree."""
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def step_flops(step: Callable[[dict], None], batch: dict) -> float:
    count_cpu_flash_attention()
    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    return float(counter.get_total_flops())


def measure(name: str, runner: Variant, batch: dict, pairs: int, steps: int, warmup: int, repeats: int) -> dict:
    device = runner.device
    rates = runner.rates(batch, pairs, steps, warmup, repeats)
    row = {"variant": name, "median": statistics.median(rates), "min": min(rates), "max": max(rates)}
    row["gflop_step"] = step_flops(runner.step, batch) / 1e9  # the work a step asks for, whatever the device
    row["tflops"] = row["gflop_step"] * row["median"] / pairs / 1e3
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        name_gpu = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name_gpu), None)
        row["mfu"] = row["tflops"] / peak if peak else float("nan")
    return row


def print_profile(name: str, step: Callable[[dict], None], batch: dict, device: torch.device, steps: int) -> None:
    """Where a variant's step spends its time: the operators (and on GPUs kernels) with the most self time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(batch)
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of {name}, {steps} steps:\n" + prof.key_averages().table(sort_by=key, row_limit=25), flush=True)


def sampling_rate(components: SDComponents, device: torch.device, scheduler: str, steps: int, batch: int,
                  resolution: int, dtype: torch.dtype) -> float:

    pipe = components.pipeline()
    use_scheduler(pipe, scheduler)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    settings = SamplerSettings(scheduler=scheduler, num_inference_steps=steps, guidance_scale=7.5, batch_size=batch,
                               height=resolution, width=resolution)
    generate(pipe, ["a red circle"] * batch, list(range(batch)), settings, progress=False)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    generate(pipe, ["a red circle"] * batch, list(range(batch)), settings, progress=False)
    synchronize(device)
    return batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="toy")
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the model's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ours", default="auto",
                        help="comma list of bf16, channels_last, fused, compile, autotune (compile with max-autotune, "
                             "no CUDA graphs), cudagraphs (compile with reduce-overhead), cudnn_benchmark, cudnn_attention (cuDNN "
                             "first for SDPA), batched (policy and reference in one forward), lightning (run by Lightning's Trainer "
                             "with a DataLoader, as train.py runs it); auto: bf16,channels_last,fused,cudnn_benchmark on GPUs, none on CPU")
    parser.add_argument("--also", default="", help="extra 'ours' variants to time, ';'-separated option lists")
    parser.add_argument("--sampling-steps", type=int, default=20, help="0 skips the sampling table")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="print each variant's top operators/kernels by self time")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    options = ({"bf16", "channels_last", "fused", "cudnn_benchmark"} if device.type == "cuda" else set()) if args.ours == "auto" \
        else {o for o in args.ours.split(",") if o}
    # None: the reference recipe; a set: ours with those options (the first is --ours, then each of --also)
    variants: list[set[str] | None] = [None, options] + [{o for o in extra.split(",") if o}
                                                         for extra in filter(None, args.also.split(";"))]
    for opts in filter(None, variants):
        if opts - OPTIONS:
            parser.error(f"unknown option(s) {sorted(opts - OPTIONS)} in --ours/--also; known: {sorted(OPTIONS)}")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        components = components_for(args.model, Path(tmp))
    resolution = args.resolution or components.resolution
    batch = make_batch(components, args.batch, resolution)
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    beta = 5000.0
    rows = []
    for opts in variants:
        name = "reference" if opts is None else "ours" + (f" [{','.join(sorted(opts))}]" if opts else "")
        # the public recipe leaves cuDNN's default
        torch.backends.cudnn.benchmark = opts is not None and "cudnn_benchmark" in opts
        runner = None
        try:  # a variant that fails (out of memory, a compile mode the step does not support) is a row, not the end
            runner = Reference(components, device, beta) if opts is None else \
                (OursTrainer if "lightning" in opts else Ours)(components, device, beta, opts)
            rows.append(measure(name, runner, batch, args.batch, args.steps, args.warmup, args.repeats))
        except Exception as error:  # noqa: BLE001 - reported in the table and on stderr
            if opts is None:
                raise
            traceback.print_exc()
            rows.append({"variant": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"})
            print(f"failed {name}: {rows[-1]['error']}", file=sys.stderr, flush=True)
        else:
            print(f"measured {name}: {rows[-1]['median']:.2f} pairs/s, {rows[-1].get('peak_gib', 0):.1f} GiB, "
                  f"{rows[-1]['tflops']:.3g} TFLOP/s", file=sys.stderr, flush=True)
            if args.profile:
                print_profile(name, runner.step, batch, device, args.steps)
        del runner
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\ntraining step, dpo with LoRA r{LORA['rank']}, model {args.model} at {resolution} px, {args.batch} pairs/step, "
          f"{device_name}, torch {torch.__version__}\n")
    gpu = device.type == "cuda"
    header = "| variant | pairs/s median | min | max | x reference | GFLOP/step | TFLOP/s |" + (" peak GiB | MFU |" if gpu else "")
    print(header + "\n|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if gpu else ""))
    base = rows[0]["median"]
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error']} |")
            continue
        line = (f"| {r['variant']} | {r['median']:.2f} | {r['min']:.2f} | {r['max']:.2f} | {r['median'] / base:.2f} | "
                f"{r['gflop_step']:.1f} | {r['tflops']:.3g} |")
        if gpu:
            line += f" {r['peak_gib']:.1f} | {r['mfu']:.0%} |"
        print(line)
    if args.sampling_steps <= 0:
        return rows
    print(f"\nsampling, {args.sampling_steps} steps, classifier-free guidance, batch {args.batch}:\n")
    print("| scheduler | dtype | images/s |\n|---|---|---:|")
    for dtype in ([torch.float32, torch.bfloat16] if gpu else [torch.float32]):
        for scheduler in components.family.sampling_schedulers[:2]:  # UNets: ddim, dpm; flow: euler
            rate = sampling_rate(components, device, scheduler, args.sampling_steps, args.batch, resolution, dtype)
            print(f"| {scheduler} | {str(dtype).removeprefix('torch.')} | {rate:.2f} |")
    return rows


if __name__ == "__main__":
    main()
