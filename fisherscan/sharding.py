"""The exact diagonal estimator across torchrun ranks: ``torchrun --nproc-per-node N -m fisherscan score ...``.

``--batch-size`` stays the global batch -- the images that share one Eq. 6 batch spread -- so the scores do not
depend on the number of ranks. Each global batch of images [g B, (g + 1) B) is cut into ``world`` contiguous
parts without padding (a rank may get an empty part at the end); a rank scores its part into local fp32
accumulators. Label uniforms and Eq. 6's eps are keyed on (seed, image index), as in one process. Eq. 6's batch
spread needs every image of the batch: each rank adds its images' per-channel token statistics into a small
float64 sum that one all-reduce per batch completes. At the end the accumulators are summed over ranks (bucketed
all-reduce), and every rank holds the same F(x), F(x').
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import Ranks
from .perturb import EPS, channel_statistics

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


def reduce_state(state, device: torch.device) -> None:
    """Sum a ``scoring.ScoringState`` over the ranks: the squared-gradient sums, image counts, shift sum, bad
    batches (one bucketed all-reduce at the end)."""
    sum_over_ranks([*state.clean.sums.values(), *state.shifted.sums.values()], device)
    scalars = torch.tensor([state.clean.images, state.shifted.images, state.shift_magnitude_sum, state.bad_batches],
                           dtype=torch.float64, device=device)
    dist.all_reduce(scalars)
    state.clean.images, state.shifted.images = int(scalars[0]), int(scalars[1])
    state.shift_magnitude_sum, state.bad_batches = float(scalars[2]), int(scalars[3])


def broadcast_module(module: torch.nn.Module, ranks: Ranks) -> None:
    """Rank 0's parameters and buffers on every rank (the warmed head, a random initialisation)."""
    if ranks.world == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def run_diagonal_sharded(segmenter, dataset, config, device: torch.device, autocast_dtype, progress,
                         ranks: Ranks) -> tuple[dict, dict, float, dict]:
    """``scoring.run_diagonal`` across ranks (no partial files): (F(x), F(x'), mean shift s, extra metadata),
    the same on every rank."""
    from .errors import FisherscanError
    from .perturb import TokenShift, block_input
    from .scoring import new_state, score_batch

    state = new_state(segmenter)
    total = len(dataset)
    parts = rank_parts(total, config.batch_size, ranks)
    mine = [part for part in parts if part]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=mine, num_workers=max(int(config.workers), 0))
    batches = iter(loader)
    shift = TokenShift(segmenter, config.perturb_at)
    prefix, channels = segmenter.backbone.num_prefix_tokens, segmenter.backbone.embed_dim
    allowed_bad = config.max_bad_frac * len(parts)
    task = progress.add_task(f"score F(x), F(x') ({ranks.world} ranks)", total=total, rate="")
    for g, part in enumerate(parts):
        tokens = x = y = None
        if part:
            x, y, indices = next(batches)
            x, y, indices = x.to(device), y.to(device), [int(i) for i in indices]
            tokens = block_input(segmenter, x, config.perturb_at)[:, prefix:]
        spread = global_spread(tokens, channels, device)  # every rank, every global batch: one small all-reduce
        if part and not score_batch(segmenter, state, shift, x, y, indices, config, autocast_dtype, spread=spread):
            state.bad_batches += 1
            if state.bad_batches > allowed_bad:
                raise FisherscanError(f"rank {ranks.rank}: {state.bad_batches} of {len(parts)} batches had non-finite "
                                      f"losses or gradients (more than --max-bad-frac {config.max_bad_frac}); check "
                                      "the weights, the data and --warmup-lr")
        state.next_image += len(part)
        progress.update(task, advance=min(config.batch_size, total - g * config.batch_size), rate="")  # all ranks
    reduce_state(state, device)
    if state.clean.images == 0:
        raise FisherscanError(f"every batch ({state.bad_batches} parts) had non-finite losses or gradients; check "
                              "the weights, the data and --warmup-lr")
    magnitude = state.shift_magnitude_sum / max(state.shifted.images, 1)
    extra = {"images": state.clean.images, "bad_batches": state.bad_batches, "batches_total": len(parts),
             "batches_done": len(parts), "stopped": False, "world_size": ranks.world}
    return state.clean.fisher(), state.shifted.fisher(), magnitude, extra
