"""Compute the validation metrics on 2 processes whose default group is ``<backend>``, each on its shard.

    python tests/scripts/metrics_sync.py <backend> <out.json>

``cuda:gloo`` binds the only backend to CUDA, as NCCL does on GPU machines: metric states on the CPU must
then be synced over a group of their own. Used by tests/metrics/test_evaluation.py.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from metrics.aggregates import IP, UAS, BenignFidelity, SafeRewriteFidelity  # noqa: E402
from metrics.evaluation import alignment_metrics, base_means, shard  # noqa: E402


def records() -> list[dict]:
    """Image records of harmful, benign and safe-rewrite jobs with fixed pseudo-random scores."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in range(23):
        role = ("harmful", "benign", "safe")[n % 3]
        out.append({"role": role, "categories": ("violence",) if n % 2 else ("hate",),
                    "p": float(torch.rand((), generator=g)), "q": float(torch.rand((), generator=g)),
                    "q_safe": float(torch.rand((), generator=g)) if role == "harmful" else None, "nudenet": None})
    return out


def metrics(rank: int, world: int) -> dict[str, float]:
    mine = shard(records(), rank, world)
    qbar = base_means(mine)
    return alignment_metrics([r for r in mine if r["role"] != "safe"], [IP(), BenignFidelity(), SafeRewriteFidelity(), UAS()],
                             qbar["qbar_benign"], qbar["qbar_safe"], ["hate", "violence"])


def worker(rank: int, backend: str, out: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(backend, rank=rank, world_size=2)
    result = metrics(rank, 2)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ["MASTER_PORT"] = os.environ.get("MASTER_PORT", "29517")
    one = metrics(0, 1)
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2] + ".two"), nprocs=2)
    Path(sys.argv[2]).write_text(json.dumps({"one": one, "two": json.loads(Path(sys.argv[2] + ".two").read_text())}))
