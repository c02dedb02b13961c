"""The LightningModule shared by every objective: noising, policy/reference errors, optimization.

Per docs/methods/diffusion-dpo.md, each pair gets one timestep and one noise draw shared by winner and loser. The
reference is the same UNet with its LoRA adapters disabled, so only one UNet is in memory; full
fine-tuning keeps a frozen copy instead.
"""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import lightning as L
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from peft import LoraConfig
from torch import Tensor

from alignment.base import Objective, ObjectiveOutput, PairErrors, anchor_flags, benign_drift, select_meta
from common.dtypes import torch_dtype
from common.errors import InputError
from models.attention_backend import attention_backend, check_attention_backend
from models.families.base import DEFAULT_FAMILY, FAMILIES, ModelFamily
from models.hub import unet_config_digest
from models.mixed_adapters import BASE_ADAPTER, MixedAdapterBatch
from models.optimizers import build_optimizer

log = logging.getLogger(__name__)


def check_batch_reference(batch_reference: bool, lora: Mapping[str, Any] | None, gradient_checkpointing: bool) -> None:
    """``model.batch_reference`` runs the reference as the same UNet with its adapters off, so it needs LoRA; and
    which samples skip the adapters is known during the forward only, not when checkpointing recomputes it."""
    if batch_reference and lora is None:
        raise InputError("model.batch_reference: needs model.lora (the reference must be the same UNet with its "
                         "adapters off); full fine-tuning keeps a separate reference UNet")
    if batch_reference and gradient_checkpointing:
        raise InputError("model.batch_reference: cannot be combined with model.gradient_checkpointing (the "
                         "recomputed forward would run the adapters on the reference half too)")


HALF_PRECISIONS = ("bf16-mixed", "16-mixed", "bf16-true", "16-true", "bf16", "16")


def check_frozen_dtype(frozen_dtype: str, lora: Mapping[str, Any] | None, precision: Any) -> None:
    """A half-precision frozen base under LoRA multiplies half weights by float32 activations unless
    Lightning's precision casts them (autocast): refuse the combination that would fail in the first step."""
    torch_dtype(frozen_dtype, "model.frozen_dtype")
    if lora is not None and frozen_dtype != "float32" and str(precision) not in HALF_PRECISIONS:
        raise InputError(f"model.frozen_dtype={frozen_dtype}: needs trainer.precision=bf16-mixed (or 16-mixed), "
                         f"which runs the frozen base under autocast; got trainer.precision={precision}")


class NonFiniteLoss(InputError):
    """The loss became NaN or infinite: training stops before the optimizer step, so no weights are corrupted."""


class AlignmentModule(L.LightningModule):
    """Wraps a diffusers UNet (with a peft LoRA adapter, or fully trainable) and an :class:`Objective`."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        noise_scheduler: DDPMScheduler,
        objective: Objective,
        lora: Mapping[str, Any] | None = None,
        adapter_name: str = "default",
        optimizer: Mapping[str, Any] | None = None,
        lr_scheduler: Mapping[str, Any] | None = None,
        t_min: int = 0,
        t_max: int | None = None,
        gradient_checkpointing: bool = False,
        frozen_dtype: str = "float32",
        seed: int = 0,
        channels_last: bool = False,
        compile: bool | str = False,
        benign_anchor: float = 0.0,
        batch_reference: bool = False,
        attention_backend: str | None = None,
        scale_lr: bool = False,
        base_model: str | None = None,
        family: ModelFamily | None = None,
        noise_sampling: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.objective = objective
        # how the denoiser is conditioned, noised and called (models/families/); SD 1.x/2.x unless given
        self.family = family or FAMILIES[DEFAULT_FAMILY]
        self.noise_scheduler = noise_scheduler
        self.adapter_name = adapter_name
        self.seed = int(seed)
        self.optimizer_cfg = dict(optimizer or {"lr": 1e-5})
        # as the diffusers scripts' --scale_lr: the learning rate given is per pair of the effective batch
        self.scale_lr = bool(scale_lr)
        self.base_model = base_model  # recorded in checkpoints: a resume on another base model is refused
        self.lr_scheduler_cfg = dict(lr_scheduler or {"name": "constant", "warmup_steps": 0})
        num_train = noise_scheduler.config.num_train_timesteps
        self.t_min, self.t_max = int(t_min), int(num_train - 1 if t_max is None else t_max)
        if not 0 <= self.t_min <= self.t_max < num_train:
            raise InputError(f"model.t_min/t_max: expected 0 <= t_min <= t_max < {num_train}, got {self.t_min}, {self.t_max}")
        if benign_anchor < 0:
            raise InputError(f"model.benign_anchor: expected a number >= 0, got {benign_anchor}")
        self.benign_anchor = float(benign_anchor)
        self.attention_backend = check_attention_backend(attention_backend)
        self.family.check_scheduler(noise_scheduler)
        self.family.check_noise_sampling(noise_sampling)
        self.noise_sampling = dict(noise_sampling) if noise_sampling else None
        check_batch_reference(batch_reference, lora, gradient_checkpointing)
        # Only trainable tensors are checkpointed; frozen weights come back from the pretrained model.
        self.strict_loading = False

        self.unet = unet
        self.frozen_dtype = frozen_dtype
        self.ref_unet: UNet2DConditionModel | None = None
        self.uses_lora = lora is not None
        if self.uses_lora:
            unet.requires_grad_(False)
            base_dtype = torch_dtype(frozen_dtype, "model.frozen_dtype")
            if base_dtype != unet.dtype:
                unet.to(base_dtype)
            targets = list(lora.get("target_modules", ["to_q", "to_k", "to_v", "to_out.0"]))
            try:
                unet.add_adapter(LoraConfig(
                    r=int(lora["rank"]),
                    lora_alpha=float(lora.get("alpha", lora["rank"])),
                    target_modules=targets,
                    lora_dropout=float(lora.get("dropout", 0.0)),
                    init_lora_weights="gaussian",
                ), adapter_name=adapter_name)
            except ValueError as error:  # peft: no module of the UNet matches a target
                first = (str(error).strip().splitlines() or ["no match"])[0]
                raise InputError(f"model.lora.target_modules={targets}: not modules of this UNet ({first})") from None
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # adapters train in float32 whatever the base dtype
        else:
            unet.requires_grad_(True)
            if self.needs_reference:
                self.ref_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        unet.train()  # from_pretrained returns eval mode; checkpointing and LoRA dropout need train mode
        # batch_reference: policy and reference in one forward of the doubled batch. The backward then runs over
        # both halves, so it pays only where reading weights or launching kernels, not compute, bounds the step.
        self._mixed = MixedAdapterBatch(unet) if batch_reference else None
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        # The compiled callable is kept off the module tree (no second copy of the weights in state_dict);
        # self.unet stays the plain module that adapters, exports and checkpoints see.
        # compile: true (default mode) or a torch.compile mode name such as "max-autotune-no-cudagraphs".
        run = torch.compile(unet, mode=compile if isinstance(compile, str) else None) if compile else unet
        object.__setattr__(self, "_run_unet", run)

    # ----------------------------------------------------------------- errors
    def trainable_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    @contextmanager
    def reference(self) -> Iterator[UNet2DConditionModel]:
        """The reference model: the frozen copy, or the same UNet with its adapters switched off."""
        if self.ref_unet is not None:
            yield self.ref_unet
            return
        if not self.uses_lora:
            raise RuntimeError("full fine-tuning keeps a reference copy only for objectives that read it "
                               "(or model.benign_anchor); use AlignmentModule.base() for the untrained model")
        self.unet.disable_adapters()
        try:
            yield self.unet
        finally:
            self.unet.enable_adapters()

    @contextmanager
    def base(self) -> Iterator[UNet2DConditionModel | None]:
        """The untrained model, for evaluation against the base: the UNet with its adapters off, the frozen
        reference copy of full fine-tuning, or, when full fine-tuning keeps no copy (``sft``), the policy
        itself until the first optimizer step and ``None`` after it."""
        if self.uses_lora or self.ref_unet is not None:
            with self.reference() as unet:
                yield unet
        else:
            resumed = self._trainer is not None and self.trainer.ckpt_path is not None
            yield self.unet if self.global_step == 0 and not resumed else None

    @property
    def needs_reference(self) -> bool:
        """The objective reads reference errors, or the benign anchor reads the drift from the reference."""
        return self.objective.uses_reference or bool(self.benign_anchor)

    def _predict(self, unet: UNet2DConditionModel, z_t: Tensor, t: Tensor, cond: Mapping[str, Tensor] | Tensor) -> Tensor:
        """The family's prediction; ``cond`` is the family's conditioning dict, or text embeddings alone
        (``encoder_hidden_states``, all an SD UNet reads)."""
        run = self._run_unet if unet is self.unet else unet
        if isinstance(cond, Tensor):
            cond = {"encoder_hidden_states": cond}
        with attention_backend(self.attention_backend):
            return self.family.predict(run, z_t, t, cond)

    def _predict_with_reference(self, z_t: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Policy and (detached) reference predictions from one forward, the adapters on for the first half only."""
        n = z_t.shape[0]
        doubled = {k: torch.cat([v, v]) for k, v in cond.items()}
        with self._mixed.assign([self.adapter_name] * n + [BASE_ADAPTER] * n):
            both = self._predict(self.unet, torch.cat([z_t, z_t]), torch.cat([t, t]), doubled)
        return both[:n], both[n:].detach()

    @staticmethod
    def _to_device(host: Tensor, device: torch.device) -> Tensor:
        """A pageable host-to-GPU copy waits for the GPU to drain; a pinned one is queued behind its work."""
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)

    @staticmethod
    def _per_sample_mse(a: Tensor, b: Tensor, weights: Tensor | None = None) -> Tensor:
        error = (a - b).pow(2).mean(dim=tuple(range(1, a.ndim)))
        return error if weights is None else error * weights

    def pair_errors(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> PairErrors:
        """Policy (and, if the objective asks, reference) errors for the batch's winners and losers."""
        z_w: Tensor = batch["latents_w"]
        uses_losers = self.objective.uses_losers
        if uses_losers and batch.get("latents_l") is None:
            raise InputError(f"objective {type(self.objective).__name__} needs preference pairs, but the data has only single images")
        latents = torch.cat([z_w, batch["latents_l"]]) if uses_losers else z_w
        n_pairs, copies = z_w.shape[0], (2 if uses_losers else 1)

        draw = dict(scheduler=self.noise_scheduler, shape=z_w.shape, t_min=self.t_min, t_max=self.t_max,
                    noise_sampling=self.noise_sampling)
        if generator is not None:  # drawn on the host (reproducible anywhere), copied without a device sync
            t = self._to_device(self.family.draw_timesteps(**draw, generator=generator), z_w.device)
            eps = self._to_device(torch.randn(z_w.shape, generator=generator, dtype=z_w.dtype), z_w.device)
        else:
            t = self.family.draw_timesteps(**draw, device=z_w.device)
            eps = torch.randn_like(z_w)
        # the family's conditioning of every row (winners, then losers) and its noisy input and target
        cond = self.family.conditioning(batch, ("w", "l") if uses_losers else ("w",))
        t, eps = t.repeat(copies), eps.repeat(copies, *([1] * (eps.ndim - 1)))
        z_t, target = self.family.noisy_and_target(self.noise_scheduler, latents, eps, t)

        ref_pred = ref = drift = None
        if self.needs_reference and self._mixed is not None:
            policy_pred, ref_pred = self._predict_with_reference(z_t, t, cond)
        else:
            policy_pred = self._predict(self.unet, z_t, t, cond)
            if self.needs_reference:
                with torch.no_grad(), self.reference() as ref_unet:
                    ref_pred = self._predict(ref_unet, z_t, t, cond)
        weights = self.family.error_weights(t, self.noise_sampling)  # None: the plain mean squared error
        if ref_pred is not None:
            ref = self._per_sample_mse(ref_pred, target, weights) if self.objective.uses_reference else None
            drift = self._per_sample_mse(policy_pred, ref_pred, weights) if self.benign_anchor else None

        def split(e: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
            """Winners' and losers' halves of a per-sample tensor."""
            if e is None or not uses_losers:
                return e, None
            return e[:n_pairs], e[n_pairs:]

        (p_w, p_l), (r_w, r_l), (g_w, g_l) = split(self._per_sample_mse(policy_pred, target, weights)), split(ref), split(drift)
        return PairErrors(policy_w=p_w, policy_l=p_l, ref_w=r_w, ref_l=r_l, drift_w=g_w, drift_l=g_l)

    def compute(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> ObjectiveOutput:
        """The objective's loss on the batch's pairs except anchor pairs, plus ``benign_anchor`` times the
        drift on benign and anchor pairs when that weight is > 0."""
        errors, meta = self.pair_errors(batch, generator), batch.get("meta", {})
        if "anchor" in meta:  # collate adds the flags only to batches that carry anchor pairs
            if not self.benign_anchor:
                raise InputError("the batch has anchor pairs (data.anchor_others) but model.benign_anchor is 0: "
                                 "set a weight > 0 for them to hold the model")
            own = ~anchor_flags(meta, errors.policy_w.shape[0], errors.policy_w.device)
            out = self.objective(errors.select(own), select_meta(meta, own))
        else:
            out = self.objective(errors, meta)
        if self.benign_anchor:
            anchor = benign_drift(errors, meta)
            out.loss = out.loss + self.benign_anchor * anchor
            out.metrics["benign_drift"] = anchor.detach()
            out.metrics["objective_loss"] = out.metrics["loss"]
            out.metrics["loss"] = out.loss.detach()  # what is optimized (and shown in the progress bar)
        return out

    # ------------------------------------------------------------- lightning
    def setup(self, stage: str) -> None:
        check_frozen_dtype(self.frozen_dtype, {} if self.uses_lora else None, self.trainer.precision)

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """Timesteps and noise of a training batch from (seed, step, micro-batch, rank) alone: a run resumed
        from a checkpoint draws what the uninterrupted run drew, and DDP ranks draw differently."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        micro = self.global_step * accumulate + batch_idx % accumulate
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + micro) * 4_099 + self.global_rank) % 2**63)

    def check_finite(self, loss: Tensor) -> None:
        """Stop every rank (one all-reduce) when any rank's loss is not finite, naming the step and what survives."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            callback = self.trainer.checkpoint_callback if self._trainer is not None else None
            last = getattr(callback, "last_model_path", "") or "none saved yet"
            raise NonFiniteLoss(f"step {self.global_step}: the loss is not finite ({loss.detach().float().tolist()}); "
                                f"training stopped before updating the weights; last good checkpoint: {last}")

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        out = self.compute(batch, self.step_generator(batch_idx))
        self.check_finite(out.loss)
        n = batch["latents_w"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in out.metrics.items()}, prog_bar=False, batch_size=n, sync_dist=True)
        self.log("loss", out.metrics["loss"], prog_bar=True, logger=False, batch_size=n)
        return out.loss

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Under the attention backend too: gradient checkpointing recomputes attention during the backward."""
        with attention_backend(self.attention_backend):
            super().backward(loss, *args, **kwargs)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        # A fixed generator per batch makes validation losses comparable across epochs.
        generator = torch.Generator().manual_seed(10_000 + batch_idx)
        out = self.compute(batch, generator)
        self.log_dict({f"val/{k}": v for k, v in out.metrics.items()}, sync_dist=True,
                      batch_size=batch["latents_w"].shape[0])

    def effective_batch(self) -> int:
        """Pairs per optimizer step over every process: processes x data.batch_size x accumulation."""
        batch = int(getattr(self.trainer.datamodule, "batch_size", 1) or 1)
        return int(self.trainer.world_size) * batch * int(self.trainer.accumulate_grad_batches)

    def configure_optimizers(self):
        """``model.optimizer`` (any torch optimizer class by ``_target_``, AdamW by default) over the trainable
        parameters, and the diffusers LR schedule stepped every optimizer step."""
        cfg = dict(self.optimizer_cfg)
        if self.scale_lr and self._trainer is not None:
            cfg["lr"] = float(cfg.get("lr", 1e-3)) * self.effective_batch()
            log.info("model.scale_lr: learning rate %.3g x effective batch %d = %.3g",
                     self.optimizer_cfg.get("lr"), self.effective_batch(), cfg["lr"])
        optimizer = build_optimizer((p for _, p in self.trainable_parameters()), cfg)
        sched_cfg = dict(self.lr_scheduler_cfg)
        scheduler = get_scheduler(
            sched_cfg.get("name", "constant"), optimizer,
            num_warmup_steps=int(sched_cfg.get("warmup_steps", 0)),
            num_training_steps=int(self.trainer.estimated_stepping_batches) if self._trainer else None,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, _ in self.trainable_parameters()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["alignment"] = {"base_model": self.base_model,
                                   "unet_config": unet_config_digest(self.base_model, denoiser=self.family.denoiser_name)
                                   if self.base_model else None}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = sorted({n for n, _ in self.trainable_parameters()} - set(checkpoint["state_dict"]))
        if missing:
            raise InputError(
                f"checkpoint lacks {len(missing)} trainable tensor(s) of this model, e.g. {missing[0]!r}: "
                "was it saved with another LoRA config or model?"
            )

    def train(self, mode: bool = True) -> "AlignmentModule":
        super().train(mode)
        if self.ref_unet is not None:
            self.ref_unet.eval()
        return self
