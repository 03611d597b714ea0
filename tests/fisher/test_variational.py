"""fisherscan.variational (Eq. 10-14) against known curvature: a quadratic loss with a given Hessian, the closed-form
Fisher of a linear softmax segmentation model, and torch.distributions' KL (a second library) for Eq. 13."""

from __future__ import annotations

import math

import torch

from fisherscan.fisher.variational import fit_precision, kl_to_prior, precision_to_fisher, variational_fisher


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks_a, ranks_b = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ranks_a, ranks_b]))[0, 1])


def linear_softmax_fisher(model: torch.nn.Conv2d, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Closed form for logits = W x + b per pixel: per pixel, sum_c p_c (grad log p_c)^2 with
    grad_W log p_c = (e_c - p) x^T; mean over images of the per-image sum over pixels."""
    p = torch.softmax(model(x), 1).detach()
    classes = p.shape[1]
    weight = torch.zeros(model.weight.shape[:2])
    bias = torch.zeros(classes)
    for c in range(classes):
        d = torch.nn.functional.one_hot(torch.tensor(c), classes).view(1, classes, 1, 1) - p
        weight += torch.einsum("bhw,bkhw,bihw->ki", p[:, c], d ** 2, x ** 2)
        bias += torch.einsum("bhw,bkhw->k", p[:, c], d ** 2)
    return {"weight": weight.view_as(model.weight) / x.shape[0], "bias": bias / x.shape[0]}


def test_closed_form_oracle_matches_per_pixel_autograd():
    torch.manual_seed(0)
    model, x = torch.nn.Conv2d(3, 4, 1), torch.randn(2, 3, 2, 2)
    brute = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    log_p = torch.log_softmax(model(x), 1)
    for index in torch.cartesian_prod(*(torch.arange(s) for s in log_p.shape)):
        value = log_p[tuple(index)]
        grads = torch.autograd.grad(value, list(model.parameters()), retain_graph=True)
        for (name, _), g in zip(model.named_parameters(), grads):
            brute[name] += value.exp().detach() * g ** 2 / 2
    closed = linear_softmax_fisher(model, x)
    for name in brute:
        assert torch.allclose(closed[name], brute[name], atol=1e-6)


def test_quadratic_loss_recovers_its_hessian_on_every_coordinate():
    """loss = 1/2 (t - c)^T H (t - c): the stationary point of Eq. 11 is gamma (Lambda - tau^-2) = H_nn (Eq. 14)."""
    torch.manual_seed(0)
    n = 40
    h = torch.logspace(0.5, 2.5, n)
    coupling = torch.randn(n, n) * 0.2
    hessian = torch.diag(h) + (coupling + coupling.T) / 2
    assert torch.linalg.eigvalsh(hessian).min() > 0
    centre, theta = torch.randn(n), torch.randn(n)

    def losses(plus, minus, step):
        def loss(t):
            return 0.5 * ((t - centre) * (hessian @ (t - centre))).sum()
        return loss(plus["w"]), loss(minus["w"])

    gamma, tau = 2.0, 1.0
    result = fit_precision(losses, {"w": theta}, gamma=gamma, tau=tau, steps=3000,
                           generator=torch.Generator().manual_seed(0))
    estimate = gamma * (result.precision["w"] - tau ** -2)
    assert torch.all((estimate - h).abs() <= 0.1 * h), (estimate / h).min()
    assert torch.allclose(result.fisher["w"], estimate.clamp_min(0))
    assert result.converged


def test_linear_softmax_segmentation_model_with_defaults():
    """Hessian of the cross-entropy = Fisher for a linear softmax model; sampled labels, default steps and lr."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(8, 6, 1)
    x = 1.5 * torch.randn(16, 8, 4, 4)
    y = torch.randint(0, 6, (16, 4, 4))
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    estimate = variational_fisher(model, batches, gamma=1.0, tau=0.1, generator=torch.Generator().manual_seed(0))
    exact = linear_softmax_fisher(model, x)
    est = torch.cat([estimate[n].flatten() for n in exact])
    ref = torch.cat([exact[n].flatten() for n in exact])
    median_error = float(((est - ref).abs() / ref).median())
    assert median_error <= 0.10, median_error
    assert spearman(est, ref) >= 0.9
    assert all(v.dtype == torch.float32 for v in estimate.values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "the mean must stay the model"


def test_kl_eq13_matches_torch_distributions():
    torch.manual_seed(0)
    tau = 0.3
    log_precision = {"a": torch.randn(5), "b": torch.randn(2, 3)}
    ours = float(kl_to_prior(log_precision, tau))
    theirs = 0.0
    for value in log_precision.values():
        q = torch.distributions.Normal(torch.zeros_like(value), torch.exp(-0.5 * value))
        p = torch.distributions.Normal(torch.zeros_like(value), torch.full_like(value, tau))
        theirs += float(torch.distributions.kl_divergence(q, p).sum())
    assert math.isclose(ours, theirs, rel_tol=1e-5)


def test_precision_to_fisher_eq14_clamps_and_divides_the_scale():
    precision = {"w": torch.tensor([0.5, 4.0, 10.0])}
    fisher = precision_to_fisher(precision, gamma=2.0, tau=1.0, scale=4.0)["w"]
    assert torch.allclose(fisher, torch.tensor([0.0, 2.0 * 3.0 / 4.0, 2.0 * 9.0 / 4.0]))


def test_unconverged_precision_is_flagged():
    def losses(plus, minus, step):
        return (plus["w"] ** 2).sum() * 100, (minus["w"] ** 2).sum() * 100

    result = fit_precision(losses, {"w": torch.zeros(30)}, gamma=1.0, tau=1.0, steps=10, tolerance=1e-3,
                           generator=torch.Generator().manual_seed(0))
    assert not result.converged and result.relative_change > 1e-3
    assert len(result.history) == 10 and set(result.terms) == {"expected_loss", "kl", "objective"}


def test_stopped_fit_continues_bit_identically():
    """Oracle: an uninterrupted fit. Stopped at step 5 and again at step 19 (after the convergence snapshot of a
    20-step fit), each continued from a copy of its state (as if read back from a file), it ends on the same bits."""
    weights = torch.linspace(0.5, 50.0, 30)

    def losses(plus, minus, step):
        return (weights * plus["w"] ** 4).sum() + step, (weights * minus["w"] ** 4).sum() + step

    def fit(**kwargs):
        return fit_precision(losses, {"w": torch.full((30,), 0.1)}, gamma=1.0, tau=0.1, steps=20, scale=3.0,
                             generator=torch.Generator().manual_seed(0), **kwargs)

    whole = fit()
    saved = {}

    def stop_at(k):
        def checkpoint(done, get_state):
            if done == k:
                state = get_state()
                saved.update({**state, "precision": {n: v.clone() for n, v in state["precision"].items()},
                              "snapshot": {n: v.clone() for n, v in state["snapshot"].items()},
                              "history": list(state["history"])})
            return done == k
        return checkpoint

    assert fit(checkpoint=stop_at(5)) is None and saved["step"] == 5 and not saved["snapshot"]
    assert fit(state=dict(saved), checkpoint=stop_at(19)) is None and saved["snapshot"]
    resumed = fit(state=dict(saved))
    assert torch.equal(resumed.precision["w"], whole.precision["w"]) and torch.equal(resumed.fisher["w"],
                                                                                     whole.fisher["w"])
    assert resumed.relative_change == whole.relative_change and resumed.history == whole.history
