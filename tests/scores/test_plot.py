"""Tests for fisherscan.plot and ``fisherscan plot``: the numbers behind the figures, and the figures themselves.

Score files are built here with save_scores from tensors named and shaped like a timm DINOv2-style ViT (tiny
embedding width, 12 and 40 blocks; no model is instantiated). Oracles, all independent of fisherscan's code:
every element gets its block and group from hand-written rules on its name and row (a fused qkv holds Q, K, V as
three row blocks, Eq. 3), then a pandas groupby gives the cell means; the exact top-k is a stable numpy argsort of
the candidate elements in element order (ties to the earlier element, as FISHERTUNE.md breaks them); histograms
come from numpy.histogram. Figures are checked as PNG files read back with PIL, and tick labels by their drawn
extents.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import element_frame, invoke, vit_shapes
from PIL import Image

from fisherscan.scores import plot as plotting
from fisherscan.scores.file import load_scores, save_scores
from fisherscan.scores.summary import cell_summary

D = 4  # embedding width
CANDIDATES = ("Q", "K", "V", "FFN")
KINDS = ("fim", "fim_shift", "delta", "drfim")


# ----------------------------------------------------------------------------------------------------------
# score files and the oracle


def make_scores(depth: int, seed: int = 0, ties: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Log-normal scores growing with depth; ``ties``: a third exact zeros, the rest few integers (round(x ** 0.25))."""
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for k, kind in enumerate(KINDS):
        scores[kind] = {}
        for name, shape in vit_shapes(depth).items():
            block = int(name.split(".")[1]) if name.startswith("blocks.") else 0
            values = torch.exp(torch.randn(shape, generator=generator) * 1.5 + 0.08 * block + k)
            if ties:
                values = torch.where(torch.rand(shape, generator=generator) < 1 / 3, 0.0, values.pow(0.25).round())
            scores[kind][name] = values
    return scores


def write_scores(path: Path, depth: int, **kwargs) -> Path:
    save_scores(path, make_scores(depth, **kwargs), {"model": f"toy-vit-{depth}", "images": 16})
    return path


def oracle_matrix(frame: pd.DataFrame, stat: str, groups) -> pd.DataFrame:
    column = "value" if stat == "mean" else "selected"
    inside = frame[frame["block"] >= 0]
    matrix = inside.groupby(["group", "block"])[column].mean().unstack("block")
    return matrix.reindex(index=list(groups), columns=range(inside["block"].max() + 1)).astype(float)


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def assert_not_blank(pixels: np.ndarray) -> None:
    packed = (pixels[..., 0].astype(np.int32) << 16) | (pixels[..., 1].astype(np.int32) << 8) | pixels[..., 2]
    assert len(np.unique(packed)) > 50, "a real figure has text, a colour map and lines"
    assert (pixels < 128).any(axis=-1).mean() > 0.01, "some dark pixels: text, axes, cells"



# ----------------------------------------------------------------------------------------------------------
# the matrices


@pytest.mark.parametrize("ties", [False, True])
def test_heatmap_matrix_equals_a_pandas_groupby_of_the_raw_tensors(tmp_path, ties):
    scores, _ = load_scores(write_scores(tmp_path / "s.safetensors", depth=12, ties=ties))
    for top in (0.05, 0.3):
        frame = element_frame(scores["drfim"], top)
        summary = cell_summary(scores["drfim"], top)
        for stat in ("mean", "share"):
            for groups in (plotting.HEATMAP_GROUPS, plotting.ALL_HEATMAP_GROUPS):
                got = plotting.heatmap_matrix(summary, stat, groups)
                expected = oracle_matrix(frame, stat, groups)
                assert list(got.index) == list(groups) and list(got.columns) == list(range(12))
                np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=1e-12, atol=0)
        candidates = frame[frame["group"].isin(CANDIDATES)]["value"].to_numpy()
        k = math.ceil(top * len(candidates))
        assert summary["top_count"].sum() == k, "exactly k elements are selected, ties included"
        if ties:
            assert (candidates >= np.sort(candidates)[-k]).sum() > k, "ties at the threshold: element order decides"


def test_block_fractions_and_histograms_equal_their_oracles(tmp_path):
    scores, _ = load_scores(write_scores(tmp_path / "s.safetensors", depth=12, ties=True))
    frame = element_frame(scores["fim"], 0.1)
    got = plotting.block_fractions(cell_summary(scores["fim"], 0.1)).set_index(["block", "group"])
    candidates = frame[frame["group"].isin(CANDIDATES) & (frame["block"] >= 0)]
    selected = candidates.groupby(["block", "group"])["selected"].sum()
    per_block = candidates.groupby("block").size()
    assert len(got) == 12 * 4
    for (block, group), row in got.iterrows():
        assert row["selected"] == selected[(block, group)]
        assert row["fraction"] == pytest.approx(selected[(block, group)] / per_block[block], rel=1e-12)

    groups = ("Q", "FFN", "norm")
    scores = make_scores(12)["fim"]  # distinct values (tails to cut off), and a few zeros (no logarithm)
    scores["blocks.3.attn.qkv.weight"][:2] = 0.0
    scores["blocks.5.mlp.fc2.bias"][1] = 0.0
    frame = element_frame(scores, 0.1)
    histograms = plotting.log10_histograms(scores, groups, bins=20, tail=0.01)
    positive = {g: np.sort(frame[(frame["group"] == g) & (frame["value"] > 0)]["value"].to_numpy()) for g in groups}
    low = min(np.log10(v[math.ceil(0.01 * len(v)) - 1]) for v in positive.values())  # the 1% .. 99% quantiles
    high = max(np.log10(v[math.ceil(0.99 * len(v)) - 1]) for v in positive.values())
    edges = np.linspace(low, high, 21)
    for group in groups:
        part = histograms[histograms["group"] == group]
        values = frame[frame["group"] == group]["value"].to_numpy()
        counts, _ = np.histogram(np.log10(positive[group]), bins=edges)
        np.testing.assert_allclose(part["bin_low"].to_numpy(), edges[:-1], rtol=1e-12)
        assert part["count"].tolist() == counts.tolist(), group
        assert (part["nonpositive"] == (values <= 0).sum()).all()
        assert (part["outside"] == len(positive[group]) - counts.sum()).all()
        assert (part["elements"] == len(values)).all()
        assert part["fraction"].sum() == pytest.approx(counts.sum() / len(values), rel=1e-12)
    firsts = histograms.groupby("group")[["outside", "nonpositive"]].first()
    assert (firsts["outside"] > 0).all() and firsts["nonpositive"].tolist() == [1, 2 * D, 0]  # FFN, Q, norm


# ----------------------------------------------------------------------------------------------------------
# the command, end to end (one run per model size)


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    """``fisherscan plot`` on a 12-block file (defaults) and a 40-block file (three kinds, all groups, share)."""
    folder = tmp_path_factory.mktemp("plot")
    runs = {}
    for depth, extra in ((12, []), (40, ["--kind", "fim,delta,drfim", "--all-groups", "--stat", "share",
                                         "--top", "10%", "--out", folder / "vit40" / "fig.png"])):
        (folder / "vit40").mkdir(exist_ok=True)
        path = write_scores(folder / f"vit{depth}.safetensors", depth=depth, ties=depth == 40)
        runs[depth] = {"path": path, "result": invoke("plot", "--scores", path, *extra)}
    return runs


def printed_paths(result) -> dict[str, Path]:
    assert result.exit_code == 0, f"{result.exception!r}\n{result.stderr}"
    return {line.split(":")[0]: Path(line.split(":", 1)[1].strip()) for line in result.stdout.splitlines()}


def test_plot_writes_three_figures_and_a_csv_beside_each(plotted):
    paths = printed_paths(plotted[12]["result"])
    folder = plotted[12]["path"].parent
    assert paths == {"heatmap": folder / "vit12.png", "heatmap table": folder / "vit12.csv",
                     "histogram": folder / "vit12.hist.png", "histogram table": folder / "vit12.hist.csv",
                     "blocks": folder / "vit12.blocks.png", "blocks table": folder / "vit12.blocks.csv"}
    paths40 = printed_paths(plotted[40]["result"])
    out = plotted[40]["path"].parent / "vit40"
    assert paths40["heatmap"] == out / "fig.png" and paths40["histogram"] == out / "fig.hist.png"
    assert paths40["blocks"] == out / "fig.blocks.png" and paths40["heatmap table"] == out / "fig.csv"
    for path in [*paths.values(), *paths40.values()]:
        assert path.is_file() and path.stat().st_size > 0, path


@pytest.mark.parametrize("depth", [12, 40])
def test_the_saved_heatmap_table_equals_the_pandas_groupby(plotted, depth):
    scores, _ = load_scores(plotted[depth]["path"])
    paths = printed_paths(plotted[depth]["result"])
    table = pd.read_csv(paths["heatmap table"])
    kinds, stat, top = (["fim", "drfim"], "mean", 0.05) if depth == 12 else (["fim", "delta", "drfim"], "share", 0.1)
    groups = plotting.HEATMAP_GROUPS if depth == 12 else plotting.ALL_HEATMAP_GROUPS
    assert list(table.columns) == ["kind", "stat", "group", *map(str, range(depth))]
    assert table["kind"].tolist() == [kind for kind in kinds for _ in groups] and set(table["stat"]) == {stat}
    for kind in kinds:
        got = table[table["kind"] == kind].set_index("group")[[str(b) for b in range(depth)]]
        expected = oracle_matrix(element_frame(scores[kind], top), stat, groups)
        assert list(got.index) == list(groups)
        np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=1e-12, atol=0)


def expected_pixels(figure: str, kinds: int, depth: int, rows: int = 4) -> tuple[int, int]:
    """(height, width) in pixels by the size rules in fisherscan.plot's docs: per panel its axes plus margins in
    inches, at most 3 panels a row (4 as 2 x 2), 0.45 in for the title; the per-block axes are 0.13 in a block
    (3 to 8 in)."""
    panel = min(8.0, max(3.0, 0.13 * depth))
    nrows = math.ceil(kinds / 3)
    ncols = math.ceil(kinds / nrows)
    width, height = {"heatmap": (ncols * (1.0 + panel + 1.3), nrows * (0.35 + 0.42 * rows + 0.6)),
                     "histogram": (ncols * (0.75 + 3.6 + 1.75), nrows * (0.35 + 2.8 + 0.55)),
                     "blocks": (0.8 + panel + 1.0 + 1.6, kinds * (0.35 + 2.0 + 0.55))}[figure]
    return int(round((height + 0.45) * plotting.DPI, 6)), int(round(width * plotting.DPI, 6))  # Agg truncates


@pytest.mark.parametrize("depth", [12, 40])
def test_every_figure_is_a_non_blank_png_of_the_expected_size(plotted, depth):
    paths = printed_paths(plotted[depth]["result"])
    kinds, rows = (2, 4) if depth == 12 else (3, 6)
    for figure in ("heatmap", "histogram", "blocks"):
        pixels = png(paths[figure])
        assert pixels.shape[:2] == expected_pixels(figure, kinds, depth, rows), figure
        assert_not_blank(pixels)
        assert pixels.shape[1] <= 3600, "40 blocks x 3 kinds side by side stays viewable"


def heatmap_of(depth: int, kinds=KINDS, stat: str = "mean"):
    scores = make_scores(depth)
    matrices = {kind: plotting.heatmap_matrix(cell_summary(scores[kind], 0.05), stat) for kind in kinds}
    return plotting.heatmap_figure(matrices, stat, "auto", 0.05, "toy")


def test_block_labels_never_overlap_for_40_blocks():
    blocks = plotting.blocks_figure({"fim": plotting.block_fractions(cell_summary(make_scores(40)["fim"], 0.05))},
                                    0.05, "toy")
    for figure in (heatmap_of(40, ["fim"]), blocks):
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        axes = [ax for ax in figure.axes if ax.get_xlabel() == "block"]
        assert axes
        for ax in axes:
            labels = [label for label in ax.get_xticklabels() if label.get_text()]
            boxes = [label.get_window_extent(renderer) for label in labels]
            assert len(boxes) >= 8, "enough labels to find a block"
            for left, right in zip(boxes, boxes[1:]):
                assert left.x1 < right.x0, f"{left} overlaps {right}"
            assert int(labels[0].get_text()) == 0
            figure_box = figure.bbox
            assert all(figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1 for box in boxes), "labels inside"


def test_panels_share_a_colour_scale_only_where_the_units_agree():
    norms = {ax.get_title(): ax.images[0].norm for ax in heatmap_of(6, ("fim", "fim_shift", "drfim")).axes
             if ax.images}
    fim, fim_shift = norms[plotting.KIND_LABELS["fim"]], norms[plotting.KIND_LABELS["fim_shift"]]
    drfim = norms[plotting.KIND_LABELS["drfim"]]
    assert (fim.vmin, fim.vmax) == (fim_shift.vmin, fim_shift.vmax)  # F(x) and F(x'): same units
    assert (fim.vmin, fim.vmax) != (drfim.vmin, drfim.vmax)
    assert type(fim).__name__ == "LogNorm"
    shares = [ax.images[0].norm for ax in heatmap_of(6, ("fim", "delta"), "share").axes if ax.images]
    assert len(shares) == 2 and shares[0] is shares[1] and shares[0].vmin == 0
    assert type(shares[0]).__name__ == "Normalize"


def test_pdf_and_svg_by_extension(tmp_path):
    assert plotting.output_paths(tmp_path / "fig.svg") == {
        "heatmap": tmp_path / "fig.svg", "heatmap-csv": tmp_path / "fig.csv",
        "histogram": tmp_path / "fig.hist.svg", "histogram-csv": tmp_path / "fig.hist.csv",
        "blocks": tmp_path / "fig.blocks.svg", "blocks-csv": tmp_path / "fig.blocks.csv"}
    scores = make_scores(2)
    figure = plotting.heatmap_figure({"fim": plotting.heatmap_matrix(cell_summary(scores["fim"], 0.05))},
                                     "mean", "log", 0.05, "t")
    for suffix, magic in ((".pdf", b"%PDF"), (".svg", b"<?xml")):
        plotting.save_figure(figure, tmp_path / f"h{suffix}")
        assert (tmp_path / f"h{suffix}").read_bytes().startswith(magic)


# ----------------------------------------------------------------------------------------------------------
# errors: one line, exit code 2


@pytest.mark.parametrize("args, message", [
    (["--scores", "{missing}"], "no such scores file"),
    (["--kind", "fisher"], "--kind fisher: unknown score kind"),
    (["--kind", "precision"], "--kind precision: not in"),
    (["--top", "abc"], "--top abc: pass a fraction"),
    (["--top", "0"], "--top 0: must lie in (0, 1]"),
    (["--top", "150%"], "--top 150%: must lie in (0, 1]"),
    (["--out", "{folder}/fig.jpg"], "name a .png, .pdf or .svg file"),
    (["--out", "{folder}/nowhere/fig.png"], "does not exist"),
    (["--stat", "max"], "--stat max: choose mean or share"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    path = write_scores(tmp_path / "s.safetensors", depth=2)
    args = [a.format(missing=tmp_path / "missing.safetensors", folder=tmp_path) for a in args]
    if args[0] != "--scores":
        args = ["--scores", str(path), *args]
    result = invoke("plot", *args)
    assert result.exit_code == 2, result.stdout
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
