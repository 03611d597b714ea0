"""Summaries of a scores file by parameter group: the table ``score`` prints and saves as CSV."""

from __future__ import annotations

import math

import pandas as pd
import torch
from rich.table import Table

from ..errors import FisherscanError
from ..models.groups import CANDIDATE_GROUPS, GROUPS, parameter_groups
from .file import KINDS


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
    element order (parameters in ``scores`` order, row-major within each) -- as ``docs/method.md`` breaks ties.
    """
    cells, k = top_cell_counts(scores, groups, fraction)
    counts = dict.fromkeys(CANDIDATE_GROUPS, 0)
    for (_, group), count in cells.items():
        counts[group] += count
    return counts, k


def top_mask(scores: dict[str, torch.Tensor], groups: dict, fraction: float) -> tuple[dict[str, torch.Tensor], int]:
    """The exact top k = ceil(fraction * n) candidate elements (Q, K, V, FFN) as one boolean tensor per parameter
    (the shape of its score), and k.

    All elements above the k-th largest value, then the ones equal to it in a fixed element order (parameters in
    ``scores`` order, row-major within each) until exactly k -- as ``docs/method.md`` breaks ties.
    """
    pieces = [(name, piece.rows if tensor.dim() else ...) for name, tensor in scores.items()
              for piece in groups[name] if piece.group in CANDIDATE_GROUPS]
    if not pieces:
        raise ValueError("no candidate (Q, K, V, FFN) parameters to rank")
    threshold, k = top_threshold(torch.cat([scores[name][rows].reshape(-1) for name, rows in pieces]), fraction)
    masks = {name: torch.zeros(tensor.shape, dtype=torch.bool) for name, tensor in scores.items()}
    for name, rows in pieces:
        masks[name][rows] = scores[name][rows] > threshold
    remaining = k - sum(int(mask.sum()) for mask in masks.values())
    for name, rows in pieces:
        if remaining <= 0:
            break
        tied = (scores[name][rows] == threshold).reshape(-1)
        take = tied & (tied.cumsum(0) <= remaining)  # the first ``remaining`` tied elements, row-major
        masks[name][rows] |= take.reshape(masks[name][rows].shape)
        remaining -= int(take.sum())
    return masks, k


def top_cell_counts(scores: dict[str, torch.Tensor], groups: dict, fraction: float
                    ) -> tuple[dict[tuple[int, str], int], int]:
    """How many of the exact top k candidate elements (``top_mask``) each (block, group) cell holds, and k.

    Cells are those of the candidate groups Q, K, V, FFN only (nothing else is ranked); block -1 is outside blocks.
    """
    masks, k = top_mask(scores, groups, fraction)
    cells: dict[tuple[int, str], int] = {}
    for name, mask in masks.items():
        for piece in groups[name]:
            if piece.group in CANDIDATE_GROUPS:
                key = (piece.block, piece.group)
                cells[key] = cells.get(key, 0) + int((mask[piece.rows] if mask.dim() else mask).sum())
    return cells, k


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


def resolve_kinds(requested: str | None, available, default: tuple[str, ...] = ("fim", "drfim"),
                  source: str = "the scores file") -> list[str]:
    """``--kind a,b`` -> [a, b], each checked against the kinds in the file; None -> ``default`` where present
    (else every kind in the file, in file order)."""
    available = list(available)
    if requested is None:
        return [kind for kind in default if kind in available] or available
    kinds = [kind.strip() for kind in requested.split(",") if kind.strip()]
    if not kinds:
        raise FisherscanError(f"--kind {requested!r}: name at least one kind, e.g. --kind drfim")
    known = (*KINDS, "precision", "precision_shift")
    for kind in kinds:
        if kind not in available:
            if kind in known:
                raise FisherscanError(f"--kind {kind}: not in {source} (it holds {', '.join(available)})")
            raise FisherscanError(f"--kind {kind}: unknown score kind; choose from {', '.join(known)}")
    return list(dict.fromkeys(kinds))


def median(values: torch.Tensor) -> float:
    """The median of a 1-D tensor as pandas defines it: the mean of the two middle values when n is even."""
    n = values.numel()
    values = values.double()
    low = float(torch.kthvalue(values, (n + 1) // 2).values)
    return low if n % 2 else (low + float(torch.kthvalue(values, n // 2 + 1).values)) / 2


def cell_summary(scores: dict[str, torch.Tensor], top: float = 0.05) -> pd.DataFrame:
    """One row per (block, group) cell of ONE score kind (``scores``: param name -> tensor).

    Columns: block (-1: outside blocks), group, elements, mean, median, top_count (elements of the cell among the
    exact top ``top`` of all candidate elements, ``top_mask``), top_share (top_count / k: the cell's share of the
    global top-k) and top_fraction (top_count / elements: the share of the cell's own elements selected; 0 for
    groups that are not candidates). Rows sorted by block (blocks first, then -1) and GROUPS order.
    """
    groups = parameter_groups((name, tensor.shape) for name, tensor in scores.items())
    counts, k = top_cell_counts(scores, groups, top)
    pieces: dict[tuple[int, str], list[torch.Tensor]] = {}
    for name, tensor in scores.items():
        for piece in groups[name]:
            values = tensor[piece.rows] if tensor.dim() else tensor.reshape(1)
            pieces.setdefault((piece.block, piece.group), []).append(values.reshape(-1))
    rows = []
    for (block, group), parts in sorted(pieces.items(), key=lambda item: (item[0][0] < 0, item[0][0],
                                                                           GROUPS.index(item[0][1]))):
        values = torch.cat(parts)
        count = counts.get((block, group), 0)
        rows.append({"block": block, "group": group, "elements": values.numel(),
                     "mean": float(values.double().mean()), "median": median(values),
                     "top_count": count, "top_share": count / k, "top_fraction": count / values.numel()})
    return pd.DataFrame(rows)
