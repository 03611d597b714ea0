"""Scale-out with torch.distributed, started by torchrun (``torchrun --nproc-per-node N -m fisherscan tune ...``).

Outside torchrun (no WORLD_SIZE, or 1) everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); each rank gets its local GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def mean_over_ranks(value: float, ranks: Ranks, device: torch.device) -> float:
    if ranks.world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / ranks.world


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def teardown(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
