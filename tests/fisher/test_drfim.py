"""fisherscan.fisher.drfim's balance of Eq. 7: lambda and the rank combination against scipy's ranks and the
formulas written out here (Eq. 5 and the sum form are checked by hand in test_diagonal.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from fisherscan.fisher.drfim import dr_fim_terms


def constructed():
    """Two candidate parameters (with ties) and one other; F(x') differs on some elements."""
    f = {"a": torch.tensor([[1.0, 2.0], [2.0, 8.0]]), "b": torch.tensor([0.5, 4.0, 4.0]), "other": torch.tensor([9.0])}
    f_shift = {"a": torch.tensor([[1.0, 1.0], [6.0, 8.0]]), "b": torch.tensor([2.0, 4.0, 1.0]),
               "other": torch.tensor([1.0])}
    return f, f_shift


def test_the_weight_scales_the_domain_term():
    f, f_shift = constructed()
    delta, plain, _ = dr_fim_terms(f, f_shift, 0.5, candidates=["a", "b"])
    _, heavy, _ = dr_fim_terms(f, f_shift, 0.5, candidates=["a", "b"], drfim_weight=4.0)
    scale = (1 + 2 + 2 + 8 + 0.5 + 4 + 4) / 7
    for name in f:
        assert torch.allclose(plain[name], f[name] / scale + 0.5 * delta[name])
        assert torch.allclose(heavy[name], f[name] / scale + 4.0 * 0.5 * delta[name])


def test_rank_combination_uses_average_ranks_over_the_candidates():
    f, f_shift = constructed()
    delta, drfim, _ = dr_fim_terms(f, f_shift, 0.5, candidates=["a", "b"], drfim_weight=2.0, combine="rank")
    values_f = np.concatenate([f["a"].numpy().ravel(), f["b"].numpy()])
    values_d = np.concatenate([delta["a"].numpy().ravel(), delta["b"].numpy()])
    expected = rankdata(values_f) / 7 + 2.0 * 0.5 * rankdata(values_d) / 7  # scipy: average ranks of ties
    got = np.concatenate([drfim["a"].numpy().ravel(), drfim["b"].numpy()])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert float(drfim["other"]) == 0.0  # not a candidate: the lowest rank


def test_an_unknown_combination_is_refused():
    f, f_shift = constructed()
    with pytest.raises(ValueError, match="combine"):
        dr_fim_terms(f, f_shift, 0.5, combine="product")
