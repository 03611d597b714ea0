"""Rank statistics the score tables, the reliability report and the rank balance of DR-FIM share: average ranks
(pandas' method='average'), Pearson and Spearman correlations in float64, and the Jaccard overlap of two sets."""

from __future__ import annotations

import math

import torch


def tie_ranks(sorted_values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of an ascending 1-D tensor, in its order; tied values share the mean of their ranks."""
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2).index_select(0, inverse)


def ranks_overall_and_within(values: torch.Tensor, labels: torch.Tensor, count: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Average ranks (pandas' method='average') of a 1-D tensor among all its elements, and among the elements of
    the same label (0..count-1), both in element order. One sort serves both: each label's elements are already
    in order inside the sorted whole. (index_select / index_copy_: several times faster than t[i] on CPU.)"""
    sorted_values, order = torch.sort(values)
    overall = torch.empty(values.numel(), dtype=torch.float64).index_copy_(0, order, tie_ranks(sorted_values))
    within = torch.empty(values.numel(), dtype=torch.float64)
    sorted_labels = labels.index_select(0, order)
    for label in range(count):
        members = sorted_labels == label
        if members.any():
            within.index_copy_(0, order[members], tie_ranks(sorted_values[members]))
    return overall, within


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, tied values sharing the mean of their ranks (pandas' method='average')."""
    return ranks_overall_and_within(values, torch.zeros(values.numel(), dtype=torch.uint8), 0)[0]


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's correlation in float64; NaN when either side is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denominator if denominator > 0 else math.nan


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks; NaN when either side is constant."""
    return pearson(average_ranks(a.reshape(-1)), average_ranks(b.reshape(-1)))


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A & B| / |A | B| of two boolean masks; NaN when both are empty."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else math.nan
