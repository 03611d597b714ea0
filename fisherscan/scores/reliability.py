"""How reproducible a score is: the agreement of the scores of two disjoint halves of the images.

``score --replicates 2`` keeps the images of even and odd index apart in the same pass and compares, per kind, the
two halves' scores: the Jaccard overlap |A & B| / |A | B| of their top-k selections (k = floor(top * all backbone
parameters), the selection ``tune`` makes: the first k of ``selection_order`` by that kind) and Spearman's rank
correlation r over the candidate elements (average ranks, float64). A score from all the images is more reliable
than either half's: the Spearman-Brown prophecy 2r / (1 + r) estimates the correlation of two full-size runs.
"""

from __future__ import annotations

import math

import torch

from ..models.groups import CANDIDATE_GROUPS
from ..stats import jaccard, spearman
from .select import candidate_elements, selection_order

SPEARMAN_LIMIT = 20_000_000  # candidate elements ranked exactly; above, a seeded uniform subset of this size


def spearman_brown(r: float) -> float:
    """The reliability of a score from twice the data, given the correlation r of two halves."""
    return 2 * r / (1 + r) if math.isfinite(r) and r > -1 else math.nan


def top_k_mask(scores: dict[str, dict[str, torch.Tensor]], kind: str, k: int) -> torch.Tensor:
    """A boolean vector over all elements (``selection_order``'s element order): the first k candidates by ``kind``."""
    _, order = selection_order(scores, "scores", CANDIDATE_GROUPS, kind=kind)
    mask = torch.zeros(sum(t.numel() for t in scores[kind].values()), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def candidate_values(scores: dict[str, dict[str, torch.Tensor]], kind: str) -> torch.Tensor:
    """Every candidate element's value of ``kind``, flattened in ``selection_order``'s element order."""
    shapes = {name: tensor.shape for name, tensor in scores[kind].items()}
    names, allowed = candidate_elements(shapes, CANDIDATE_GROUPS)
    return torch.cat([scores[kind][n].reshape(-1).float() for n in names])[allowed]


def half_agreement(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]], kinds: list[str],
                   top: float = 0.05, seed: int = 0) -> dict[str, dict]:
    """Per kind: ``jaccard_top`` (of the two halves' top-k), ``spearman_halves`` and ``spearman_brown``."""
    total = sum(t.numel() for t in next(iter(a.values())).values())
    k = math.floor(top * total)
    out = {}
    for kind in kinds:
        jac = jaccard(top_k_mask(a, kind, k), top_k_mask(b, kind, k))
        values_a, values_b = candidate_values(a, kind), candidate_values(b, kind)
        sampled = values_a.numel() > SPEARMAN_LIMIT
        if sampled:
            pick = torch.randperm(values_a.numel(), generator=torch.Generator().manual_seed(seed))[:SPEARMAN_LIMIT]
            values_a, values_b = values_a[pick], values_b[pick]
        r = spearman(values_a, values_b)
        out[kind] = {"jaccard_top": jac, "spearman_halves": r, "spearman_brown": spearman_brown(r), "k": k,
                     "candidates_ranked": int(values_a.numel()), "subsampled": sampled}
    return out
