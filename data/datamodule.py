"""The preference LightningDataModule: read pairs, cache their latents once, serve cached batches."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from common.dtypes import torch_dtype
from common.errors import InputError
from data.categories import normalize_category
from data.latent_cache import CACHE_FILE, CacheReader, LatentEncoder, build_cache, cache_key
from data.pairs import ImageLimits, PreferencePair
from data.readers.base import PairReader
from data.resumable_sampler import ResumableSampler, distributed_rank

log = logging.getLogger(__name__)
CONDITIONS = ("unsafe", "safe", "both")


class CachedPairDataset(Dataset):
    """Items are dicts of cached tensors plus per-pair metadata; flip and prompt dropout happen here."""

    def __init__(self, cache: CacheReader, pairs: Sequence[PreferencePair], indices: Sequence[int],
                 random_flip: bool = False, p_uncond: float = 0.0, anchor_indices: Sequence[int] = (),
                 seed: int = 0) -> None:
        self.cache, self.pairs, self.indices = cache, pairs, list(indices)
        self.random_flip, self.p_uncond = random_flip, p_uncond
        self.anchor_indices = list(anchor_indices)
        self.has_losers = "latents_l" in cache.keys
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``i``, or ``(epoch, i)`` as the training sampler gives it: the flip, prompt dropout and anchor
        pair are drawn from (seed, epoch, i) alone, so a resumed run and any worker draw what the first did."""
        epoch, i = key if isinstance(key, tuple) else (0, key)
        draws = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_033 + i) % 2**63)
        item = self.item(self.indices[i], draws)
        if self.anchor_indices:
            drawn = self.anchor_indices[int(torch.randint(len(self.anchor_indices), (), generator=draws))]
            item["anchor_item"] = self.item(drawn, draws)
        return item

    def item(self, index: int, draws: torch.Generator | None = None) -> dict[str, Any]:
        """The cached tensors and metadata of pair ``index``, augmented with draws from ``draws``."""
        draws = draws if draws is not None else torch.Generator().manual_seed(index)
        suffix = "_flip" if self.random_flip and torch.rand((), generator=draws) < 0.5 else ""
        item: dict[str, Any] = {}
        for side in ("w", "l") if self.has_losers else ("w",):
            for key in ["latents", *self.cache.image_keys]:  # SDXL: the image's time ids beside its latents
                item[f"{key}_{side}"] = self.cache.row(f"{key}_{side}{suffix}", index).float()
        # prompt dropout replaces every tensor of the prompt (SDXL's pooled embedding too) with the empty prompt's
        if self.p_uncond > 0 and torch.rand((), generator=draws) < self.p_uncond:
            item.update({k: v.float() for k, v in self.cache.uncond_tensors.items()})
        else:
            row = int(self.cache.prompt_index[index])
            item.update({k: self.cache.row(k, row).float() for k in self.cache.prompt_keys})
        pair = self.pairs[index]
        item["meta"] = {"index": index, "categories": pair.categories, "extras": pair.extras}
        return item


def condition_pairs(pairs: list[PreferencePair], condition_on: str) -> list[PreferencePair]:
    """The prompts a pair is trained under (docs/methods/safetydpo.md): its own (``unsafe``), its safe rewrite (``safe``),
    or both (each pair twice). The safe rewrite is required for ``safe`` and ``both``."""
    if condition_on == "unsafe":
        return pairs
    missing = next((p for p in pairs if not p.safe_prompt), None)
    if missing is not None:
        raise InputError(f"data.condition_on={condition_on}: {missing.source or 'a pair'} has no safe_prompt "
                         f"(prompt {missing.prompt!r}); use condition_on=unsafe for data without safe rewrites")
    rewritten = [replace(p, prompt=p.safe_prompt) for p in pairs]
    return rewritten if condition_on == "safe" else pairs + rewritten


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep categories as a list; turn each extra into a float tensor (NaN where absent).
    Items that carry an ``anchor_item`` (``data.anchor_others``) are followed by those anchor pairs, which
    ``meta["anchor"]`` marks."""
    anchors = [it.pop("anchor_item") for it in items if "anchor_item" in it]
    flags = [False] * len(items) + [True] * len(anchors)
    items = items + anchors
    batch: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "meta"}
    extras = sorted({k for it in items for k in it["meta"]["extras"]})
    batch["meta"] = {
        "index": torch.tensor([it["meta"]["index"] for it in items]),
        "categories": [it["meta"]["categories"] for it in items],
        **({"anchor": torch.tensor(flags)} if anchors else {}),
        **{k: torch.tensor([it["meta"]["extras"].get(k, float("nan")) for it in items]) for k in extras},
    }
    return batch


class PreferenceDataModule(L.LightningDataModule):
    """Pairs from any :class:`PairReader`, filtered by category, split train/val, served from the cache."""

    def __init__(
        self,
        reader: PairReader | Callable[[str], PairReader],
        path: str | None = None,
        encoder: LatentEncoder | None = None,
        resolution: int | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        categories: Sequence[str] | None = None,
        keep_uncategorized: bool = False,
        anchor_others: bool = False,
        val_fraction: float = 0.0,
        center_crop: bool = True,
        random_flip: bool = False,
        p_uncond: float = 0.0,
        cache_dir: str | Path = ".cache/latents",
        cache_dtype: str = "float16",
        encode_batch_size: int = 8,
        encode_device: str = "auto",
        seed: int = 0,
        cost_model: str | Path | None = None,
        cost_scorer: Callable[..., None] | None = None,
        condition_on: str = "unsafe",
        on_bad_sample: str = "error",
        local_files_only: bool = False,
        allow_outside_paths: bool = False,
        max_image_pixels: int | None = 89_478_485,
        max_aspect_ratio: float | None = 8.0,
        min_image_side: int | None = 8,
    ) -> None:
        super().__init__()
        torch_dtype(cache_dtype, "data.cache_dtype")
        if not 0.0 <= val_fraction < 1.0:
            raise InputError(f"data.val_fraction: expected a number in [0, 1), got {val_fraction}")
        # Configs give the reader as a factory (``_partial_: true``) and the source as ``data.path``.
        self.reader = reader if isinstance(reader, PairReader) else reader(path)
        self.encoder, self.resolution = encoder, resolution
        self.batch_size, self.num_workers = batch_size, num_workers
        self.categories = None if categories is None else [str(c) for c in categories]
        self.keep_uncategorized = bool(keep_uncategorized)
        self.anchor_others = bool(anchor_others)
        self.val_fraction, self.center_crop, self.random_flip, self.p_uncond = val_fraction, center_crop, random_flip, p_uncond
        self.cache_dir, self.cache_dtype = Path(cache_dir), cache_dtype
        self.encode_batch_size, self.encode_device, self.seed = encode_batch_size, encode_device, seed
        self.cost_model, self.local_files_only = cost_model, bool(local_files_only)
        self.cost_scorer = cost_scorer
        if condition_on not in CONDITIONS:
            raise InputError(f"data.condition_on: expected one of {', '.join(CONDITIONS)}, got {condition_on!r}")
        self.condition_on = condition_on
        if on_bad_sample not in ("error", "skip"):
            raise InputError(f"data.on_bad_sample: expected error or skip, got {on_bad_sample!r}")
        self.on_bad_sample = on_bad_sample
        # allow_outside_paths reaches the readers through their configs (${data.allow_outside_paths})
        self.allow_outside_paths = bool(allow_outside_paths)
        self.image_limits = ImageLimits(max_image_pixels, max_aspect_ratio, min_image_side)
        self._pairs: list[PreferencePair] | None = None
        self._origins: list[int] = []
        self._costs_attached = False
        self.train_set: CachedPairDataset | None = None
        self.val_set: CachedPairDataset | None = None

    # ------------------------------------------------------------------ pairs
    @property
    def pairs(self) -> list[PreferencePair]:
        if self._pairs is None:
            self._pairs = self.reader.read()
            if not self._pairs:
                raise InputError(f"{self.reader}: the data holds no usable pairs")
            screened = self._screen(self._pairs)
            self._pairs = condition_pairs(screened, self.condition_on)
            # the source pair of each conditioned pair (condition_on=both trains every pair twice)
            self._origins = [i % len(screened) for i in range(len(self._pairs))]
        return self._pairs

    def attach_costs(self) -> None:
        """With ``cost_model``: ``cost_w``/``cost_l`` on every pair, scored once and cached beside the latents.
        Run by ``prepare_data`` (one process per node) before ``setup`` reads the cache on every rank. The
        scoring is ``cost_scorer(pairs, cost_model, cache_dir, local_files_only=...)``, given by the config
        (``models.pair_costs.attach_costs``): this package never loads a model itself."""
        if self.cost_model and not self._costs_attached:
            if self.cost_scorer is None:
                raise InputError("data.cost_scorer: data.cost_model is set but nothing scores the images; expected "
                                 "{_target_: models.pair_costs.attach_costs, _partial_: true}")
            self.cost_scorer(self.pairs, self.cost_model, self.cache_dir, local_files_only=self.local_files_only)
            self._costs_attached = True

    def _screen(self, pairs: list[PreferencePair]) -> list[PreferencePair]:
        """Pairs without a caption are an error, or with ``on_bad_sample=skip`` dropped and counted."""
        bad = [p for p in pairs if not p.prompt or not p.prompt.strip()]
        if bad and self.on_bad_sample == "error":
            raise InputError(f"{bad[0].source or 'a pair'}: empty caption (prompt); fix it or set data.on_bad_sample=skip")
        if bad:
            log.warning("data.on_bad_sample=skip: dropped %d pair(s) with an empty caption (first: %s)",
                        len(bad), bad[0].source)
        return [p for p in pairs if p.prompt and p.prompt.strip()] if bad else pairs

    def selected_indices(self) -> list[int]:
        """Indices of pairs in ``categories`` (all pairs when no filter is set), plus the pairs that carry no
        category when ``keep_uncategorized`` (clean pairs a ``model.benign_anchor`` can hold an expert on)."""
        if self.categories is None:
            return list(range(len(self.pairs)))
        wanted = {normalize_category(c) for c in self.categories}
        present = {c for p in self.pairs for c in p.categories}
        unknown = sorted(wanted - present)
        if unknown:
            raise InputError(f"data.categories: unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                             f"the data has {sorted(present) or 'no categories'}")
        return [i for i, p in enumerate(self.pairs)
                if wanted & set(p.categories) or (self.keep_uncategorized and not p.categories)]

    def anchor_indices(self, selected: Sequence[int]) -> list[int]:
        """With ``anchor_others``: every pair the category filter left out. Each training pair is served
        with one of them, drawn at random, which the objective does not see and ``model.benign_anchor``
        holds at the reference (so an expert leaves the other categories' prompts, and benign ones, alone)."""
        if not self.anchor_others:
            return []
        chosen = set(selected)
        return [i for i in range(len(self.pairs)) if i not in chosen]

    # ------------------------------------------------------------------ cache
    def cache_path(self) -> Path:
        if self.encoder is None or self.resolution is None:
            raise RuntimeError("PreferenceDataModule needs an encoder and a resolution before caching")
        key = cache_key(self.encoder.fingerprint(), self.pairs, self.resolution, self.center_crop,
                        self.random_flip, self.cache_dtype, self.image_limits)
        return self.cache_dir / key / CACHE_FILE

    def prepare_data(self) -> None:
        """Score the costs and build the cache if missing (Lightning runs this on one process per node)."""
        self.attach_costs()
        path = self.cache_path()
        if path.is_file():
            log.info("latent cache hit: %s", path.parent)
            return
        device = self.encode_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        original = self.encoder.device
        self.encoder.to(device)
        try:
            build_cache(path.parent, self.pairs, self.encoder, self.resolution, self.center_crop,
                        self.random_flip, torch_dtype(self.cache_dtype, "data.cache_dtype"), self.encode_batch_size,
                        skip_bad=self.on_bad_sample == "skip", limits=self.image_limits)
        finally:
            self.encoder.to(original)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.attach_costs()
        path = self.cache_path()
        if not path.is_file():
            self.prepare_data()
        cache = CacheReader(path)
        indices = self.selected_indices()
        bad = int((~cache.valid).sum())
        if bad:
            first = cache.errors[0] if cache.errors else "unreadable image"
            if self.on_bad_sample == "error":
                raise InputError(f"{first} (the cache at {path.parent} was built with on_bad_sample=skip)")
            log.warning("data.on_bad_sample=skip: skipped %d of %d pairs with unreadable images (first: %s)",
                        bad, len(cache.valid), first)
            indices = [i for i in indices if cache.valid[i]]
        # split by source pair: the two prompts of one pair (condition_on=both) share its images
        groups: dict[int, list[int]] = {}
        for i in indices:
            groups.setdefault(self._origins[i], []).append(i)
        units = list(groups.values())
        order = torch.randperm(len(units), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = int(round(self.val_fraction * len(units)))
        val = sorted(i for u in order[:n_val] for i in units[u])
        train = sorted(i for u in order[n_val:] for i in units[u])
        if not train:
            raise InputError(f"{self.reader}: no training pairs left after the category filter and validation split")
        anchors = [i for i in self.anchor_indices(indices) if cache.valid[i]]
        if self.anchor_others and not anchors:
            log.warning("data.anchor_others: data.categories leaves no pair out, so there are no anchor pairs")
        self.train_set = CachedPairDataset(cache, self.pairs, train, self.random_flip, self.p_uncond, anchors,
                                           seed=self.seed)
        self.val_set = CachedPairDataset(cache, self.pairs, val) if val else None
        log.info("data: %d train pairs, %d val pairs, %d anchor pairs (%s)", len(train), len(val), len(anchors),
                 self.reader.stats)

    # ------------------------------------------------------------ dataloaders
    def steps_trained(self) -> tuple[int, int]:
        """Optimizer steps already taken (a resumed run: the checkpoint's) and the gradient accumulation."""
        trainer = getattr(self, "trainer", None)
        return (0, 1) if trainer is None else (int(trainer.global_step), int(trainer.accumulate_grad_batches))

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (seed, epoch), sharded over DDP ranks here (``use_distributed_sampler: false``),
        continuing mid-epoch where a resumed run stopped."""
        rank, world = distributed_rank()
        sampler = ResumableSampler(len(self.train_set), seed=self.seed, rank=rank, world_size=world, with_epoch=True)
        drop_last = sampler.per_rank >= self.batch_size
        steps, accumulate = self.steps_trained()
        position = sampler.start_after(steps, self.batch_size, drop_last, accumulate)
        if position:
            log.info("resuming inside epoch %d: skipping its first %d batches", sampler.start_epoch, position)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate, drop_last=drop_last, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        rank, world = distributed_rank()
        sampler = ResumableSampler(len(self.val_set), shuffle=False, rank=rank, world_size=world, even=False)
        return DataLoader(self.val_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate)
