"""A simulated unseen domain: Eq. 6 applied to the patch-token statistics entering ViT blocks (after DSU).

For tokens x of one image (N tokens, C channels) with per-channel mean mu and std sigma over the tokens,
and the spread of those statistics over the batch, Sigma_mu^2 = Var_batch[mu], Sigma_sigma^2 = Var_batch[sigma]:

    alpha = mu + eps_mu * Sigma_mu,  beta = sigma + eps_sigma * Sigma_sigma,  eps ~ N(0, 1) per image and channel
    x' = beta * (x - mu) / sigma + alpha                                                        (Eq. 6)

As in DSU's reference code, variances are unbiased and eps = 1e-6 sits inside each square root. At batch
size 1 the batch variance is undefined; the spread is taken as 0 there (x' = x) instead of NaN.

The batch spread (Sigma_mu, Sigma_sigma) defines the simulated domain and is held constant (detached): each
image's perturbed loss then depends on that image alone, so per-image gradients (Eq. 9) are well defined.
Prefix tokens (cls, registers) pass unchanged. A block fed a token map (B, h, w, C), as SAM's are, is shifted
the same way over its h * w tokens.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torch import nn

EPS = 1e-6


def channel_statistics(tokens: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over the token axis: (..., N, C) -> mu, sigma of shape (..., C)."""
    mu = tokens.mean(dim=-2)
    sigma = (tokens.var(dim=-2, unbiased=True) + eps).sqrt()
    return mu, sigma


def statistic_spread(mu: torch.Tensor, sigma: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigma_mu, Sigma_sigma of Eq. 6: std over the batch of the instance statistics, (B, C) -> (C,), detached."""

    def spread(values: torch.Tensor) -> torch.Tensor:
        values = values.detach().float()
        if values.shape[0] < 2:  # the batch variance is undefined: no spread, no shift
            return torch.zeros_like(values[0])
        return (values.var(dim=0, unbiased=True) + eps).sqrt()

    return spread(mu), spread(sigma)


def shift_statistics(tokens: torch.Tensor, eps_mu: torch.Tensor, eps_sigma: torch.Tensor,
                     spread_mu: torch.Tensor, spread_sigma: torch.Tensor,
                     eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6 for tokens (B, N, C) with given draws eps_mu, eps_sigma (B, C) and batch spreads (C,).

    Returns the perturbed tokens and the relative size of the applied shift per image and channel,
    (|alpha - mu| + |beta - sigma|) / sigma, whose mean sets the shift weight (``docs/method.md``).
    """
    mu, sigma = channel_statistics(tokens, eps)
    alpha = mu + eps_mu * spread_mu
    beta = sigma + eps_sigma * spread_sigma
    perturbed = beta.unsqueeze(-2) * (tokens - mu.unsqueeze(-2)) / sigma.unsqueeze(-2) + alpha.unsqueeze(-2)
    magnitude = ((alpha - mu).abs() + (beta - sigma).abs()) / sigma
    return perturbed, magnitude.detach()


def draw_eps(batch: int, channels: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """eps_mu, eps_sigma ~ N(0, 1), shape (batch, channels) each, on the CPU."""
    eps = torch.randn(2, batch, channels, generator=generator)
    return eps[0], eps[1]


def perturb_statistics(tokens: torch.Tensor, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 6 on a batch of tokens (B, N, C): returns (perturbed, eps_mu, eps_sigma), draws from ``generator``."""
    mu, sigma = channel_statistics(tokens)
    spread_mu, spread_sigma = statistic_spread(mu, sigma)
    eps_mu, eps_sigma = draw_eps(tokens.shape[0], tokens.shape[-1], generator)
    eps_mu, eps_sigma = eps_mu.to(tokens.device), eps_sigma.to(tokens.device)
    perturbed, _ = shift_statistics(tokens, eps_mu, eps_sigma, spread_mu.to(tokens.dtype),
                                    spread_sigma.to(tokens.dtype))
    return perturbed, eps_mu, eps_sigma


class _Captured(Exception):
    def __init__(self, tokens: torch.Tensor):
        super().__init__()
        self.tokens = tokens


@torch.no_grad()
def block_input(segmenter: nn.Module, x: torch.Tensor, site: int) -> torch.Tensor:
    """The tokens (B, prefix + N, C) entering backbone block ``site`` (a token map (B, h, w, C) flattened), ahead
    of any other pre-hook (such as an active ``TokenShift``); the forward stops there."""

    def capture(module, args):
        raise _Captured(args[0])

    handle = segmenter.backbone.blocks[site].register_forward_pre_hook(capture, prepend=True)
    try:
        segmenter(x)
    except _Captured as captured:
        tokens = captured.tokens
        return tokens.flatten(1, 2) if tokens.dim() == 4 else tokens
    finally:
        handle.remove()
    raise RuntimeError(f"block {site} was never reached")  # pragma: no cover - every ViT runs all blocks


class TokenShift:
    """Eq. 6 at the input of one or several backbone blocks (``sites``) of a segmenter, while used as a context
    manager; leaving the context removes the hooks.

    Before each forward, set ``spreads`` (per site: Sigma_mu, Sigma_sigma, constants; ``spread`` for a single site)
    and ``eps``: either (eps_mu, eps_sigma) of shape (B, C) for a single site applied to every image, or
    (eps_mu, eps_sigma, apply) of shapes (B, S, C), (B, S, C), (B, S): site k of image i is shifted where
    ``apply[i, k]`` (a per-site probability, as DSU draws one), else passes unchanged. With several sites each one
    shifts the tokens it receives, which carry the shifts of the sites before it.
    """

    def __init__(self, segmenter: nn.Module, site: int | Sequence[int]):
        depth = len(segmenter.backbone.blocks)
        self.sites = [site] if isinstance(site, int) else list(site)
        for k in self.sites:
            if not 0 <= k < depth:
                raise ValueError(f"perturbation site {k} is outside the backbone's blocks 0..{depth - 1}")
        self.blocks = [segmenter.backbone.blocks[k] for k in self.sites]
        self.prefix = getattr(segmenter.backbone, "num_prefix_tokens", 0)
        self.spreads: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.sites)
        self.eps: tuple[torch.Tensor, ...] | None = None
        self._handles: list = []
        self._preparing = False

    @property
    def spread(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first site's spread (the only one with a single site)."""
        return self.spreads[0]

    @spread.setter
    def spread(self, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.spreads[0] = value

    def site_draws(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(eps_mu, eps_sigma, apply or None) of site k for the images of the current forward."""
        if len(self.eps) == 2:  # a single site, every image shifted
            return self.eps[0], self.eps[1], None
        return self.eps[0][:, k], self.eps[1][:, k], self.eps[2][:, k]

    def shift_tokens(self, k: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6 of site k on its input tokens (B, prefix + N, C) or token map (B, h, w, C): (the tokens to pass
        on, each image's mean relative change of the statistics, 0 where the site does not apply)."""
        shape = tokens.shape
        flat = tokens.flatten(1, 2) if tokens.dim() == 4 else tokens
        (spread_mu, spread_sigma), (eps_mu, eps_sigma, apply) = self.spreads[k], self.site_draws(k)
        patch, magnitude = shift_statistics(flat[:, self.prefix:], eps_mu, eps_sigma,
                                            spread_mu.to(flat.dtype), spread_sigma.to(flat.dtype))
        magnitude = magnitude.mean(dim=-1)
        if apply is not None:
            keep = apply.to(torch.bool).reshape(-1, *([1] * (patch.dim() - 1)))
            patch = torch.where(keep, patch, flat[:, self.prefix:])
            magnitude = magnitude * apply.to(magnitude.dtype)
        shifted = torch.cat([flat[:, : self.prefix], patch.to(flat.dtype)], dim=1).reshape(shape)
        return shifted, magnitude

    def _shift(self, k: int, module, args):
        if self._preparing:  # ``prepare`` applies the shifts itself
            return None
        return (self.shift_tokens(k, args[0])[0], *args[1:])

    def __enter__(self) -> "TokenShift":
        self._handles = [block.register_forward_pre_hook(functools.partial(self._shift, k))
                         for k, block in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def prepare(self, segmenter: nn.Module, x: torch.Tensor,
                spread_of: Callable[[int, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One forward without gradients up to the last site: each site's spread is ``spread_of(k, patch tokens
        (B, N, C) fp32 it receives)`` (the batch's, a pool's, or the global batch's under torchrun), then its shift
        is applied as the gradient pass will apply it. Returns each image's shift magnitude s: the sum over the
        sites of the mean relative change of the statistics (``shift_statistics``)."""
        magnitudes = []

        def site(k: int, module, args):
            tokens = args[0]
            flat = tokens.flatten(1, 2) if tokens.dim() == 4 else tokens
            self.spreads[k] = spread_of(k, flat[:, self.prefix:].float())
            shifted, magnitude = self.shift_tokens(k, tokens)
            magnitudes.append(magnitude.float())
            if k == len(self.sites) - 1:
                raise _Captured(shifted)
            return (shifted, *args[1:])

        handles = [block.register_forward_pre_hook(functools.partial(site, k), prepend=True)
                   for k, block in enumerate(self.blocks)]
        self._preparing = True
        try:
            segmenter(x)
        except _Captured:
            pass
        finally:
            self._preparing = False
            for handle in handles:
                handle.remove()
        return torch.stack(magnitudes).sum(dim=0)


def statistics_change(tokens: torch.Tensor, shifted: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Each image's mean over channels of (|mu' - mu| + |sigma' - sigma|) / sigma between its patch tokens
    (B, N, C) and the same image's tokens in the other style: the shift magnitude s of a shift that is not Eq. 6
    (pixel changes, real images of another style), on the same scale as ``shift_statistics``' magnitude."""
    mu, sigma = channel_statistics(tokens.float(), eps)
    mu_shift, sigma_shift = channel_statistics(shifted.float(), eps)
    return (((mu_shift - mu).abs() + (sigma_shift - sigma).abs()) / sigma).mean(dim=-1)
