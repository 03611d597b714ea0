"""fisherscan.optim: MaskedAdamW against torch.optim.AdamW (a second implementation) where everything is selected,
and bit-identity of unselected elements under weight decay."""

from __future__ import annotations

import torch

from fisherscan.recipes.optim import MaskedAdamW, poly_lr


def test_all_selected_equals_torch_adamw():
    torch.manual_seed(0)
    ours = {"w": torch.nn.Parameter(torch.randn(5, 3)), "b": torch.nn.Parameter(torch.randn(3))}
    theirs = {n: torch.nn.Parameter(p.detach().clone()) for n, p in ours.items()}
    optimizer = MaskedAdamW(ours, {n: torch.ones_like(p, dtype=torch.bool) for n, p in ours.items()}, weight_decay=0.05)
    reference = torch.optim.AdamW(theirs.values(), lr=1e-2, weight_decay=0.05)
    for step in range(5):
        g = {n: torch.randn_like(p) for n, p in ours.items()}
        for n in ours:
            ours[n].grad, theirs[n].grad = g[n].clone(), g[n].clone()
        optimizer.step(1e-2)
        reference.step()
    for n in ours:
        assert torch.allclose(ours[n], theirs[n], atol=1e-6)


def test_unselected_elements_keep_their_bits_under_weight_decay_and_a_growing_mask():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(6, 4))
    start = p.detach().clone()
    mask = torch.zeros(6, 4, dtype=torch.bool)
    optimizer = MaskedAdamW({"p": p}, {"p": mask}, weight_decay=0.5)
    for step in range(6):
        mask[: step + 1, 0] = True  # the selection grows every step
        p.grad = torch.randn(6, 4)
        optimizer.step(0.1)
        assert torch.equal(p.detach()[~mask], start[~mask])
        assert not torch.equal(p.detach()[mask], start[mask])
        # moments of never-selected elements stay exactly zero: no stale moment when they get selected later
        assert torch.all(optimizer.exp_avg["p"][~mask] == 0) and torch.all(optimizer.exp_avg_sq["p"][~mask] == 0)


def test_poly_decay():
    assert poly_lr(1e-4, 0, 100) == 1e-4
    assert poly_lr(1e-4, 100, 100) == 0.0
    assert abs(poly_lr(1e-4, 50, 100) - 1e-4 * 0.5 ** 0.9) < 1e-15
