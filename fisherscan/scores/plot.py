"""Figures of a scores file: where sensitivity lives, block by block (the paper's Fig. 6).

Three figures, each saved with the table behind it as CSV (``fig.png`` -> ``fig.csv``):

- heatmap (``fig.png``): rows Q, K, V, FFN (+ attn-proj, norm), columns block index; colour = the cell's mean
  score (log scale by default) or, with ``stat="share"``, the fraction of the cell's elements inside the global
  top-k (``summary.top_mask``: exact k = ceil(top * n) candidate elements, ties by element order). One panel per
  kind; kinds in the same units (F(x) and F(x'), the two variational precisions; every kind for ``share``)
  share one colour scale.
- histogram (``fig.hist.png``): log10 of the scores per group, one panel per kind.
- blocks (``fig.blocks.png``): per block the fraction of its candidate elements inside the top-k, stacked by group.

Matplotlib's object API on the Agg canvas: no pyplot, no global backend state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ..errors import FisherscanError
from ..io import atomic_target
from ..models.groups import CANDIDATE_GROUPS, parameter_groups
from .file import load_scores
from .summary import cell_summary, group_elements, resolve_kinds

DPI = 150
FORMATS = (".png", ".pdf", ".svg")
HEATMAP_GROUPS = CANDIDATE_GROUPS
ALL_HEATMAP_GROUPS = (*CANDIDATE_GROUPS, "attn-proj", "norm")
STATS = ("mean", "share")
SCALES = ("auto", "log", "linear")
KIND_LABELS = {"fim": "FIM F(x) (Eq. 9)", "fim_shift": "FIM F(x') (Eq. 9 on Eq. 6 inputs)",
               "delta": "Delta F (Eq. 5)", "drfim": "DR-FIM (Eq. 7)",
               "precision": "variational precision (clean)", "precision_shift": "variational precision (shifted)"}
UNITS = {"fim": "fisher", "fim_shift": "fisher", "precision": "precision", "precision_shift": "precision"}
GROUP_COLOURS = {"Q": "#1f77b4", "K": "#ff7f0e", "V": "#2ca02c", "FFN": "#d62728", "attn-proj": "#9467bd",
                 "norm": "#8c564b", "embed": "#e377c2", "other": "#7f7f7f"}
MIN_TICK_SPACING_IN = 0.25  # inches between block labels: two-digit labels at 8 pt are ~0.12 in wide
HISTOGRAM_TAIL = 0.001  # histogram bins span the groups' 0.1% .. 99.9% quantiles
TITLE_IN = 0.45  # the figure title (model, images) above all panels
# (left, right, top, bottom) margins around each panel's axes, in inches: tick labels, axis labels, panel titles;
# the heatmap's right margin holds its colour bar (0.12 gap + 0.15 bar) and the bar's labels
HEATMAP_MARGINS_IN = (1.0, 1.3, 0.35, 0.6)
HISTOGRAM_AXES_IN, HISTOGRAM_MARGINS_IN = (3.6, 2.8), (0.75, 1.75, 0.35, 0.55)  # the legend on the right
BLOCKS_AXES_H_IN, BLOCKS_MARGINS_IN = 2.0, (0.8, 1.6, 0.35, 0.55)


@dataclass
class PlotResult:
    paths: dict[str, Path]                                 # label -> written file, in print order
    matrices: dict[str, pd.DataFrame] = field(default_factory=dict)  # kind -> heatmap matrix (group x block)


# ----------------------------------------------------------------------------------------------------------
# the numbers behind the figures


def heatmap_matrix(summary: pd.DataFrame, stat: str = "mean", groups: tuple[str, ...] = HEATMAP_GROUPS
                   ) -> pd.DataFrame:
    """Rows ``groups``, columns block 0..L-1 of one kind's ``summary.cell_summary``: the cell's mean score, or
    (``share``) its top_fraction -- the fraction of its elements inside the global top-k. NaN: no such cell."""
    column = {"mean": "mean", "share": "top_fraction"}[stat]
    inside = summary[summary["block"] >= 0]
    blocks = range(int(inside["block"].max()) + 1) if len(inside) else range(0)
    matrix = inside.pivot(index="group", columns="block", values=column)
    return matrix.reindex(index=list(groups), columns=list(blocks)).astype(float)


def block_fractions(summary: pd.DataFrame) -> pd.DataFrame:
    """Per block and candidate group: selected (top-k) elements and the block's candidate elements."""
    cells = summary[(summary["block"] >= 0) & summary["group"].isin(CANDIDATE_GROUPS)]
    per_block = cells.groupby("block")["elements"].sum().rename("block_elements")
    frame = cells[["block", "group", "top_count"]].rename(columns={"top_count": "selected"}).join(per_block, on="block")
    frame["fraction"] = frame["selected"] / frame["block_elements"]
    return frame.reset_index(drop=True)


def log10_histograms(scores: dict[str, torch.Tensor], groups: tuple[str, ...], bins: int = 60,
                     tail: float = HISTOGRAM_TAIL) -> pd.DataFrame:
    """Histogram of log10(score) per group, on bins shared by the groups.

    The bins span the union of the groups' central ranges: from the smallest ``tail`` quantile to the largest
    1 - ``tail`` quantile of their positive scores (the k-th smallest, k = ceil(q * n)), so a few extreme elements
    do not squeeze the mass into a few bins. ``outside`` counts the positive scores beyond the bins,
    ``nonpositive`` those <= 0 (no logarithm); ``fraction`` is count / ``elements``, all of the group's.
    Logarithms in float64, 16M elements at a time.
    """
    elements = group_elements(scores, parameter_groups((name, tensor.shape) for name, tensor in scores.items()))
    positive = {group: elements[group][elements[group] > 0] for group in groups if group in elements}
    present = [values for values in positive.values() if values.numel()]
    if not present:
        return pd.DataFrame(columns=["group", "bin_low", "bin_high", "count", "fraction", "elements", "outside",
                                     "nonpositive"])

    def log10_kth(values: torch.Tensor, q: float) -> float:
        k = min(values.numel(), max(1, math.ceil(q * values.numel())))
        return float(torch.kthvalue(values, k).values.double().log10())

    low = min(log10_kth(values, tail) for values in present)
    high = max(log10_kth(values, 1 - tail) for values in present)
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    rows = []
    for group, values in positive.items():
        counts = torch.zeros(bins, dtype=torch.float64)
        for chunk in values.split(1 << 24):
            counts += torch.histogram(chunk.double().log10(), bins=edges).hist
        total = elements[group].numel()
        inside = int(counts.sum())
        rows += [{"group": group, "bin_low": float(edges[i]), "bin_high": float(edges[i + 1]), "count": int(counts[i]),
                  "fraction": float(counts[i]) / total, "elements": total, "outside": values.numel() - inside,
                  "nonpositive": total - values.numel()} for i in range(bins)]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------
# drawing


def tick_step(blocks: int, axes_width_in: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, ... blocks between labels that keeps labels MIN_TICK_SPACING_IN apart."""
    per_block = axes_width_in / max(blocks, 1)
    for step in (1, 2, 5, 10, 20, 50, 100):
        if step * per_block >= MIN_TICK_SPACING_IN:
            return step
    return 100


def panel_width(blocks: int) -> float:
    """Inches for the axes of one per-block panel: 0.13 in per block, 3 to 8 in."""
    return min(8.0, max(3.0, 0.13 * blocks))


def figure_with_panels(count: int, axes_in: tuple[float, float], margins_in: tuple[float, float, float, float],
                       title: str, max_cols: int = 3) -> tuple[Figure, list]:
    """A figure of ``count`` equal panels, ``max_cols`` side by side, laid out in inches: every panel is its axes
    plus (left, right, top, bottom) margins for labels, titles and colour bars, with TITLE_IN on top for ``title``.
    Fixed inches instead of a layout engine: sizes are exact, and saving skips a whole measuring pass."""
    left, right, top, bottom = margins_in
    nrows = math.ceil(count / max_cols)
    ncols = math.ceil(count / nrows)  # 4 panels: 2 x 2, not 3 + 1
    cell_w, cell_h = left + axes_in[0] + right, top + axes_in[1] + bottom
    width, height = ncols * cell_w, TITLE_IN + nrows * cell_h
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.suptitle(title, y=1 - 0.1 / height, va="top")
    axes = []
    for i in range(count):
        row, col = divmod(i, ncols)
        x, y = col * cell_w + left, height - TITLE_IN - row * cell_h - top - axes_in[1]
        axes.append(fig.add_axes((x / width, y / height, axes_in[0] / width, axes_in[1] / height)))
    return fig, axes


def block_axis(ax, blocks: int, width_in: float) -> None:
    step = tick_step(blocks, width_in)
    ax.set_xticks(range(0, blocks, step))  # no minor ticks: cells and bars mark the blocks (ticks are slow)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("block")


def norm_for(matrices: list[pd.DataFrame], stat: str, scale: str) -> tuple[Normalize, str]:
    """One colour scale for matrices in the same units; log unless linear is asked for (or nothing is > 0)."""
    values = np.concatenate([m.to_numpy().ravel() for m in matrices])
    values = values[np.isfinite(values)]
    use_log = scale == "log" or (scale == "auto" and stat == "mean")
    positive = values[values > 0]
    if use_log and positive.size:
        low, high = float(positive.min()), float(positive.max())
        return LogNorm(low, high if high > low else low * 10), "log"
    if not values.size:
        return Normalize(0.0, 1.0), "linear"
    low, high = (0.0 if stat == "share" else float(values.min())), float(values.max())
    return Normalize(low, high if high > low else low + 1.0), "linear"


def heatmap_figure(matrices: dict[str, pd.DataFrame], stat: str, scale: str, top: float, title: str) -> Figure:
    """One heatmap panel per kind (up to 3 side by side, then wrapped), each with its colour bar; kinds in the
    same units (every kind for ``share``) share one colour scale."""
    kinds = list(matrices)
    rows, blocks = matrices[kinds[0]].shape
    axes_w = panel_width(blocks)
    fig, axes = figure_with_panels(len(kinds), (axes_w, 0.42 * rows), HEATMAP_MARGINS_IN, title)
    family = (lambda kind: "share") if stat == "share" else (lambda kind: UNITS.get(kind, kind))
    norms = {}
    for kind in kinds:
        if family(kind) not in norms:
            norms[family(kind)] = norm_for([matrices[k] for k in kinds if family(k) == family(kind)], stat, scale)
    width = fig.get_figwidth()
    for ax, kind in zip(axes, kinds):
        matrix = matrices[kind]
        norm, used = norms[family(kind)]
        values = matrix.to_numpy(dtype=float)
        hidden = ~np.isfinite(values) | ((values <= 0) if used == "log" else False)
        image = ax.imshow(np.ma.masked_where(hidden, values), aspect="auto", interpolation="nearest",
                          cmap=colormap(), norm=norm)
        ax.set_yticks(range(rows), labels=list(matrix.index))
        ax.set_ylabel("group")
        block_axis(ax, blocks, axes_w)
        ax.set_title(KIND_LABELS.get(kind, kind), fontsize=10)
        box = ax.get_position()
        bar = fig.colorbar(image, cax=fig.add_axes((box.x1 + 0.12 / width, box.y0, 0.15 / width, box.height)))
        bar.set_label(f"mean ({used})" if stat == "mean" else f"fraction in top {top:.0%}", fontsize=8)
        bar.ax.tick_params(which="both", labelsize=8)
        if used == "log":
            log_colour_bar_ticks(bar, norm)
    return fig


def log_colour_bar_ticks(bar, norm: LogNorm) -> None:
    """Labels at 1, 2, 5 x 10^n (more within one decade, fewer over many), as plain text ("300", "0.3", "2e-11"):
    one format on every bar, and no slow mathtext."""
    decades = math.log10(norm.vmax / norm.vmin)
    subs = (1.0, 2.0, 3.0, 5.0, 7.0) if decades <= 1 else (1.0, 2.0, 5.0) if decades <= 2 else \
        (1.0, 3.0) if decades <= 4 else (1.0,)
    bar.ax.yaxis.set_major_locator(LogLocator(subs=subs, numticks=12))
    bar.ax.yaxis.set_major_formatter(FuncFormatter(
        lambda value, _: f"{value:g}" if 1e-3 <= value < 1e4 else f"{value:.0e}"))  # 300, 0.003, 2e-11
    bar.ax.yaxis.set_minor_formatter(NullFormatter())


def colormap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#d9d9d9")  # grey: no such cell, or a mean <= 0 on a log scale


def histogram_figure(histograms: dict[str, pd.DataFrame], title: str) -> Figure:
    """One panel per kind: per group, the fraction of its elements in each log10 bin."""
    kinds = list(histograms)
    fig, axes = figure_with_panels(len(kinds), HISTOGRAM_AXES_IN, HISTOGRAM_MARGINS_IN, title)
    for ax, kind in zip(axes, kinds):
        frame = histograms[kind]
        for group, part in frame.groupby("group", sort=False):
            edges = np.append(part["bin_low"].to_numpy(), part["bin_high"].to_numpy()[-1])
            total = part["elements"].iloc[0]
            notes = [f"{100 * part[column].iloc[0] / total:.2g}% {text}" for column, text in
                     (("outside", "off axis"), ("nonpositive", "<= 0")) if part[column].iloc[0]]
            ax.stairs(part["fraction"].to_numpy(), edges, label="\n  ".join([group, *notes]),
                      color=GROUP_COLOURS.get(group), linewidth=1.4)
        ax.set_xlabel("log10 score")
        ax.set_ylabel("fraction of the group's elements")
        ax.set_title(KIND_LABELS.get(kind, kind), fontsize=10)
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def with_gaps(values: np.ndarray) -> np.ndarray:
    """[a, b, c] -> [a, 0, b, 0, c]: step heights for bars separated by empty gaps."""
    return np.ravel(np.column_stack([values, np.zeros_like(values)]))[:-1]


def blocks_figure(fractions: dict[str, pd.DataFrame], top: float, title: str) -> Figure:
    """One panel per kind, stacked: per block the fraction of its Q/K/V/FFN elements in the top-k, by group."""
    kinds = list(fractions)
    blocks = int(max(frame["block"].max() for frame in fractions.values())) + 1
    axes_w = panel_width(blocks) + 1.0
    fig, axes = figure_with_panels(len(kinds), (axes_w, BLOCKS_AXES_H_IN), BLOCKS_MARGINS_IN, title, max_cols=1)
    edges = np.ravel([[b - 0.4, b + 0.4] for b in range(blocks)])  # a bar, then a gap, per block
    for ax, kind in zip(axes, kinds):
        frame = fractions[kind]
        bottom = np.zeros(blocks)
        for group in CANDIDATE_GROUPS:
            part = frame[frame["group"] == group].set_index("block")["fraction"].reindex(range(blocks)).fillna(0.0)
            top_edge = bottom + part.to_numpy()
            # stacked bars as one filled step artist per group (hundreds of Rectangles draw ~10x slower)
            ax.stairs(with_gaps(top_edge), edges, baseline=with_gaps(bottom), fill=True, label=group,
                      color=GROUP_COLOURS[group], linewidth=0)
            bottom = top_edge
        overall = frame["selected"].sum() / frame.drop_duplicates("block")["block_elements"].sum()
        ax.axhline(overall, color="black", linestyle="--", linewidth=1, label=f"all blocks ({overall:.1%})")
        ax.set_xlim(-0.6, blocks - 0.4)
        ax.set_ylim(0, max(float(bottom.max()), overall) * 1.1 or 1.0)
        block_axis(ax, blocks, axes_w)
        ax.set_ylabel(f"fraction in top {top:.0%}")
        ax.set_title(f"{KIND_LABELS.get(kind, kind)}: fraction of each block's Q/K/V/FFN elements selected",
                     fontsize=10)
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


# ----------------------------------------------------------------------------------------------------------
# the command's one call


def output_paths(out: Path) -> dict[str, Path]:
    """``fig.png`` -> the heatmap ``fig.png``, ``fig.hist.png``, ``fig.blocks.png`` and a CSV beside each
    (``fig.csv``, ``fig.hist.csv``, ``fig.blocks.csv``)."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise FisherscanError(f"--out {out}: name a .png, .pdf or .svg file")
    stem = out.name[:-len(out.suffix)]
    paths = {}
    for label, infix in (("heatmap", ""), ("histogram", ".hist"), ("blocks", ".blocks")):
        paths[label] = out.with_name(stem + infix + out.suffix)
        paths[f"{label}-csv"] = out.with_name(stem + infix + ".csv")
    return paths


def default_out(scores_path: Path) -> Path:
    """``scores.safetensors`` -> ``scores.png`` beside it."""
    scores_path = Path(scores_path)
    return scores_path.with_name(scores_path.name.removesuffix(".safetensors") + ".png")


def figure_title(metadata: dict) -> str:
    title = f"{metadata.get('model', '?')}, {metadata.get('images', '?')} images"
    return title + (" (random init)" if metadata.get("random_init") else "")


def save_figure(fig: Figure, path: Path) -> None:
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lower().lstrip("."), dpi=DPI)


def save_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_target(path) as tmp:
        frame.to_csv(tmp, index=False)


def matrix_table(matrices: dict[str, pd.DataFrame], stat: str) -> pd.DataFrame:
    """The heatmap matrices as one CSV table: columns kind, stat, group, then one per block ("0", "1", ...)."""
    frames = []
    for kind, matrix in matrices.items():
        frame = matrix.copy()
        frame.columns = [str(block) for block in frame.columns]
        frame.insert(0, "group", list(matrix.index))
        frame.insert(0, "stat", stat)
        frame.insert(0, "kind", kind)
        frames.append(frame.reset_index(drop=True))
    return pd.concat(frames, ignore_index=True)


def by_kind(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per-kind tables stacked into one, with the kind as first column."""
    return pd.concat([frame.assign(kind=kind)[["kind", *frame.columns]] for kind, frame in frames.items()],
                     ignore_index=True)


def plot_scores(path: Path, kind: str | None = None, out: Path | None = None, stat: str = "mean", top: float = 0.05,
                all_groups: bool = False, scale: str = "auto") -> PlotResult:
    """Write the heatmap, histogram and per-block figures of ``path`` (and their CSVs); see the module doc."""
    if stat not in STATS:
        raise FisherscanError(f"--stat {stat}: choose mean or share")
    if scale not in SCALES:
        raise FisherscanError(f"--scale {scale}: choose auto, log or linear")
    if not 0 < top <= 1:
        raise FisherscanError(f"--top {top}: must lie in (0, 1], e.g. 5% or 0.05")
    paths = output_paths(out if out is not None else default_out(path))
    scores, metadata = load_scores(path)
    kinds = resolve_kinds(kind, scores, source=str(path))
    groups = ALL_HEATMAP_GROUPS if all_groups else HEATMAP_GROUPS
    summaries = {k: cell_summary(scores[k], top) for k in kinds}
    matrices = {k: heatmap_matrix(summaries[k], stat, groups) for k in kinds}
    if matrices[kinds[0]].shape[1] == 0:
        raise FisherscanError(f"{path}: no transformer blocks (parameters named blocks.<i>.*); nothing to plot")
    title = figure_title(metadata)

    save_figure(heatmap_figure(matrices, stat, scale, top, title), paths["heatmap"])
    save_csv(matrix_table(matrices, stat), paths["heatmap-csv"])
    histograms = {k: log10_histograms(scores[k], groups) for k in kinds}
    save_figure(histogram_figure(histograms, title), paths["histogram"])
    save_csv(by_kind(histograms), paths["histogram-csv"])
    fractions = {k: block_fractions(summaries[k]) for k in kinds}
    save_figure(blocks_figure(fractions, top, title), paths["blocks"])
    save_csv(by_kind(fractions), paths["blocks-csv"])
    return PlotResult(paths=paths, matrices=matrices)
