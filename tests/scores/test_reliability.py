"""fisherscan.scores.reliability against scipy's Spearman correlation and the top-k sets built here by sorting
(stable: ties to the earlier element), on constructed score files."""

from __future__ import annotations

import math

import numpy as np
import torch
from conftest import vit_shapes
from scipy.stats import spearmanr

from fisherscan.scores.reliability import half_agreement, spearman_brown

KINDS = ["fim", "drfim"]


def halves(seed: int, noise: float):
    """Two score files of the same ViT whose values share a common part and differ by ``noise``."""
    g = torch.Generator().manual_seed(seed)
    shapes = vit_shapes(depth=2, D=8)
    common = {n: torch.rand(s, generator=g) for n, s in shapes.items()}
    return [{k: {n: (v + noise * torch.rand(v.shape, generator=g)).round(decimals=2) for n, v in common.items()}
             for k in KINDS} for _ in range(2)]


def oracle(a, b, kind, k):
    names = sorted(a[kind])
    candidate = []
    for name in names:
        rows = np.arange(a[kind][name].numel()) // max(1, a[kind][name].numel() // a[kind][name].shape[0])
        is_candidate = (".attn.qkv." in name) or (".mlp." in name)
        candidate.append(np.full(a[kind][name].numel(), is_candidate) & (rows >= 0))
    mask = np.concatenate(candidate)
    va = np.concatenate([a[kind][n].numpy().ravel() for n in names])[mask]
    vb = np.concatenate([b[kind][n].numpy().ravel() for n in names])[mask]
    top_a = set(np.argsort(-va, kind="stable")[:k])
    top_b = set(np.argsort(-vb, kind="stable")[:k])
    return len(top_a & top_b) / len(top_a | top_b), spearmanr(va, vb).statistic


def test_half_agreement_matches_sets_and_scipy():
    a, b = halves(0, noise=0.6)
    got = half_agreement(a, b, KINDS, top=0.05)
    total = sum(t.numel() for t in a["fim"].values())
    for kind in KINDS:
        jaccard, rho = oracle(a, b, kind, math.floor(0.05 * total))
        assert got[kind]["k"] == math.floor(0.05 * total)
        assert got[kind]["jaccard_top"] == jaccard
        assert math.isclose(got[kind]["spearman_halves"], rho, rel_tol=1e-9)
        assert math.isclose(got[kind]["spearman_brown"], 2 * rho / (1 + rho), rel_tol=1e-12)


def test_identical_halves_agree_completely_and_noise_lowers_it():
    a, _ = halves(1, noise=0.0)
    same = half_agreement(a, a, KINDS)
    assert same["fim"]["jaccard_top"] == 1.0 and math.isclose(same["fim"]["spearman_halves"], 1.0)
    noisy = half_agreement(*halves(1, noise=3.0), KINDS)
    assert noisy["fim"]["spearman_halves"] < 0.9 and noisy["fim"]["jaccard_top"] < 0.9


def test_spearman_brown():
    assert spearman_brown(0.5) == 2 * 0.5 / 1.5 and spearman_brown(1.0) == 1.0 and math.isnan(spearman_brown(-1.0))
