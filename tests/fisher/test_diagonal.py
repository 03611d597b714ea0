"""fisherscan.fisher against independent oracles: a brute-force per-image autograd loop (Eq. 9), the closed-form
expected Fisher of a small model (Eq. 4), and hand-computed Eq. 5 / Eq. 7."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import IGNORE, OracleShift, assert_close_dicts, batch, brute_force_fisher, tiny_segmenter

from fisherscan.fisher.diagonal import FisherAccumulator, diagonal_fisher, squared_gradient_sum
from fisherscan.fisher.drfim import delta_fisher, dr_fim, fisher_scale
from fisherscan.fisher.perturb import TokenShift


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
@pytest.mark.parametrize("labels", ["given", "sampled"])
def test_diagonal_fisher_equals_per_image_autograd_loop(segmenter, labels, engine):
    batches = [batch(0), batch(1, b=2)]
    fisher = diagonal_fisher(segmenter, batches, labels=labels, generator=torch.Generator().manual_seed(7),
                             engine=engine)
    uniforms = None
    if labels == "sampled":  # the same draws: torch.rand(y.shape) per batch from the same generator
        g = torch.Generator().manual_seed(7)
        uniforms = [torch.rand(y.shape, generator=g) for _, y in batches]
    expected = brute_force_fisher(segmenter, batches, uniforms)
    assert len(fisher) == len(list(segmenter.parameters()))
    assert all(v.dtype == torch.float32 for v in fisher.values())
    assert all(float(v.abs().sum()) > 0 for v in fisher.values()), "every parameter should get a gradient"
    assert_close_dicts(fisher, expected)


def test_label_draws_average_eq_9_over_draws_of_the_labels(segmenter):
    """K label draws: the per-image loop over the same K uniforms per batch (drawn in batch, then draw order)."""
    batches = [batch(0), batch(1, b=2)]
    fisher = diagonal_fisher(segmenter, batches, label_draws=3, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    repeated, uniforms = [], []
    for x, y in batches:
        for _ in range(3):
            repeated.append((x, y))
            uniforms.append(torch.rand(y.shape, generator=g))
    assert_close_dicts(fisher, brute_force_fisher(segmenter, repeated, uniforms))
    with pytest.raises(ValueError, match="label_draws"):
        diagonal_fisher(segmenter, batches, labels="given", label_draws=2)


def test_register_tokens_and_frozen_parameters_are_handled():
    model = tiny_segmenter(reg_tokens=2)
    for p in model.decoder.parameters():
        p.requires_grad_(False)
    batches = [batch(3)]
    fisher = diagonal_fisher(model, batches, labels="given")
    assert not any(name.startswith("decoder.") for name in fisher)
    assert "backbone.reg_token" in fisher
    assert_close_dicts(fisher, brute_force_fisher(model, batches))


def test_square_of_batch_gradient_is_not_the_fisher(segmenter):
    """Eq. 9 squares per-image gradients; the square of the batch gradient differs (guards against that bug)."""
    x, y = batch(0)
    per_image = squared_gradient_sum(segmenter, x, y)
    segmenter.zero_grad()
    logits = F.interpolate(segmenter(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
    F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum").backward()
    name = "backbone.blocks.1.attn.qkv.weight"
    assert not torch.allclose(per_image[name], dict(segmenter.named_parameters())[name].grad ** 2, rtol=0.1)


def test_chunking_does_not_change_the_result(segmenter):
    x, y = batch(2, b=5)
    u = torch.rand(y.shape, generator=torch.Generator().manual_seed(0))
    one = squared_gradient_sum(segmenter, x, y, u, chunk_size=1)
    all_at_once = squared_gradient_sum(segmenter, x, y, u, chunk_size=8)
    assert_close_dicts(one, all_at_once, rtol=1e-5)


def test_accumulator_state_restores_a_run_exactly(segmenter):
    batches = [batch(s, b=2) for s in range(3)]
    shapes = {n: p.shape for n, p in segmenter.named_parameters()}
    straight = FisherAccumulator(shapes)
    for x, y in batches:
        straight.add(squared_gradient_sum(segmenter, x, y), x.shape[0])
    first = FisherAccumulator(shapes)
    first.add(squared_gradient_sum(segmenter, *batches[0]), 2)
    saved = first.state_dict()
    resumed = FisherAccumulator(shapes)
    resumed.load_state_dict(saved)
    for x, y in batches[1:]:
        resumed.add(squared_gradient_sum(segmenter, x, y), x.shape[0])
    assert resumed.images == straight.images == 6
    for name in shapes:
        assert torch.equal(resumed.fisher()[name], straight.fisher()[name])


def test_shifted_fisher_equals_per_image_loop_with_eq6(segmenter):
    x, y = batch(4, b=3)
    site = 1
    captured = []
    handle = segmenter.backbone.blocks[site].register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        segmenter(x)
    handle.remove()
    patch = captured[0][:, segmenter.backbone.num_prefix_tokens:]
    mu, sigma = patch.mean(1), torch.sqrt(patch.var(1) + 1e-6)
    spread = (torch.sqrt(mu.var(0) + 1e-6), torch.sqrt(sigma.var(0) + 1e-6))
    g = torch.Generator().manual_seed(3)
    eps_mu, eps_sigma = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)

    shift = TokenShift(segmenter, site)
    shift.spread = spread
    got = squared_gradient_sum(segmenter, x, y, shift=shift, shift_eps=(eps_mu, eps_sigma))
    got = {n: v / 3 for n, v in got.items()}

    oracle = OracleShift(eps_mu, eps_sigma, *spread, segmenter.backbone.num_prefix_tokens)
    handle = segmenter.backbone.blocks[site].register_forward_pre_hook(oracle)
    try:
        expected = brute_force_fisher(segmenter, [(x, y)], hook=oracle)
    finally:
        handle.remove()
    clean = brute_force_fisher(segmenter, [(x, y)])
    assert_close_dicts(got, expected)
    name = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.allclose(expected[name], clean[name], rtol=1e-2), "the shift must change the Fisher"


def test_sampled_fisher_converges_to_the_exact_expectation():
    """Closed form for a per-pixel softmax model: E_y[(sum_p g_p)^2] = sum_p sum_c p_c (grad log p_c)^2,
    because E[g_p] = 0 makes the cross-pixel terms vanish. The Monte Carlo estimate must agree within 5
    standard errors, and an estimate with the cross terms would not."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, kernel_size=1)
    x = torch.randn(1, 3, 2, 3)
    y = torch.zeros(1, 2, 3, dtype=torch.long)

    exact = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    log_p = torch.log_softmax(model(x), dim=1)[0]
    probs = log_p.exp().detach()
    for c in range(3):
        for i in range(2):
            for j in range(3):
                grads = torch.autograd.grad(log_p[c, i, j], list(model.parameters()), retain_graph=True)
                for (n, _), g in zip(model.named_parameters(), grads):
                    exact[n] += probs[c, i, j] * g ** 2

    runs, draws = 12, 400
    g = torch.Generator().manual_seed(1)
    estimates = [diagonal_fisher(model, [(x.expand(draws, -1, -1, -1), y.expand(draws, -1, -1))],
                                 labels="sampled", generator=g) for _ in range(runs)]
    for name, value in exact.items():
        stacked = torch.stack([e[name] for e in estimates])
        mean, stderr = stacked.mean(0), stacked.std(0) / math.sqrt(runs)
        assert torch.all((mean - value).abs() <= 5 * stderr + 1e-6), name
        assert (stderr / value).max() < 0.05, "the test must be sharp enough to see a wrong estimator"


def test_delta_fisher_eq5_by_hand():
    f_clean = {"a": torch.tensor([1.0, 2.0, 0.0, 4.0])}
    f_shift = {"a": torch.tensor([3.0, 2.0, 0.5, 1.0])}
    out = delta_fisher(f_clean, f_shift, eps=0.5)["a"]
    assert torch.allclose(out, torch.tensor([2 / 1.5, 0.0, 0.5 / 0.5, 3 / 1.5]))


def test_dr_fim_eq7_literal_and_normalised_by_hand():
    f_clean = {"q": torch.tensor([2.0, 4.0]), "n": torch.tensor([10.0])}
    f_shift = {"q": torch.tensor([1.0, 4.0]), "n": torch.tensor([30.0])}
    literal = dr_fim(f_clean, f_shift, shift_weight=0.5, normalize=False)
    assert torch.allclose(literal["q"], torch.tensor([2 + 0.5 * 1 / (1 + 1e-8), 4.0]))
    assert torch.allclose(literal["n"], torch.tensor([10 + 0.5 * 20 / (10 + 1e-8)]))

    # normalised by the mean of F(x) over the candidate "q" (= 3), relative eps 1e-3
    assert fisher_scale(f_clean, ["q"]) == 3.0
    normal = dr_fim(f_clean, f_shift, shift_weight=0.5, normalize=True, candidates=["q"])
    q_c, q_s = torch.tensor([2 / 3, 4 / 3]), torch.tensor([1 / 3, 4 / 3])
    expected_q = q_c + 0.5 * (q_c - q_s).abs() / (torch.minimum(q_c, q_s) + 1e-3)
    assert torch.allclose(normal["q"], expected_q)
    n_c, n_s = 10 / 3, 30 / 3
    assert torch.allclose(normal["n"], torch.tensor([n_c + 0.5 * (n_s - n_c) / (n_c + 1e-3)]))
    # the normalised scores do not depend on the loss scale; the literal ones do
    scaled = dr_fim({k: 100 * v for k, v in f_clean.items()}, {k: 100 * v for k, v in f_shift.items()}, 0.5,
                    candidates=["q"])
    assert torch.allclose(scaled["q"], normal["q"])
