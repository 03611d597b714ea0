"""Tests for fisherscan.inspection and ``fisherscan inspect``: the block x group table, its CSV, and --compare.

Score files are built here with save_scores from tensors named and shaped like a timm DINOv2-style ViT (tiny
embedding width; no model is instantiated). Oracles, independent of fisherscan's code: block and group of every
element from hand-written rules on its name and row (Eq. 3: a fused qkv holds Q, K, V as three row blocks), a
pandas groupby for counts, means and medians; the exact top-k as a stable numpy argsort of the candidates in
element order; Spearman as pandas' average ranks correlated by numpy; Jaccard from Python sets of element indices;
and pairs of files built so the answer is known in closed form (a monotone transform: 1 and 1; a reversed group:
-1; m of the top k pushed to the bottom: (k - m) / (k + m)).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import element_frame, invoke, ok, vit_shapes

from fisherscan.errors import FisherscanError
from fisherscan.models.groups import parameter_groups
from fisherscan.scores.compare import average_ranks, compare_scores, inspect_scores, metadata_rows, spearman
from fisherscan.scores.file import load_scores, save_scores
from fisherscan.scores.summary import top_cell_counts, top_counts, top_mask

D = 4
CANDIDATES = ("Q", "K", "V", "FFN")
KINDS = ("fim", "fim_shift", "delta", "drfim")


def make_scores(depth: int = 6, seed: int = 0, ties: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Distinct log-normal scores; ``ties``: a third exact zeros, the rest a few integers."""
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for kind in KINDS:
        scores[kind] = {}
        for name, shape in sorted(vit_shapes(depth).items()):  # the order load_scores gives back
            values = torch.exp(torch.randn(shape, generator=generator, dtype=torch.float64) * 1.5).float()
            if ties:
                values = torch.where(torch.rand(shape, generator=generator) < 1 / 3, 0.0, values.pow(0.25).round())
            scores[kind][name] = values
    return scores


def write(path: Path, scores, model: str = "toy-vit") -> Path:
    save_scores(path, scores, {"model": model, "images": 16, "seed": 3})
    return path



# ----------------------------------------------------------------------------------------------------------
# the block x group table


@pytest.mark.parametrize("ties", [False, True])
def test_inspect_table_equals_a_pandas_groupby_of_the_raw_tensors(tmp_path, ties):
    scores, _ = load_scores(write(tmp_path / "s.safetensors", make_scores(ties=ties)))
    top = 0.1
    table = inspect_scores(scores, ["fim", "drfim"], top)
    assert list(table.columns) == ["block", "group", "kind", "elements", "mean", "median", "top_count", "top_share",
                                   "top_fraction"]
    for kind in ("fim", "drfim"):
        frame = element_frame(scores[kind], top)
        k = int(frame["selected"].sum())
        expected = frame.groupby(["block", "group"]).agg(elements=("value", "size"), mean=("value", "mean"),
                                                         median=("value", "median"), top_count=("selected", "sum"))
        got = table[table["kind"] == kind].set_index(["block", "group"])
        assert sorted(got.index) == sorted(expected.index)
        assert list(got.index.get_level_values("block")) == [*[b for b in range(6) for _ in range(7)], -1, -1]
        for cell, row in expected.iterrows():
            assert got.loc[cell, "elements"] == row["elements"], cell
            assert got.loc[cell, "mean"] == pytest.approx(row["mean"], rel=1e-12), cell
            assert got.loc[cell, "median"] == pytest.approx(row["median"], rel=1e-12), cell
            assert got.loc[cell, "top_count"] == row["top_count"], cell
            assert got.loc[cell, "top_share"] == pytest.approx(row["top_count"] / k, abs=1e-15), cell
            assert got.loc[cell, "top_fraction"] == pytest.approx(row["top_count"] / row["elements"], abs=1e-15)
        assert got["top_share"].sum() == pytest.approx(1.0)


def test_cell_counts_sum_to_the_group_counts_and_the_mask_holds_exactly_k(tmp_path):
    scores = make_scores(ties=True)["drfim"]
    groups = parameter_groups((name, tensor.shape) for name, tensor in scores.items())
    cells, k = top_cell_counts(scores, groups, 0.07)
    counts, k_groups = top_counts(scores, groups, 0.07)
    assert k == k_groups and sum(cells.values()) == k
    for group in CANDIDATES:
        assert sum(n for (_, g), n in cells.items() if g == group) == counts[group]
    masks, _ = top_mask(scores, groups, 0.07)
    frame = element_frame(scores, 0.07)
    assert np.array_equal(torch.cat([m.reshape(-1) for m in masks.values()]).numpy(), frame["selected"].to_numpy())


def test_inspect_prints_metadata_and_the_table_and_its_csv_round_trips(tmp_path):
    path = write(tmp_path / "s.safetensors", make_scores(), model="toy-vit-6")
    csv = tmp_path / "cells.csv"
    result = ok(invoke("inspect", path, "--csv", csv, "--kind", "fim,delta,drfim", "--top", "10%"))
    assert "toy-vit-6" in result.stdout and "schema_version" in result.stdout
    assert "delta" in result.stdout and "top10%" in result.stdout
    assert "…" not in result.stdout, "numbers are never cut to fit the terminal"
    assert result.stdout.splitlines()[-1] == f"table: {csv}"
    saved = pd.read_csv(csv)
    expected = inspect_scores(load_scores(path)[0], ["fim", "delta", "drfim"], 0.1)
    pd.testing.assert_frame_equal(saved, expected, check_exact=True)
    assert len(saved) == 3 * (6 * 7 + 2) and not saved.duplicated(["block", "group", "kind"]).any()


def test_inspect_prints_the_reliability_record_of_replicates(tmp_path):
    """A file scored with --replicates 2: inspect prints each kind's numbers from its record (hand-written here)."""
    record = {"halves": "images of even and odd index", "top": 0.05,
              **{kind: {"k": 10, "jaccard_top": 0.111 * (i + 1), "spearman_halves": 0.2 + 0.1 * i,
                        "spearman_brown": 2 * (0.2 + 0.1 * i) / (1.2 + 0.1 * i)} for i, kind in enumerate(KINDS)}}
    path = tmp_path / "s.safetensors"
    save_scores(path, make_scores(), {"model": "toy-vit", "images": 16, "reliability": record})
    stdout = ok(invoke("inspect", path)).stdout
    assert "reliability: images of even and odd index, top 5%" in stdout
    for i, kind in enumerate(KINDS):
        row = next(line for line in stdout.splitlines() if line.strip("│ ").startswith(kind + " "))
        assert [float(x) for x in row.replace("│", " ").split()[1:]] == pytest.approx(
            [0.111 * (i + 1), 0.2 + 0.1 * i, 2 * (0.2 + 0.1 * i) / (1.2 + 0.1 * i)], abs=6e-4), row
    assert "reliability" not in ok(invoke("inspect", write(tmp_path / "plain.safetensors", make_scores()))).stdout


def test_metadata_summary_puts_the_model_first_and_shortens_long_values():
    rows = metadata_rows({"zeta": "z", "images": 8, "model": "m", "data": {"path": "x" * 200}}, width=40)
    assert [key for key, _ in rows] == ["model", "images", "data", "zeta"]
    assert dict(rows)["images"] == "8" and len(dict(rows)["data"]) == 40 and dict(rows)["data"].endswith("...")


# ----------------------------------------------------------------------------------------------------------
# compare


def test_average_ranks_and_spearman_match_pandas_ranks_with_ties():
    generator = np.random.default_rng(0)
    a = generator.integers(0, 6, 500).astype(np.float32)
    b = (a + generator.integers(0, 4, 500)).astype(np.float32)
    np.testing.assert_array_equal(average_ranks(torch.from_numpy(a)).numpy(),
                                  pd.Series(a).rank(method="average").to_numpy())
    ranks_a, ranks_b = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    assert spearman(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(np.corrcoef(ranks_a, ranks_b)[0, 1],
                                                                               rel=1e-12)
    assert math.isnan(spearman(torch.ones(5), torch.arange(5.0)))


def test_a_file_against_itself_agrees_completely(tmp_path):
    path = write(tmp_path / "a.safetensors", make_scores(ties=True))
    csv = tmp_path / "compare.csv"
    result = ok(invoke("inspect", path, "--compare", path, "--csv", csv))
    assert "A vs B" in result.stdout
    frame = pd.read_csv(csv)
    assert frame["kind"].unique().tolist() == ["fim", "drfim"]
    assert frame["group"].tolist()[:9] == ["Q", "K", "V", "FFN", "attn-proj", "norm", "embed", "other", "all"]
    assert (frame["spearman"] == 1.0).all()
    candidate = frame["group"].isin([*CANDIDATES, "all"])
    assert (frame.loc[candidate, "jaccard"] == 1.0).all() and frame.loc[~candidate, "jaccard"].isna().all()


def test_compare_gives_the_known_answers_on_constructed_pairs():
    a = make_scores()["drfim"]
    k_top = 0.1
    # 1. a monotone transform ranks every element the same way
    b = {name: 7 * values.sqrt() + 1 for name, values in a.items()}
    frame = compare_scores({"drfim": a}, {"drfim": b}, ["drfim"], k_top).set_index("group")
    assert (frame["spearman"] == 1.0).all() and frame["jaccard"].dropna().eq(1.0).all()

    # 2. reversing the order inside Q (and nowhere else) gives -1 there, +1 in every other group
    b = {name: values.clone() for name, values in a.items()}
    for name in b:
        if name.endswith(("qkv.weight", "qkv.bias")):
            b[name][:D] = 1 / b[name][:D]
    frame = compare_scores({"drfim": a}, {"drfim": b}, ["drfim"], k_top).set_index("group")
    assert frame.loc["Q", "spearman"] == pytest.approx(-1.0, abs=1e-12)
    assert (frame.drop(index=["Q", "all"])["spearman"] == 1.0).all()
    assert -1 < frame.loc["all", "spearman"] < 1

    # 3. push m of A's top k to the bottom: B's top k swaps exactly those m for A's next m
    elements = element_frame(a, k_top)
    k, m = int(elements["selected"].sum()), 9
    order = elements.index[elements["group"].isin(CANDIDATES)][
        np.argsort(-elements.loc[elements["group"].isin(CANDIDATES), "value"].to_numpy(), kind="stable")]
    dropped = set(order[k - m:k].tolist())  # the m smallest of A's top k
    flat = torch.cat([a[name].reshape(-1) for name in a]).clone()
    flat[list(dropped)] = 0.0
    b, start = {}, 0
    for name, values in a.items():
        b[name] = flat[start:start + values.numel()].reshape(values.shape)
        start += values.numel()
    frame = compare_scores({"drfim": a}, {"drfim": b}, ["drfim"], k_top).set_index("group")
    assert frame.loc["all", "jaccard"] == pytest.approx((k - m) / (k + m), abs=1e-15)
    set_a = set(order[:k].tolist())
    set_b = (set_a - dropped) | set(order[k:k + m].tolist())
    for group in CANDIDATES:  # per group: the same sets restricted to the group's elements
        members = set(elements.index[elements["group"] == group].tolist())
        union = (set_a | set_b) & members
        expected = len(set_a & set_b & members) / len(union) if union else math.nan
        assert frame.loc[group, "jaccard"] == pytest.approx(expected, abs=1e-15, nan_ok=True), group
    ranks_a = elements["value"].rank().to_numpy()
    ranks_b = pd.Series(flat.double().numpy()).rank().to_numpy()
    assert frame.loc["all", "spearman"] == pytest.approx(np.corrcoef(ranks_a, ranks_b)[0, 1], rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
# errors: one line, exit code 2


def test_comparing_different_architectures_is_a_one_line_error(tmp_path):
    a = write(tmp_path / "a.safetensors", make_scores(depth=6))
    b = write(tmp_path / "b.safetensors", make_scores(depth=4))
    result = invoke("inspect", a, "--compare", b)
    assert result.exit_code == 2
    assert "missing from" in result.stderr and "same architecture" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(FisherscanError, match="shape"):
        other = make_scores(depth=6)
        other["fim"]["cls_token"] = torch.ones(1, 1, 2 * D)
        compare_scores(make_scores(depth=6), other, ["fim"])


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such scores file"),
    (["{path}", "--compare", "{missing}"], "no such scores file"),
    (["{path}", "--kind", "fisher"], "--kind fisher: unknown score kind"),
    (["{path}", "--kind", "precision"], "--kind precision: not in"),
    (["{path}", "--top", "0%"], "--top 0%: must lie in (0, 1]"),
    (["{path}", "--csv", "{folder}/nowhere/t.csv"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    path = write(tmp_path / "s.safetensors", make_scores(depth=2))
    args = [a.format(missing=tmp_path / "missing.safetensors", path=path, folder=tmp_path) for a in args]
    result = invoke("inspect", *args)
    assert result.exit_code == 2, result.stdout
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
