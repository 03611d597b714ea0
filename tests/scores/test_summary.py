"""Tests for fisherscan.report.group_summary against a per-element pandas computation built here.

The oracle assigns every element to its group by the rules of FISHERTUNE.md (Eq. 3): a fused qkv weight
holds Q, K, V as its three row blocks; mlp weights are FFN; the rest by name. Counts and means come from a
pandas groupby, top shares from a numpy sort.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fisherscan.scores.summary import group_summary, summary_table

D = 8  # embedding width of the toy block
CANDIDATES = ("Q", "K", "V", "FFN")


def shapes() -> dict[str, tuple[int, ...]]:
    return {
        "pos_embed": (1, 5, D),
        "blocks.0.norm1.weight": (D,),
        "blocks.0.attn.qkv.weight": (3 * D, D),
        "blocks.0.attn.qkv.bias": (3 * D,),
        "blocks.0.attn.proj.weight": (D, D),
        "blocks.0.mlp.fc1.weight": (4 * D, D),
        "blocks.0.mlp.fc2.weight": (D, 4 * D),
        "blocks.1.mlp.fc2.bias": (D,),
        "blocks.0.ls1.gamma": (D,),
        "logit_scale": (),
    }


def group_of(name: str, row: int) -> str:
    """The oracle's group of element row ``row`` of parameter ``name`` (hand-written for the toy names)."""
    if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
        return "QKV"[row // D]
    if ".mlp." in name:
        return "FFN"
    if name.endswith("attn.proj.weight"):
        return "attn-proj"
    if "norm" in name:
        return "norm"
    if name == "pos_embed":
        return "embed"
    return "other"


def make_scores(fim_values=None, drfim_values=None, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """fim and drfim of the toy parameters; distinct random values unless given (flat, in parameter order)."""
    sizes = {name: math.prod(shape) for name, shape in shapes().items()}
    total = sum(sizes.values())
    rng = np.random.default_rng(seed)
    fim_values = rng.permutation(total).astype(np.float32) / total + 0.01 if fim_values is None else fim_values
    drfim_values = rng.random(total).astype(np.float32) * 10 if drfim_values is None else drfim_values
    scores = {"fim": {}, "drfim": {}}
    start = 0
    for name, shape in shapes().items():
        n = sizes[name]
        scores["fim"][name] = torch.tensor(fim_values[start:start + n], dtype=torch.float32).reshape(shape)
        scores["drfim"][name] = torch.tensor(drfim_values[start:start + n], dtype=torch.float32).reshape(shape)
        start += n
    return scores


def element_frame(scores) -> pd.DataFrame:
    rows = []
    for name, fim in scores["fim"].items():
        shape = tuple(fim.shape)
        flat_fim = fim.reshape(-1).double().numpy()
        flat_drfim = scores["drfim"][name].reshape(-1).double().numpy()
        for flat in range(fim.numel()):
            row = np.unravel_index(flat, shape)[0] if shape else 0
            rows.append({"param": name, "group": group_of(name, int(row)), "fim": flat_fim[flat],
                         "drfim": flat_drfim[flat]})
    return pd.DataFrame(rows)


def oracle_shares(frame: pd.DataFrame, kind: str, top: float, expect_ties: bool = False) -> dict[str, float]:
    """Share of each group in the k largest candidate elements; ties go to the earlier element (frame order)."""
    candidates = frame[frame["group"].isin(CANDIDATES)]
    k = max(1, math.ceil(top * len(candidates)))
    values = candidates[kind].to_numpy()
    threshold = np.sort(values)[-k]
    assert ((values >= threshold).sum() > k) == expect_ties
    chosen = candidates.iloc[np.argsort(-values, kind="stable")[:k]]
    return {g: float((chosen["group"] == g).sum()) / k for g in frame["group"].unique()}


@pytest.mark.parametrize("top, kind", [(0.05, "drfim"), (0.2, "drfim"), (0.05, "fim")])
def test_group_summary_matches_a_per_element_groupby(top, kind):
    scores = make_scores()
    frame = element_frame(scores)
    expected = frame.groupby("group").agg(elements=("fim", "size"), mean_fim=("fim", "mean"),
                                         mean_rank=(kind, "mean"))
    shares = oracle_shares(frame, kind, top)

    summary = group_summary(scores, top=top, rank_kind=kind).set_index("group")
    share_column = f"top{top:.0%}_share"
    assert list(summary.index) == ["Q", "K", "V", "FFN", "attn-proj", "norm", "embed", "other"]
    assert set(summary.index) == set(expected.index)
    for group, row in expected.iterrows():
        got = summary.loc[group]
        assert got["elements"] == row["elements"], group
        assert got["mean_fim"] == pytest.approx(row["mean_fim"], rel=1e-9), group
        assert got[f"mean_{kind}"] == pytest.approx(row["mean_rank"], rel=1e-9), group
        assert got[share_column] == pytest.approx(shares[group], abs=1e-12), group
    # counts per group are the row blocks of qkv and whole tensors elsewhere
    assert summary.loc["Q", "elements"] == summary.loc["K", "elements"] == summary.loc["V", "elements"] == D * D + D
    assert summary.loc["FFN", "elements"] == 2 * 4 * D * D + D
    assert summary[share_column].sum() == pytest.approx(1.0)


def test_top_share_goes_to_the_group_that_holds_the_largest_elements():
    scores = make_scores()
    for name, tensor in scores["drfim"].items():  # make every K element of the fused qkv the largest score
        if name.endswith("attn.qkv.weight"):
            tensor[D:2 * D] += 1000.0
    summary = group_summary(scores, top=0.05).set_index("group")
    # 5% of the candidates is fewer than the K elements of qkv.weight, so K takes the whole top
    assert summary.loc["K", "top5%_share"] == pytest.approx(1.0)
    assert summary.drop(index="K")["top5%_share"].sum() == 0


def test_top_shares_with_ties_at_the_threshold_count_exactly_k_elements_in_element_order():
    """Many equal scores (e.g. exactly zero Fisher) must not let every tied element count as 'top'."""
    total = sum(math.prod(s) for s in shapes().values())
    tied = np.zeros(total, dtype=np.float32)  # every drfim is 0 ...
    scores = make_scores(drfim_values=tied)
    scores["drfim"]["blocks.0.mlp.fc2.weight"][3, :5] = 2.0  # ... but for 5 FFN elements and 3 V elements
    scores["drfim"]["blocks.0.attn.qkv.weight"][2 * D + 1, :3] = 1.0
    frame = element_frame(scores)
    shares = oracle_shares(frame, "drfim", 0.05, expect_ties=True)
    summary = group_summary(scores, top=0.05).set_index("group")["top5%_share"]
    assert summary.sum() == pytest.approx(1.0)
    for group, share in shares.items():
        assert summary[group] == pytest.approx(share, abs=1e-12), group
    k = math.ceil(0.05 * frame["group"].isin(CANDIDATES).sum())
    # parameter order puts qkv.weight first: its Q rows fill the tied remainder after the 8 larger elements
    assert summary["FFN"] == pytest.approx(5 / k) and summary["Q"] == pytest.approx((k - 8) / k)
    assert summary["V"] == pytest.approx(3 / k) and summary["K"] == 0


def test_summary_table_has_one_row_per_group():
    frame = group_summary(make_scores())
    table = summary_table(frame, "toy [model]")
    assert table.row_count == len(frame)
    assert [column.header for column in table.columns] == list(frame.columns)
