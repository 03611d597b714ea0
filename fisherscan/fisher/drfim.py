"""The domain-related Fisher: Delta F (Eq. 5), DR-FIM (Eq. 7) and its variational form (Eq. 15), with the decisions
the paper leaves open.

    Delta F = |F(x) - F(x')| / (min(F(x), F(x')) + eps)                   (Eq. 5)
    DRF     = F(x) + w * Delta F,   w = exp(-(eps_mu + eps_sigma))         (Eq. 7)

Eq. 7 adds a quantity with units (F) to a ratio; the balance of the two terms is a free parameter the paper never
fixes. fisherscan makes it explicit: DRF = F + lambda * w * Delta F (``drfim_weight`` lambda, 1 = Eq. 7), either on
the normalised values (``combine="sum"``) or on their ranks over the candidate elements (``combine="rank"``: each
term replaced by its average rank divided by the number of candidates, so both lie in (0, 1]; unit-free; other
elements 0).

Eq. 15 as printed, with F = gamma (Lambda - tau^-2) / s (Eq. 14) substituted, keeps the prior precision in the
denominator: a pseudocount c = gamma tau^-2 / s (the prior in the units of F) that damps Delta F where F is small,
and gamma multiplies the domain term:

    Delta F_15 = |F(x) - F(x')| / (min(F(x), F(x')) + c + eps),  DRF = F(x) + w * gamma * Delta F_15   (Eq. 15)

Decisions (``docs/method.md``): F(x) and F(x') are divided by the mean of F(x) over the candidate elements
(Q, K, V, FFN) first, so both terms are O(1); Eq. 5's eps is then a relative floor, ``DELTA_EPS_NORMALIZED``
(1e-3), instead of the printed 1e-8 (``DELTA_EPS_LITERAL``, kept for the literal formula); the shift weight is
exp(-s), s the mean relative change of the statistics Eq. 6 actually applied; Eq. 15's pseudocount is divided
by the same mean as F. This module is their one home: ``dr_fim_terms`` combines F and Delta F for Eq. 7 and Eq. 15
alike (``variational_dr_fim_terms`` passes it Eq. 15's pseudocount and factor).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ..stats import average_ranks

COMBINE_MODES = ("sum", "rank")
DELTA_EPS_LITERAL = 1e-8  # Eq. 5 as printed
DELTA_EPS_NORMALIZED = 1e-3  # a relative floor once F is in units of its candidate mean


def default_delta_eps(normalize: bool) -> float:
    """Eq. 5's eps: the relative floor for normalised F, the printed 1e-8 for the literal formula."""
    return DELTA_EPS_NORMALIZED if normalize else DELTA_EPS_LITERAL


def delta_fisher(f_clean: dict[str, torch.Tensor], f_shift: dict[str, torch.Tensor],
                 eps: float = DELTA_EPS_LITERAL, pseudocount: float = 0.0) -> dict[str, torch.Tensor]:
    """Eq. 5: Delta F = |F(x) - F(x')| / (min(F(x), F(x')) + eps), element-wise, per parameter; with
    ``pseudocount`` c, Eq. 15's |F(x) - F(x')| / (min(F(x), F(x')) + c + eps)."""
    floor = eps if pseudocount == 0 else pseudocount + eps
    return {name: (f_clean[name] - f_shift[name]).abs() / (torch.minimum(f_clean[name], f_shift[name]) + floor)
            for name in f_clean}


def eq15_pseudocount(gamma: float, tau: float, likelihood_scale: float = 1.0) -> float:
    """Eq. 15's pseudocount in the units of F: gamma * tau^-2 / s (Eq. 14 applied to the prior precision)."""
    return gamma * tau**-2 / likelihood_scale


def fisher_scale(f_clean: dict[str, torch.Tensor], candidates: Iterable[str] | None = None) -> float:
    """The mean of F(x) over all elements of the ``candidates`` parameters (default: all) -- the unit of F."""
    names = list(f_clean) if candidates is None else list(candidates)
    total = sum(float(f_clean[n].double().sum()) for n in names)
    count = sum(f_clean[n].numel() for n in names)
    return total / count if count else 0.0


def shift_weight(magnitude: float) -> float:
    """exp(-s): the damping of the domain term in Eq. 7, with s the mean relative shift actually applied."""
    return math.exp(-magnitude)


def candidate_ranks(values: dict[str, torch.Tensor], candidates: Iterable[str]) -> dict[str, torch.Tensor]:
    """Each candidate element's average rank among all candidate elements (ascending, ties sharing the mean of
    their ranks) divided by their number, so in (0, 1]; every other parameter 0."""
    names = [n for n in values if n in set(candidates)]
    flat = torch.cat([values[n].reshape(-1).double() for n in names])
    ranks = (average_ranks(flat) / max(flat.numel(), 1)).float()
    out = {n: torch.zeros_like(v, dtype=torch.float32) for n, v in values.items()}
    for name, piece in zip(names, ranks.split([values[n].numel() for n in names])):
        out[name] = piece.view(values[name].shape)
    return out


def dr_fim_terms(f_clean: dict[str, torch.Tensor], f_shift: dict[str, torch.Tensor], shift_weight: float,
                 normalize: bool = True, candidates: Iterable[str] | None = None, eps: float | None = None,
                 drfim_weight: float = 1.0, combine: str = "sum", *, pseudocount: float = 0.0,
                 domain_factor: float = 1.0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """Eq. 7 with its parts: (Delta F of Eq. 5, DRF = F(x) + lambda * w * Delta F, the scale F was divided by).

    ``normalize=True`` (fisherscan's default): F(x) and F(x') are divided by the mean of F(x) over the candidate
    elements first, so both terms are O(1), and Eq. 5's eps is a relative floor (``default_delta_eps``).
    ``normalize=False`` is the literal formula with eps = 1e-8 (scale 1). ``drfim_weight`` lambda and ``combine``
    set the balance (module doc); lambda 1 and "sum" are Eq. 7. ``pseudocount`` (in the units of F, divided by the
    same scale) and ``domain_factor`` (multiplying w) are Eq. 15's (``variational_dr_fim_terms``).
    """
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {COMBINE_MODES}, not {combine!r}")
    if eps is None:
        eps = default_delta_eps(normalize)
    scale = 1.0
    if normalize:
        scale = fisher_scale(f_clean, candidates)
        if scale <= 0:
            raise ValueError("F(x) is zero on every candidate element; nothing to normalise by")
        f_clean = {n: v / scale for n, v in f_clean.items()}
        f_shift = {n: v / scale for n, v in f_shift.items()}
        pseudocount = pseudocount / scale
    delta = delta_fisher(f_clean, f_shift, eps, pseudocount)
    weight = shift_weight * domain_factor * drfim_weight  # exact when both factors are 1
    if combine == "rank":
        names = list(f_clean) if candidates is None else list(candidates)
        task, domain = candidate_ranks(f_clean, names), candidate_ranks(delta, names)
        return delta, {name: task[name] + weight * domain[name] for name in f_clean}, scale
    return delta, {name: f_clean[name] + weight * delta[name] for name in f_clean}, scale


def variational_dr_fim_terms(f_clean: dict[str, torch.Tensor], f_shift: dict[str, torch.Tensor], shift_weight: float,
                             *, gamma: float, tau: float, likelihood_scale: float = 1.0, normalize: bool = True,
                             candidates: Iterable[str] | None = None, eps: float | None = None, **combine
                             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """Eq. 15 as printed, on F(x), F(x') of Eq. 14: (Delta F_15, DRF = F(x) + w * gamma * Delta F_15, the scale).

    The pseudocount gamma tau^-2 / s (``eq15_pseudocount``) and F are normalised alike; ``combine`` goes to
    ``dr_fim_terms`` unchanged (how F and Delta F are balanced is decided there, once for Eq. 7 and Eq. 15).
    """
    return dr_fim_terms(f_clean, f_shift, shift_weight, normalize, candidates, eps,
                        pseudocount=eq15_pseudocount(gamma, tau, likelihood_scale), domain_factor=gamma, **combine)


def dr_fim(f_clean: dict[str, torch.Tensor], f_shift: dict[str, torch.Tensor], shift_weight: float,
           normalize: bool = True, candidates: Iterable[str] | None = None,
           eps: float | None = None) -> dict[str, torch.Tensor]:
    """Eq. 7: DRF = F(x) + w * Delta F (Eq. 5), w the shift weight; normalisation as in ``dr_fim_terms``."""
    return dr_fim_terms(f_clean, f_shift, shift_weight, normalize, candidates, eps)[1]
