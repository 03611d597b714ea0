"""A simulated unseen domain: Eq. 6 applied to the patch-token statistics entering one ViT block (after DSU).

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
    """Eq. 6 at the input of backbone block ``site`` of a segmenter, while used as a context manager.

    Before each forward, set ``spread`` (Sigma_mu, Sigma_sigma of the current batch, constants) and ``eps``
    (eps_mu, eps_sigma of the images in that forward, (B, C) each). Leaving the context removes the hook.
    """

    def __init__(self, segmenter: nn.Module, site: int):
        depth = len(segmenter.backbone.blocks)
        if not 0 <= site < depth:
            raise ValueError(f"perturbation site {site} is outside the backbone's blocks 0..{depth - 1}")
        self.block = segmenter.backbone.blocks[site]
        self.prefix = getattr(segmenter.backbone, "num_prefix_tokens", 0)
        self.spread: tuple[torch.Tensor, torch.Tensor] | None = None
        self.eps: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handle = None

    def _shift(self, module, args):
        tokens = args[0]
        shape = tokens.shape
        if tokens.dim() == 4:  # a token map (B, h, w, C)
            tokens = tokens.flatten(1, 2)
        (spread_mu, spread_sigma), (eps_mu, eps_sigma) = self.spread, self.eps
        patch, _ = shift_statistics(tokens[:, self.prefix:], eps_mu, eps_sigma,
                                    spread_mu.to(tokens.dtype), spread_sigma.to(tokens.dtype))
        return (torch.cat([tokens[:, : self.prefix], patch.to(tokens.dtype)], dim=1).reshape(shape), *args[1:])

    def __enter__(self) -> "TokenShift":
        self._handle = self.block.register_forward_pre_hook(self._shift)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None
