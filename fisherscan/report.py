"""Summaries of a scores file by parameter group: the table ``score`` prints and saves as CSV."""

from __future__ import annotations

import math

import pandas as pd
import torch
from rich.table import Table

from .groups import CANDIDATE_GROUPS, GROUPS, parameter_groups


def group_elements(scores: dict[str, torch.Tensor], groups: dict) -> dict[str, torch.Tensor]:
    """All score elements of each group (over every block), flattened: group -> 1-D tensor."""
    pieces: dict[str, list[torch.Tensor]] = {}
    for name, tensor in scores.items():
        for piece in groups[name]:
            values = tensor[piece.rows] if tensor.dim() else tensor.reshape(1)
            pieces.setdefault(piece.group, []).append(values.reshape(-1).float())
    return {group: torch.cat(parts) for group, parts in pieces.items()}


def top_threshold(values: torch.Tensor, fraction: float) -> tuple[float, int]:
    """The value of the k-th largest element, k = ceil(fraction * n), and k."""
    k = max(1, math.ceil(fraction * values.numel()))
    return float(torch.kthvalue(values, values.numel() - k + 1).values), k


def top_counts(scores: dict[str, torch.Tensor], groups: dict, fraction: float) -> tuple[dict[str, int], int]:
    """How many of the top k = ceil(fraction * n) candidate elements (Q, K, V, FFN) each group holds, and k.

    Exactly k elements are counted: all those above the k-th largest value, then the ones equal to it in a fixed
    element order (parameters in ``scores`` order, row-major within each) -- as FISHERTUNE.md breaks ties.
    """
    pieces = [(piece.group, (tensor[piece.rows] if tensor.dim() else tensor.reshape(1)).reshape(-1))
              for name, tensor in scores.items() for piece in groups[name] if piece.group in CANDIDATE_GROUPS]
    threshold, k = top_threshold(torch.cat([values for _, values in pieces]), fraction)
    counts = dict.fromkeys(CANDIDATE_GROUPS, 0)
    for group, values in pieces:
        counts[group] += int((values > threshold).sum())
    remaining = k - sum(counts.values())
    for group, values in pieces:
        if remaining <= 0:
            break
        tied = min(remaining, int((values == threshold).sum()))
        counts[group] += tied
        remaining -= tied
    return counts, k


def group_summary(scores: dict[str, dict[str, torch.Tensor]], top: float = 0.05, rank_kind: str = "drfim"
                  ) -> pd.DataFrame:
    """One row per group: element count, mean FIM, mean DR-FIM, and the group's share of the top ``top`` of
    candidate elements (Q, K, V, FFN) ranked by ``rank_kind`` (exactly that many elements; ties by element order)."""
    reference = scores["fim"]
    groups = parameter_groups((name, tensor.shape) for name, tensor in reference.items())
    by_kind = {kind: group_elements(scores[kind], groups) for kind in ("fim", rank_kind) if kind in scores}
    ranked = by_kind[rank_kind]
    counts, k = top_counts({name: scores[rank_kind][name] for name in reference}, groups, top)
    rows = []
    for group in GROUPS:
        if group not in ranked:
            continue
        rows.append({"group": group, "elements": ranked[group].numel(),
                     "mean_fim": float(by_kind["fim"][group].double().mean()),
                     f"mean_{rank_kind}": float(ranked[group].double().mean()),
                     f"top{top:.0%}_share": counts.get(group, 0) / k})
    return pd.DataFrame(rows)


def summary_table(frame: pd.DataFrame, title: str) -> Table:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(column, justify="left" if column == "group" else "right")
    for row in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, row):
            if column == "group":
                cells.append(str(value))
            elif column == "elements":
                cells.append(f"{value:,}")
            elif column.endswith("share"):
                cells.append(f"{value:.1%}")
            else:
                cells.append(f"{value:.3e}")
        table.add_row(*cells)
    return table
