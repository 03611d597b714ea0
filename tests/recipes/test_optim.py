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


def late_setup(seed: int = 2):
    """A (4, 5) parameter; elements join at schedule steps 0 (2 of them), 2 (3), 3 (1) and 5 (2); the joiners
    after step 0 as ``entries`` (positions in the order they join, their steps)."""
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(4, 5))
    joins = {0: [3, 11], 2: [0, 7, 19], 3: [5], 5: [14, 2]}
    positions = [i for s in sorted(joins) if s > 0 for i in joins[s]]
    steps = [s for s in sorted(joins) if s > 0 for _ in joins[s]]
    entries = {"p": (torch.tensor(positions, dtype=torch.int32), torch.tensor(steps, dtype=torch.int32))}
    return p, joins, entries


def test_a_late_element_moves_as_torch_adamw_started_at_the_step_it_joined():
    """Oracle: per join step k, torch.optim.AdamW on a copy of the elements that joined at k, started at step k with
    the same gradients; the elements not yet selected keep their bits."""
    p, joins, entries = late_setup()
    start = p.detach().clone()
    mask = torch.zeros(4, 5, dtype=torch.bool)
    optimizer = MaskedAdamW({"p": p}, {"p": mask}, entries=entries, weight_decay=0.05)
    oracles = {}
    for step in range(8):
        for s, positions in joins.items():
            if s == step:
                mask.view(-1)[positions] = True
                copy = torch.nn.Parameter(p.detach().view(-1)[positions].clone())
                oracles[s] = (positions, copy, torch.optim.AdamW([copy], lr=1e-2, weight_decay=0.05))
        grad = torch.randn(4, 5)
        p.grad = grad.clone()
        optimizer.step(1e-2)
        for positions, copy, reference in oracles.values():
            copy.grad = grad.view(-1)[positions].clone()
            reference.step()
            assert torch.allclose(p.detach().view(-1)[positions], copy.detach(), atol=1e-6, rtol=0)
        assert torch.equal(p.detach()[~mask], start[~mask])


def test_first_update_of_a_late_element_is_a_normal_first_adam_step_and_global_is_not():
    """Closed form: with a constant gradient g a first Adam step moves an element by lr * sign(g) (no weight decay);
    the global count (no entries) moves an element joining at step 1000 by 2.515 lr (docstring's formula)."""
    sizes = {}
    for entries in (None, {"p": (torch.tensor([1], dtype=torch.int32), torch.tensor([1000], dtype=torch.int32))}):
        p = torch.nn.Parameter(torch.zeros(2))
        mask = torch.tensor([True, False])
        optimizer = MaskedAdamW({"p": p}, {"p": mask}, entries=entries, weight_decay=0.0)
        for step in range(1001):
            if step == 1000:
                mask[1] = True
            p.grad = torch.full((2,), 0.5)
            before = p.detach().clone()
            optimizer.step(1e-3)
        sizes[entries is None] = float((before - p.detach())[1]) / 1e-3
    assert abs(sizes[False] - 1.0) < 1e-4
    assert abs(sizes[True] - (0.1 / (1 - 0.9 ** 1001)) / (0.001 / (1 - 0.999 ** 1001)) ** 0.5) < 1e-3
    assert sizes[True] > 2.5


def test_skipped_steps_do_not_count_and_moments_stay():
    """Oracle: a run that skips schedule steps 1 and 2 equals one without them (the elements joining at 2 join at
    the next applied update), bit for bit; the state round-trips through state_dict."""
    p, joins, entries = late_setup(seed=4)
    q = torch.nn.Parameter(p.detach().clone())
    grads = [torch.randn(4, 5) for _ in range(8)]
    mask_p, mask_q = torch.zeros(4, 5, dtype=torch.bool), torch.zeros(4, 5, dtype=torch.bool)
    skipping = MaskedAdamW({"p": p}, {"p": mask_p}, entries=entries)
    # the same joins for a run without steps 1 and 2: step 2's joiners join at applied step 1, later ones 2 earlier
    shifted = {"p": (entries["p"][0], torch.tensor([1, 1, 1, 1, 3, 3], dtype=torch.int32))}
    plain = MaskedAdamW({"p": q}, {"p": mask_q}, entries=shifted)
    applied = 0
    for step in range(8):
        for s, positions in joins.items():
            if s == step:
                mask_p.view(-1)[positions] = True
                mask_q.view(-1)[positions] = True
        p.grad = grads[step].clone()
        if step in (1, 2):
            skipping.skip()
            continue
        skipping.step(1e-2)
        q.grad = grads[step].clone()
        plain.step(1e-2)
        applied += 1
        assert torch.equal(p.detach(), q.detach()), step
    assert skipping.missed == [1, 2] and skipping.step_count == applied == 6
    restored = MaskedAdamW({"p": torch.nn.Parameter(p.detach().clone())}, {"p": mask_p}, entries=entries)
    restored.load_state_dict(skipping.state_dict())
    assert restored.missed == [1, 2] and restored.schedule_step == skipping.schedule_step == 8
