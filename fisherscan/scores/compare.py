"""Look inside scores files: per block x group statistics, and how far two files agree.

``inspect_scores`` is the table of ``fisherscan inspect``: one row per (block, group, kind) with the element
count, mean and median score and the cell's share of the global top-k (``summary.cell_summary``: exact top k =
ceil(top * n) candidate elements ranked by that kind, ties by element order). ``compare_scores`` asks whether two
files (two models, seeds, data sets or estimators) rank the same elements: Spearman's rank correlation per group
and over all elements, and the Jaccard overlap |A & B| / |A | B| of their top-k selections.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import torch
from rich import box
from rich.markup import escape
from rich.table import Table

from ..errors import FisherscanError
from ..io import atomic_target
from ..models.groups import CANDIDATE_GROUPS, GROUPS, parameter_groups
from ..stats import average_ranks, jaccard, pearson, ranks_overall_and_within, spearman, tie_ranks  # noqa: F401
from .file import load_scores
from .summary import cell_summary, resolve_kinds, top_mask

SUMMARY_KEYS = ("model", "timm_architecture", "weights", "random_init", "estimator", "images", "seed", "labels",
                "data", "normalization", "shift", "fisherscan_version")


# ----------------------------------------------------------------------------------------------------------
# one file


def metadata_rows(metadata: dict, width: int = 90) -> list[tuple[str, str]]:
    """(key, value) pairs to print: the keys a reader looks for first, then the rest; nested values as compact
    JSON cut at ``width`` characters."""
    keys = [key for key in SUMMARY_KEYS if key in metadata] + sorted(set(metadata) - set(SUMMARY_KEYS))
    rows = []
    for key in keys:
        value = metadata[key]
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(", ", ": "))
        rows.append((key, text if len(text) <= width else text[:width - 3] + "..."))
    return rows


def metadata_table(metadata: dict, title: str) -> Table:
    table = Table(title=escape(title), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in metadata_rows(metadata):
        table.add_row(escape(key), escape(value))
    return table


def reliability_table(record: dict) -> Table:
    """Per kind, the two halves' top-k Jaccard and Spearman, and Spearman-Brown's estimate for the full set (the
    record ``score --replicates 2`` writes)."""
    table = Table(title=escape(f"reliability: {record['halves']}, top {record['top']:.0%}"))
    for column in ("kind", "top-k Jaccard", "Spearman (halves)", "Spearman-Brown (full)"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind in ("fim", "fim_shift", "delta", "drfim"):
        row = record[kind]
        table.add_row(kind, f"{row['jaccard_top']:.3f}", f"{row['spearman_halves']:.3f}",
                      f"{row['spearman_brown']:.3f}")
    return table


def inspect_scores(scores: dict[str, dict[str, torch.Tensor]], kinds: list[str], top: float = 0.05) -> pd.DataFrame:
    """One row per block x group x kind: block (-1: outside blocks), group, kind, elements, mean, median,
    top_count, top_share (of the global top-k of that kind), top_fraction (of the cell's elements)."""
    frames = []
    for kind in kinds:
        frame = cell_summary(scores[kind], top)
        frame.insert(2, "kind", kind)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def inspect_table(frame: pd.DataFrame, title: str, top: float) -> Table:
    """The rich table of ``inspect_scores``: one row per block x group, columns mean/median/top share per kind."""
    kinds = list(dict.fromkeys(frame["kind"]))
    wide = frame.pivot_table(index=["block", "group"], columns="kind", values=["mean", "median", "top_share"],
                             sort=False)
    elements = frame.drop_duplicates(["block", "group"]).set_index(["block", "group"])["elements"]
    table = Table(title=escape(title), box=box.SIMPLE_HEAD)
    for column in ("block", "group", "elements"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for kind in kinds:
        for stat in ("mean", "median"):
            table.add_column(f"{kind}\n{stat}", justify="right")
        table.add_column(f"{kind}\ntop{top:.0%}", justify="right")
    for (block, group), n in elements.items():
        cells = ["-" if block < 0 else str(block), group, f"{n:,}"]
        for kind in kinds:
            row = wide.loc[(block, group)]
            cells += [f"{row[('mean', kind)]:.2e}", f"{row[('median', kind)]:.2e}"]
            cells.append(f"{row[('top_share', kind)]:.1%}" if group in CANDIDATE_GROUPS else "")
        table.add_row(*cells)
    return table


# ----------------------------------------------------------------------------------------------------------
# two files


def check_same_parameters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], kind: str, names: tuple[str, str]
                          ) -> None:
    missing = sorted(set(a) ^ set(b))
    if missing:
        where = names[1] if missing[0] in a else names[0]
        raise FisherscanError(f"{kind}/{missing[0]}: missing from {where}; compare files of the same architecture")
    for name, tensor in a.items():
        if tensor.shape != b[name].shape:
            raise FisherscanError(f"{kind}/{name}: shape {tuple(tensor.shape)} in {names[0]} but "
                                  f"{tuple(b[name].shape)} in {names[1]}; compare files of the same architecture")


def group_labels(scores: dict[str, torch.Tensor], groups: dict) -> torch.Tensor:
    """The index in GROUPS of every element's group, flattened in parameter order (row-major)."""
    parts = []
    for name, tensor in scores.items():
        label = torch.empty(tensor.shape, dtype=torch.uint8)
        for piece in groups[name]:
            label[piece.rows if tensor.dim() else ...] = GROUPS.index(piece.group)
        parts.append(label.reshape(-1))
    return torch.cat(parts)


def compare_scores(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]], kinds: list[str],
                   top: float = 0.05, names: tuple[str, str] = ("A", "B")) -> pd.DataFrame:
    """One row per kind x group (GROUPS order, then 'all'): elements; spearman, the rank correlation over the
    group's elements (over every element for 'all'); jaccard, the overlap of the two exact top-k candidate
    selections (``summary.top_mask``) within the group (NaN outside Q, K, V, FFN, or where neither selects any)."""
    rows = []
    for kind in kinds:
        check_same_parameters(a[kind], b[kind], kind, names)
        first = a[kind]
        second = {name: b[kind][name] for name in first}  # the same element order on both sides
        groups = parameter_groups((name, tensor.shape) for name, tensor in first.items())
        labels = group_labels(first, groups)
        sides = []
        for scores in (first, second):
            masks, _ = top_mask(scores, groups, top)
            values = torch.cat([tensor.reshape(-1) for tensor in scores.values()])
            sides.append((*ranks_overall_and_within(values, labels, len(GROUPS)),
                          torch.cat([masks[name].reshape(-1) for name in scores])))
        (overall_a, within_a, top_a), (overall_b, within_b, top_b) = sides
        for index, group in enumerate(GROUPS):
            members = labels == index
            if members.any():
                rows.append({"kind": kind, "group": group, "elements": int(members.sum()),
                             "spearman": pearson(within_a[members], within_b[members]),
                             "jaccard": jaccard(top_a[members], top_b[members]) if group in CANDIDATE_GROUPS
                             else math.nan})
        rows.append({"kind": kind, "group": "all", "elements": labels.numel(),
                     "spearman": pearson(overall_a, overall_b), "jaccard": jaccard(top_a, top_b)})
    return pd.DataFrame(rows)


def compare_table(frame: pd.DataFrame, title: str, top: float) -> Table:
    table = Table(title=escape(title), box=box.SIMPLE_HEAD)
    for column, justify in (("kind", "left"), ("group", "left"), ("elements", "right"), ("spearman", "right"),
                            (f"jaccard top{top:.0%}", "right")):
        table.add_column(column, justify=justify)
    for row in frame.itertuples(index=False):
        table.add_row(row.kind, row.group, f"{row.elements:,}",
                      "n/a" if math.isnan(row.spearman) else f"{row.spearman:.3f}",
                      f"{row.jaccard:.3f}" if not math.isnan(row.jaccard) else
                      "-" if row.group in (*CANDIDATE_GROUPS, "all") else "")
    return table


# ----------------------------------------------------------------------------------------------------------
# the command's one call


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_target(Path(path)) as tmp:
        frame.to_csv(tmp, index=False)


def run_inspect(path: Path, kind: str | None = None, top: float = 0.05, compare: Path | None = None,
                csv: Path | None = None) -> tuple[list[Table], pd.DataFrame]:
    """Load ``path`` (and ``compare``), build the tables to print and the frame behind the last one; write it to
    ``csv`` if given (the per-cell table, or with ``compare`` the agreement table)."""
    if not 0 < top <= 1:
        raise FisherscanError(f"--top {top}: must lie in (0, 1], e.g. 5% or 0.05")
    scores, metadata = load_scores(path)
    if compare is None:
        kinds = resolve_kinds(kind, scores, source=str(path))
        frame = inspect_scores(scores, kinds, top)
        tables = [metadata_table(metadata, str(path)),
                  inspect_table(frame, f"{metadata.get('model', '?')}: {metadata.get('images', '?')} images, "
                                       f"per block x group (top {top:.0%} of candidates by each kind)", top)]
        if "reliability" in metadata:
            tables.insert(1, reliability_table(metadata["reliability"]))
    else:
        other, other_metadata = load_scores(compare)
        common = [k for k in scores if k in other]
        if not common:
            raise FisherscanError(f"{path} and {compare} share no score kind; nothing to compare")
        kinds = resolve_kinds(kind, common, source=f"both {path} and {compare}")
        frame = compare_scores(scores, other, kinds, top, names=(str(path), str(compare)))
        tables = [metadata_table(metadata, f"A: {path}"), metadata_table(other_metadata, f"B: {compare}"),
                  compare_table(frame, f"A vs B: Spearman rank correlation, Jaccard overlap of the top {top:.0%}",
                                top)]
    if csv is not None:
        write_csv(frame, csv)
    return tables, frame
