"""fisherscan.select against independent computations: numpy lexsort for the ranking with ties, the Eq. 16 schedule
written out by hand, and group membership from the fused-qkv row blocks."""

from __future__ import annotations

import math

import numpy as np
import torch

from fisherscan.scores.select import select_mask, selected_count, selected_fraction

D = 4  # embed dim of the constructed scores: qkv (12, 4), fc1 (8, 4), norm (4,), pos_embed (1, 3, 4)


def constructed_scores(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"blocks.0.attn.qkv.weight": (3 * D, D), "blocks.0.mlp.fc1.weight": (2 * D, D),
              "blocks.0.norm1.weight": (D,), "pos_embed": (1, 3, D), "blocks.1.attn.qkv.weight": (3 * D, D)}
    kinds = {}
    for kind in ("fim", "delta", "drfim"):
        kinds[kind] = {n: torch.randint(0, 5, s, generator=g).float() for n, s in shapes.items()}  # many ties
    kinds["drfim"]["blocks.0.norm1.weight"] += 100.0  # high, but never a candidate
    return kinds


def is_candidate(name: str) -> bool:
    return "qkv" in name or "mlp" in name


def test_score_ranking_with_ties_matches_numpy_lexsort():
    scores = constructed_scores()
    names = sorted(scores["drfim"])
    elements, values = [], []  # candidate elements in the fixed order: parameters by name, row-major
    for name in names:
        if is_candidate(name):
            for i, v in enumerate(scores["drfim"][name].reshape(-1).tolist()):
                elements.append((name, i))
                values.append(v)
    order = np.lexsort((np.arange(len(values)), -np.array(values)))  # by score desc, then element order
    for count in (0, 1, 7, 30, 100):
        masks = select_mask(scores, count, strategy="drfim")
        expected = {n: torch.zeros_like(scores["drfim"][n], dtype=torch.bool) for n in names}
        for j in order[:count]:
            name, i = elements[j]
            expected[name].view(-1)[i] = True
        for name in names:
            assert torch.equal(masks[name], expected[name]), (count, name)


def test_selections_only_grow_and_respect_groups():
    scores = constructed_scores(1)
    previous = None
    for count in range(0, 140, 9):
        for strategy in ("random", "fim", "delta", "drfim"):
            masks = select_mask(scores, count, strategy=strategy, seed=3)
            assert sum(int(m.sum()) for m in masks.values()) == min(count,
                                                                    2 * 3 * D * D + 2 * D * D)  # qkv of 2 blocks + fc1
            assert not masks["blocks.0.norm1.weight"].any() and not masks["pos_embed"].any()
        masks = select_mask(scores, count, strategy="drfim")
        if previous is not None:
            assert all(torch.all(masks[n] >= previous[n]) for n in masks)
        previous = masks


def test_random_q_k_v_pick_only_their_row_block():
    scores = constructed_scores(2)
    for strategy, rows in (("random-q", slice(0, D)), ("random-k", slice(D, 2 * D)), ("random-v", slice(2 * D, 3 * D))):
        masks = select_mask(scores, 10, strategy=strategy, seed=0)
        assert sum(int(m.sum()) for m in masks.values()) == 10
        for name in ("blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"):
            outside = masks[name].clone()
            outside[rows] = False
            assert not outside.any()
        assert not masks["blocks.0.mlp.fc1.weight"].any()
        capped = select_mask(scores, 10_000, strategy=strategy)
        assert sum(int(m.sum()) for m in capped.values()) == 2 * D * D


def test_full_and_freeze_and_seeded_random():
    scores = constructed_scores()
    full = select_mask(scores, 3, strategy="full")
    assert all(m.all() for m in full.values())
    freeze = select_mask(scores, 50, strategy="freeze")
    assert not any(m.any() for m in freeze.values())
    a, b, c = (select_mask(scores, 20, strategy="random", seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)


def test_schedule_eq16_as_decided():
    steps, dmin, dmax = 90, 0.01, 0.05
    T = steps / 3
    assert selected_fraction(0, steps, dmin, dmax) == dmin
    assert selected_fraction(steps, steps, dmin, dmax) == dmax
    for t in (1, 10, 45, 89):
        by_hand = dmin + (dmax - dmin) * (1 - math.exp(-t / T)) / (1 - math.exp(-steps / T))
        assert math.isclose(selected_fraction(t, steps, dmin, dmax), by_hand)
        assert selected_count(t, steps, 1000, dmin, dmax) == math.floor(by_hand * 1000)
    fractions = [selected_fraction(t, steps, dmin, dmax, schedule_t=10) for t in range(steps + 1)]
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
