"""The order in which pairs are trained: a function of (seed, epoch, rank) alone, so a run can resume mid-epoch.

Lightning restores the step, optimizer and scheduler from a checkpoint, but an ordinary shuffled
DataLoader starts its epoch over. Here the permutation of epoch ``e`` is drawn from ``seed + e`` and
each DDP rank takes every ``world_size``-th index of it, so the position a resumed run must continue
from follows from the number of batches already trained; the sampler skips exactly those.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process (``(0, 1)`` outside torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableSampler(Sampler[int]):
    """This rank's share of each epoch's permutation; ``skip`` drops that many leading indices of epoch
    ``start_epoch`` (a resumed run). ``shuffle=False`` keeps dataset order (validation).

    With ``even`` every rank gets ``len(dataset) // world_size`` indices (the remainder is left out of
    that epoch, so ranks run the same number of steps); without it (validation) every index is used once.
    With ``with_epoch`` it yields ``(epoch, index)``, so the dataset can draw its augmentations from
    (seed, epoch, index) alone, in any worker process."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 start_epoch: int = 0, skip: int = 0, even: bool = True, with_epoch: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_epoch, self.skip = start_epoch, start_epoch, skip
        self.per_rank = size // world_size if even else len(range(rank, size, world_size))
        self.with_epoch = with_epoch

    def batches_per_epoch(self, batch_size: int, drop_last: bool) -> int:
        return max(1, self.per_rank // batch_size if drop_last else -(-self.per_rank // batch_size))

    def start_after(self, steps_done: int, batch_size: int, drop_last: bool, accumulate: int = 1) -> int:
        """Continue after ``steps_done`` optimizer steps (a resumed run); returns how many batches of the epoch
        it lands in are skipped. Lightning starts accumulating anew at each epoch and steps on the last,
        partial group of an epoch, so an epoch of ``B`` batches takes ``ceil(B / accumulate)`` steps."""
        per_epoch = self.batches_per_epoch(batch_size, drop_last)
        epoch, steps_in = divmod(steps_done, -(-per_epoch // accumulate))
        position = min(per_epoch, steps_in * accumulate)
        self.start_epoch, self.epoch, self.skip = epoch, epoch, position * batch_size
        return position

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        if self.shuffle:
            indices = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            indices = list(range(self.size))
        return indices[self.rank::self.world_size][: self.per_rank]

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        indices = self.order(self.epoch)
        if self.epoch == self.start_epoch:
            indices = indices[self.skip:]
        if self.with_epoch:
            return iter([(self.epoch, i) for i in indices])
        return iter(indices)

    def __len__(self) -> int:
        # the full epoch, also when resuming inside it: Lightning counts the epoch's batches from this
        return self.per_rank
