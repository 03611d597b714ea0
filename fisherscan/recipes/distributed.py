"""Scale-out with torch.distributed, started by torchrun (``torchrun --nproc-per-node N -m fisherscan score ...``).

Outside torchrun (no WORLD_SIZE, or 1) everything here is a no-op for a single process.

``score`` keeps ``--batch-size`` the global batch -- the images that share one Eq. 6 batch spread -- so the scores
do not depend on the number of ranks: each global batch of images [g B, (g + 1) B) is cut into ``world``
contiguous parts without padding (``rank_parts``; a rank may get an empty part at the end). Eq. 6's spread needs
every image of the batch: each rank adds its images' per-channel token statistics into a small float64 sum that
one all-reduce per batch completes (``global_spread``). Every decision that can stop a run is taken by all ranks
together (``agree``), so a bad batch seen by one rank stops every rank with the same message and none hangs. At
the end the accumulators are summed over ranks (``sum_over_ranks``, bucketed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

from ..errors import FisherscanError
from ..fisher.perturb import EPS, channel_statistics

T = TypeVar("T")


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


BUCKET = 1 << 25  # elements per all-reduce of the final sums


def shard_bounds(count: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous part [lo, hi) of ``count`` items cut into ``world`` near-equal parts."""
    return count * rank // world, count * (rank + 1) // world


def rank_parts(total: int, batch_size: int, ranks: Ranks) -> list[list[int]]:
    """For every global batch, the image indices of this rank (possibly empty)."""
    parts = []
    for start in range(0, total, batch_size):
        count = min(batch_size, total - start)
        lo, hi = shard_bounds(count, ranks.rank, ranks.world)
        parts.append(list(range(start + lo, start + hi)))
    return parts


def global_spread(tokens: torch.Tensor | None, channels: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6's (Sigma_mu, Sigma_sigma) over the images of the whole global batch, from this rank's patch tokens
    (B_r, N, C) or None: count, sum and sum of squares of each image's (mu, sigma) in float64, one all-reduce;
    unbiased variance, eps inside the root, zero spread for fewer than 2 images (as ``statistic_spread``)."""
    stats = torch.zeros(5, channels, dtype=torch.float64, device=device)
    if tokens is not None and tokens.shape[0]:
        mu, sigma = (s.double() for s in channel_statistics(tokens.float()))
        stats[0] = mu.shape[0]
        stats[1], stats[2] = mu.sum(0), mu.square().sum(0)
        stats[3], stats[4] = sigma.sum(0), sigma.square().sum(0)
    dist.all_reduce(stats)
    count = float(stats[0, 0])
    if count < 2:
        zeros = torch.zeros(channels, device=device)
        return zeros, zeros.clone()

    def spread(total, squares):
        variance = ((squares - total.square() / count) / (count - 1)).clamp_min(0)
        return (variance + EPS).sqrt().float()

    return spread(stats[1], stats[2]), spread(stats[3], stats[4])


def sum_over_ranks(tensors: list[torch.Tensor], device: torch.device) -> None:
    """In place: every tensor summed over the ranks (fp32 buckets of up to ``BUCKET`` elements on ``device``)."""
    bucket: list[torch.Tensor] = []

    def flush():
        if not bucket:
            return
        flat = torch.cat([t.reshape(-1).to(device, torch.float32) for t in bucket])
        dist.all_reduce(flat)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        bucket.clear()

    size = 0
    for t in tensors:
        if size + t.numel() > BUCKET:
            flush()
            size = 0
        bucket.append(t)
        size += t.numel()
    flush()


def broadcast_module(module: torch.nn.Module, ranks: Ranks) -> None:
    """Rank 0's parameters and buffers on every rank (the warmed head, a random initialisation)."""
    if ranks.world == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def agree(ranks: Ranks, device: torch.device, bad: bool, error: str | None) -> tuple[int, str | None]:
    """(how many ranks saw a bad batch part, the first rank's error message or None): the same on every rank,
    so every rank takes the same decision. One small all-reduce (plus a gather of the messages when one failed)."""
    if ranks.world == 1:
        return int(bad), error
    flags = torch.tensor([int(bad), int(error is not None)], dtype=torch.int64, device=device)
    dist.all_reduce(flags)
    message = None
    if int(flags[1]):
        messages: list = [None] * ranks.world
        dist.all_gather_object(messages, error)
        message = next(m for m in messages if m is not None)
    return int(flags[0]), message


def collectively(ranks: Ranks, device: torch.device, work: Callable[[], T]) -> T | None:
    """``work()`` on this rank (work only some ranks do: rank 0's warm-up, its writes), then one agreement: a
    user error on any rank is raised on every rank, with that rank's message, before the next collective could
    leave the others waiting. Returns what ``work`` returned."""
    result, error = None, None
    try:
        result = work()
    except FisherscanError as failure:
        error = str(failure)
    _, error = agree(ranks, device, False, error)
    if error is not None:
        raise FisherscanError(error)
    return result


def agreed(items: Iterable[T], ranks: Ranks, device: torch.device) -> Iterator[T]:
    """``items`` (each rank its own batches, as many on every rank), with every rank agreeing after each one that
    none failed to read it (under torchrun; one process just iterates)."""
    iterator = iter(items)
    while True:
        item, error, done = None, None, False
        try:
            item = next(iterator)
        except StopIteration:
            done = True
        except FisherscanError as failure:
            error = str(failure)
        if ranks.world > 1:
            _, error = agree(ranks, device, False, error)
        if error is not None:
            raise FisherscanError(error)
        if done:
            return
        yield item
