"""fisherscan.fisher.drfim: the balance of Eq. 7 (lambda and the rank combination against scipy's ranks and the
formulas written out here; Eq. 5 and the sum form are checked by hand in test_diagonal.py), and Eq. 15 as printed
(Delta F with the prior's pseudocount gamma tau^-2 / s, normalised like F, and gamma times the domain term;
numbers computed by hand here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from fisherscan.fisher.drfim import dr_fim_terms, eq15_pseudocount, variational_dr_fim_terms


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


def test_eq15_pseudocount_is_the_prior_in_the_units_of_f():
    assert eq15_pseudocount(gamma=2.0, tau=0.5, likelihood_scale=4.0) == pytest.approx(2.0 * 4.0 / 4.0)


def test_eq15_literal_by_hand():
    f_clean = {"a": torch.tensor([1.0, 4.0, 0.0])}
    f_shift = {"a": torch.tensor([3.0, 4.0, 0.5])}
    # gamma 2, tau 1, s 4: pseudocount 0.5; w 0.25 and gamma 2 multiply the domain term
    delta, drfim, scale = variational_dr_fim_terms(f_clean, f_shift, 0.25, gamma=2.0, tau=1.0, likelihood_scale=4.0,
                                                   normalize=False, eps=0.0)
    expected = torch.tensor([2 / (1 + 0.5), 0.0, 0.5 / (0 + 0.5)])
    assert scale == 1.0 and torch.allclose(delta["a"], expected)
    assert torch.allclose(drfim["a"], f_clean["a"] + 0.25 * 2.0 * expected)


def test_eq15_normalises_f_and_the_pseudocount_alike():
    """F and the pseudocount divided by the same candidate mean: Delta F_15 does not depend on the loss scale, and
    equals the literal one with the pseudocount in the same units."""
    f_clean = {"q": torch.tensor([2.0, 4.0]), "n": torch.tensor([10.0])}
    f_shift = {"q": torch.tensor([1.0, 4.0]), "n": torch.tensor([30.0])}
    delta, drfim, scale = variational_dr_fim_terms(f_clean, f_shift, 0.5, gamma=1.0, tau=1.0, likelihood_scale=2.0,
                                                   candidates=["q"], eps=1e-3)
    assert scale == 3.0
    q_c, q_s = torch.tensor([2 / 3, 4 / 3]), torch.tensor([1 / 3, 4 / 3])
    expected = (q_c - q_s).abs() / (torch.minimum(q_c, q_s) + 0.5 / 3 + 1e-3)
    assert torch.allclose(delta["q"], expected) and torch.allclose(drfim["q"], q_c + 0.5 * expected)
    scaled, _, _ = variational_dr_fim_terms({k: 100 * v for k, v in f_clean.items()},
                                            {k: 100 * v for k, v in f_shift.items()}, 0.5, gamma=1.0, tau=0.1,
                                            likelihood_scale=2.0, candidates=["q"], eps=1e-3)
    assert torch.allclose(scaled["q"], delta["q"])


def test_no_pseudocount_is_eq5_and_7_bit_for_bit():
    f_clean = {"a": torch.rand(50, generator=torch.Generator().manual_seed(0))}
    f_shift = {"a": torch.rand(50, generator=torch.Generator().manual_seed(1))}
    plain = dr_fim_terms(f_clean, f_shift, 0.3, candidates=["a"])
    zero = dr_fim_terms(f_clean, f_shift, 0.3, candidates=["a"], pseudocount=0.0, domain_factor=1.0)
    assert torch.equal(plain[0]["a"], zero[0]["a"]) and torch.equal(plain[1]["a"], zero[1]["a"])


def test_eq15_takes_the_balance_of_eq7():
    """Eq. 15's Delta F under the rank combination: scipy's ranks of F and Delta F_15, lambda and gamma w on the
    domain term."""
    f_clean = {"q": torch.tensor([2.0, 4.0, 1.0, 3.0]), "n": torch.tensor([10.0])}
    f_shift = {"q": torch.tensor([1.0, 4.0, 3.0, 0.5]), "n": torch.tensor([30.0])}
    delta, drfim, _ = variational_dr_fim_terms(f_clean, f_shift, 0.5, gamma=2.0, tau=1.0, likelihood_scale=2.0,
                                               candidates=["q"], eps=1e-3, combine="rank", drfim_weight=3.0)
    expected = rankdata(f_clean["q"].numpy()) / 4 + 3.0 * 2.0 * 0.5 * rankdata(delta["q"].numpy()) / 4
    np.testing.assert_allclose(drfim["q"].numpy(), expected, rtol=1e-6)
    assert float(drfim["n"]) == 0.0
