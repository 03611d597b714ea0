"""fisherscan.perturb (Eq. 6): the output's statistics against alpha and beta computed independently here."""

from __future__ import annotations

import torch
from conftest import tiny_segmenter

from fisherscan.fisher.perturb import (
    TokenShift,
    block_input,
    channel_statistics,
    perturb_statistics,
    shift_statistics,
    statistic_spread,
    statistics_change,
)


def tokens(b=4, n=50, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(b, 1, c, generator=g) * 3 + 0.5
    return torch.randn(b, n, c, generator=g, dtype=torch.float64) * scale + torch.randn(b, 1, c, generator=g)


def test_output_statistics_are_alpha_and_abs_beta():
    x = tokens()
    out, eps_mu, eps_sigma = perturb_statistics(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and eps_mu.shape == eps_sigma.shape == (4, 6)
    mu, var = x.mean(1), x.var(1)  # per image and channel; unbiased over tokens as DSU
    sigma = torch.sqrt(var + 1e-6)
    alpha = mu + eps_mu * torch.sqrt(mu.var(0) + 1e-6)
    beta = sigma + eps_sigma * torch.sqrt(sigma.var(0) + 1e-6)
    assert torch.allclose(out.mean(1), alpha, rtol=1e-6, atol=1e-6)
    # std(x') = |beta| * std(x) / sigma, equal to |beta| up to the eps inside the square root
    assert torch.allclose(out.std(1), beta.abs() * torch.sqrt(var) / sigma, rtol=1e-6)
    assert torch.allclose(out.std(1), beta.abs(), rtol=1e-5)
    assert not torch.allclose(out, x)


def test_draws_follow_the_generator():
    x = tokens()
    a = perturb_statistics(x, torch.Generator().manual_seed(5))
    b = perturb_statistics(x, torch.Generator().manual_seed(5))
    c = perturb_statistics(x, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_batch_of_one_gives_no_nan_and_no_shift():
    x = tokens(b=1)
    out, _, _ = perturb_statistics(x, torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    assert torch.allclose(out, x, atol=1e-9)


def test_shift_magnitude_is_the_relative_change_of_the_statistics():
    x = tokens()
    mu, sigma = channel_statistics(x)
    spread = statistic_spread(mu, sigma)
    eps_mu, eps_sigma = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    _, magnitude = shift_statistics(x, eps_mu, eps_sigma, *(s.double() for s in spread))
    expected = (eps_mu.abs() * spread[0] + eps_sigma.abs() * spread[1]) / torch.sqrt(x.var(1) + 1e-6)
    assert torch.allclose(magnitude, expected)


def test_token_shift_leaves_prefix_tokens_and_other_blocks_alone():
    model = tiny_segmenter(reg_tokens=2)
    x = torch.randn(3, 3, 16, 16)
    site, prefix = 1, model.backbone.num_prefix_tokens
    clean_in = block_input(model, x, site)
    seen = []
    handle = model.backbone.blocks[site].register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    shift = TokenShift(model, site)
    shift.spread = statistic_spread(*channel_statistics(clean_in[:, prefix:]))
    shift.eps = (torch.randn(3, 16), torch.randn(3, 16))
    with torch.no_grad(), shift:
        shifted_logits = model(x)
    clean_logits = model(x)
    handle.remove()
    shifted_in = seen[0]
    assert prefix == 3
    assert torch.equal(shifted_in[:, :prefix], clean_in[:, :prefix])
    expected, _ = shift_statistics(clean_in[:, prefix:], *shift.eps, *shift.spread)
    assert torch.allclose(shifted_in[:, prefix:], expected, atol=1e-6)
    assert not torch.allclose(shifted_logits, clean_logits)
    assert len(model.backbone.blocks[site]._forward_pre_hooks) == 0, "leaving the context removes the hook"


def test_block_input_is_what_the_block_receives():
    model = tiny_segmenter()
    x = torch.randn(2, 3, 16, 12)
    seen = []
    handle = model.backbone.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert torch.equal(block_input(model, x, 0), seen[0])


def hand_eq6(tokens, eps_mu, eps_sigma, keep, prefix):
    """Eq. 6 written out on the patch tokens of a (B, P + N, C) batch: the batch spread of the statistics, the
    shifted statistics, the images where ``keep`` is False left as they were; and each image's relative change."""
    patch = tokens[:, prefix:]
    mu, sigma = patch.mean(1), torch.sqrt(patch.var(1) + 1e-6)
    spread_mu, spread_sigma = torch.sqrt(mu.var(0) + 1e-6), torch.sqrt(sigma.var(0) + 1e-6)
    alpha, beta = mu + eps_mu * spread_mu, sigma + eps_sigma * spread_sigma
    shifted = beta[:, None] * (patch - mu[:, None]) / sigma[:, None] + alpha[:, None]
    shifted = torch.where(keep[:, None, None], shifted, patch)
    change = (((alpha - mu).abs() + (beta - sigma).abs()) / sigma).mean(1) * keep
    return torch.cat([tokens[:, :prefix], shifted], 1), change


def test_several_sites_equal_a_hand_built_chain_of_eq6(segmenter):
    """Oracle: the blocks run one by one here, Eq. 6 applied by hand at the inputs of blocks 0 and 1, each with the
    batch spread of what reaches it (the first site's shift included), images 1 and 2 skipping one site each."""
    x = torch.randn(4, 3, 16, 20, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    eps_mu, eps_sigma = torch.randn(4, 2, 16, generator=g), torch.randn(4, 2, 16, generator=g)
    apply = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    shift = TokenShift(segmenter, [0, 1])
    shift.eps = (eps_mu, eps_sigma, apply)
    magnitudes = shift.prepare(segmenter, x, lambda k, t: statistic_spread(*channel_statistics(t)))
    with torch.no_grad(), shift:
        got = segmenter(x)

    backbone = segmenter.backbone
    with torch.no_grad():
        tokens = backbone._pos_embed(backbone.patch_embed(x))
        expected_change = torch.zeros(4)
        for k, block in enumerate(backbone.blocks):
            tokens, change = hand_eq6(tokens, eps_mu[:, k], eps_sigma[:, k], apply[:, k].bool(),
                                      backbone.num_prefix_tokens)
            expected_change += change
            tokens = block(tokens)
        tokens = backbone.norm(tokens)[:, backbone.num_prefix_tokens:]
        expected = segmenter.decoder(tokens, (4, 5))
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.allclose(magnitudes, expected_change, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, segmenter(x))


def test_statistics_change_is_the_relative_change_of_the_token_statistics():
    a = tokens()
    b = 1.5 * a + 0.3
    mu, sigma = a.mean(1), torch.sqrt(a.var(1) + 1e-6)
    mu_b, sigma_b = b.mean(1), torch.sqrt(b.var(1) + 1e-6)
    expected = (((mu_b - mu).abs() + (sigma_b - sigma).abs()) / sigma).mean(1)
    assert torch.allclose(statistics_change(a, b).double(), expected, rtol=1e-5)
    assert torch.equal(statistics_change(a, a), torch.zeros(4))
