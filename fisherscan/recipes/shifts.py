"""The simulated or real unseen domain of F(x'), batch by batch: Eq. 6 at one or several blocks, a pixel-space
change of each image, or real images of another style (``--shift eq6|pixel``, ``--shift-data``).

Each family's ``prepare(x, indices, x_other, draw)`` returns what the shifted pass needs: its input, the hook to run
it under (Eq. 6's ``TokenShift``) with each image's draws, and each image's shift magnitude s (the weight of the
domain term is exp(-s), ``docs/method.md``). Every draw is keyed on (seed, image index[, site], draw), so the batch
size and the number of ranks do not matter; with ``--label-draws K`` each of the K label draws has a shift draw of
its own (draw 0 is a single-draw run's) -- except Eq. 6's batch spread (``--spread batch``, as DSU), which is the global
batch's under torchrun (one small all-reduce per site and batch; ``prepare_empty`` takes part on a rank without
images). ``--spread pool`` fixes the spread once from a pool of images instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.datasets import make_loader
from ..fisher.perturb import TokenShift, block_input, channel_statistics, draw_eps, statistic_spread, statistics_change
from ..fisher.pixel_shift import PixelShift, shift_pixels
from ..models.segmenter import Segmenter
from ..rng import keyed_generator
from . import distributed
from .config import ScoreConfig
from .distributed import Ranks


def key(draw: int, site: int) -> int:
    """The ``visit`` key of a shift draw: site k of draw d (draw 0 keys exactly as a single-draw run)."""
    return draw * 1000 + site


@dataclass
class Prepared:
    """The shifted pass of one batch: its input, the hook and draws to run it under, each image's magnitude s."""

    x: torch.Tensor
    hook: TokenShift | None
    draws: tuple[torch.Tensor, ...] | None
    magnitudes: torch.Tensor


def patch_tokens_at(segmenter: Segmenter, x: torch.Tensor, site: int) -> torch.Tensor:
    """The patch tokens (B, N, C) entering block ``site``, fp32 (prefix tokens dropped)."""
    return block_input(segmenter, x, site)[:, getattr(segmenter.backbone, "num_prefix_tokens", 0):].float()


class Eq6Shift:
    """Eq. 6 at the blocks ``config.perturb_at``, each applied with probability ``perturb_prob`` per image,
    its spread times ``perturb_strength``: the batch's (DSU; the global batch's under torchrun) or a pool's."""

    def __init__(self, segmenter: Segmenter, config: ScoreConfig, ranks: Ranks, device: torch.device,
                 pool: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.segmenter, self.config, self.ranks, self.device = segmenter, config, ranks, device
        self.hook = TokenShift(segmenter, config.perturb_at)
        self.pool = pool
        self.channels = segmenter.backbone.embed_dim

    def draws(self, indices: list[int], device: torch.device, draw: int = 0) -> tuple[torch.Tensor, ...]:
        """Each image's eps per site, keyed on (seed, image, site, draw); with one always-applied site exactly the
        draws of a single-site run (eps_mu, eps_sigma (B, C))."""
        config, sites = self.config, len(self.config.perturb_at)
        eps = [[draw_eps(1, self.channels, keyed_generator(config.seed, i, "shift", key(draw, k)))
                for k in range(sites)] for i in indices]
        if sites == 1 and config.perturb_prob >= 1:
            return (torch.cat([e[0][0] for e in eps]).to(device), torch.cat([e[0][1] for e in eps]).to(device))
        eps_mu = torch.stack([torch.cat([e[0] for e in per_image]) for per_image in eps]).to(device)
        eps_sigma = torch.stack([torch.cat([e[1] for e in per_image]) for per_image in eps]).to(device)
        apply = torch.tensor([[float(torch.rand(1, generator=keyed_generator(config.seed, i, "site", key(draw, k)))
                                     < config.perturb_prob) for k in range(sites)] for i in indices], device=device)
        return eps_mu, eps_sigma, apply

    def spread_of(self, k: int, tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool is not None:
            spread = self.pool[k]
        elif self.ranks.world > 1:
            spread = distributed.global_spread(tokens, self.channels, self.device)
        else:
            spread = statistic_spread(*channel_statistics(tokens))
        strength = self.config.perturb_strength
        return spread if strength == 1 else (spread[0] * strength, spread[1] * strength)

    def prepare(self, x: torch.Tensor, indices: list[int], x_other=None, draw: int = 0) -> Prepared:
        self.hook.eps = self.draws(indices, x.device, draw)
        magnitudes = self.hook.prepare(self.segmenter, x, self.spread_of)
        return Prepared(x, self.hook, self.hook.eps, magnitudes)

    def prepare_empty(self) -> None:
        """A rank without images in this batch still takes part in the global spread of every site."""
        if self.pool is None and self.ranks.world > 1:
            for k in range(len(self.config.perturb_at)):
                self.spread_of(k, None)


class PixelShiftFamily:
    """``--shift pixel``: each image changed in pixel space (``fisherscan.fisher.pixel_shift``)."""

    def __init__(self, segmenter: Segmenter, config: ScoreConfig, mean, std):
        self.segmenter, self.config, self.mean, self.std = segmenter, config, mean, std
        self.family = PixelShift(strength=config.perturb_strength)
        self.hook = None

    def prepare(self, x: torch.Tensor, indices: list[int], x_other=None, draw: int = 0) -> Prepared:
        draws = torch.stack([self.family.draw(keyed_generator(self.config.seed, i, "pixel", draw)) for i in indices])
        shifted = shift_pixels(x, draws, self.mean, self.std)
        return Prepared(shifted, None, None, magnitude_between(self.segmenter, x, shifted, self.config))

    def prepare_empty(self) -> None:
        return None


class DataShift:
    """``--shift-data``: the loader brings each image's partner of the other style (``fisherscan.data.shift_data``)."""

    def __init__(self, segmenter: Segmenter, config: ScoreConfig):
        self.segmenter, self.config, self.hook = segmenter, config, None

    def prepare(self, x: torch.Tensor, indices: list[int], x_other=None, draw: int = 0) -> Prepared:
        return Prepared(x_other, None, None, magnitude_between(self.segmenter, x, x_other, self.config))

    def prepare_empty(self) -> None:
        return None


def magnitude_between(segmenter: Segmenter, x: torch.Tensor, shifted: torch.Tensor,
                      config: ScoreConfig) -> torch.Tensor:
    """Each image's s for a shift that is not Eq. 6: the change of its patch-token statistics at the first site."""
    site = config.perturb_at[0]
    return statistics_change(patch_tokens_at(segmenter, x, site), patch_tokens_at(segmenter, shifted, site))


@torch.no_grad()
def pool_spreads(segmenter: Segmenter, dataset, config: ScoreConfig, device: torch.device
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``--spread pool``: per site, the spread of the per-image statistics of the clean tokens entering it over
    the first ``spread_pool`` images (one pass without gradients; the same on every rank)."""
    count = min(config.spread_pool, len(dataset))
    pool = torch.utils.data.Subset(dataset, range(count))
    stats: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in config.perturb_at]
    for batch in make_loader(pool, config.batch_size, config.workers):
        x = batch[0].to(device)
        for k, site in enumerate(config.perturb_at):
            stats[k].append(channel_statistics(patch_tokens_at(segmenter, x, site)))
    return [statistic_spread(torch.cat([m for m, _ in per_site]), torch.cat([s for _, s in per_site]))
            for per_site in stats]


def make_shift(segmenter: Segmenter, config: ScoreConfig, dataset, ranks: Ranks, device: torch.device, mean, std):
    """The shift family of the run's options."""
    if config.shift_data is not None:
        return DataShift(segmenter, config)
    if config.shift == "pixel":
        return PixelShiftFamily(segmenter, config, mean, std)
    pool = pool_spreads(segmenter, dataset, config, device) if config.spread == "pool" else None
    return Eq6Shift(segmenter, config, ranks, device, pool)
