"""Stable (variational) Fisher estimation: Eq. 10-14.

Posterior q(theta) = N(theta_hat, diag(Lambda)^-1), prior p(theta) = N(theta_pt, tau^2 I) (Eq. 10), with the
mean fixed at the pretrained parameters (theta_hat = theta_pt: "the mean is the model itself"). Lambda is learned
by minimising (Eq. 11)

    L(Lambda) = s * E_{theta ~ q}[ loss(theta) ] + gamma * KL(q || p)

by stochastic gradient with the reparameterization trick, theta = theta_hat +/- Lambda^-1/2 * xi,
xi ~ N(0, I), drawn as an antithetic pair (the same xi with both signs, the same batch and labels), which
cancels the first-order term of the loss exactly and leaves the curvature. With theta_hat = theta_pt the
closed-form KL between diagonal Gaussians (Eq. 13) is

    KL = 1/2 sum_n ( tau^-2 / Lambda_n - 1 + ln tau^2 + ln Lambda_n ).

The likelihood and its scaling. ``loss`` is the mean over the batch's images of each image's SUM of pixel
cross-entropy -- the per-image loss of Eq. 9, so its Hessian in expectation over sampled labels is exactly the
quantity ``diagonal_fisher`` estimates (mean over images of the per-image Fisher). By Eq. 12,
E_q[loss] ~ loss(theta_hat) + 1/2 sum_n H_nn / Lambda_n, and the stationary point of L is

    s * H_nn = gamma * (Lambda_n - tau^-2)         (Eq. 14, with the likelihood scaled by s)

so the Fisher estimate is F_n = gamma * (Lambda_n - tau^-2) / s, clamped at 0. s is a dataset-size scaling of
the likelihood, as IVON uses (default: the number of images scored): it keeps the posterior narrow
(Lambda ~ s F / gamma), so the second-order expansion of Eq. 12 holds, and dividing it back out gives the same
units as ``diagonal_fisher``. Eq. 12 is a statement about the Hessian: the estimate equals the diagonal Fisher
where the expected Hessian of the loss equals the Fisher (exactly for a linear softmax model), where the
posterior is narrow, and where s F / gamma stands out against tau^-2.

Lambda is optimised in log space with Adam, the learning rate decaying linearly to 0. Memory: the log
precision, Adam's two moments, xi and the two perturbed parameter sets: about six parameter-sized tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call

from ..models.logits import upsample_logits
from .loss import LABEL_MODES, image_loss, sample_labels, trainable_parameters

LossPair = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], int], tuple[torch.Tensor, torch.Tensor]]


def kl_to_prior(log_precision: dict[str, torch.Tensor], tau: float) -> torch.Tensor:
    """Eq. 13 with theta_hat = theta_pt: 1/2 sum(tau^-2 / Lambda - 1 + ln tau^2 + ln Lambda)."""
    total = 0.0
    for value in log_precision.values():
        total = total + 0.5 * (torch.exp(-value) / tau**2 - 1.0 + math.log(tau**2) + value).sum()
    return total


def precision_to_fisher(precision: dict[str, torch.Tensor], gamma: float, tau: float,
                        scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Eq. 14: F = gamma * (Lambda - tau^-2), divided by the likelihood scale s, clamped at 0."""
    return {name: (gamma * (value - tau**-2) / scale).clamp_min(0.0).float() for name, value in precision.items()}


@dataclass
class VariationalResult:
    """Learned precisions, their Fisher estimates (Eq. 14) and the optimisation record."""

    precision: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor]
    terms: dict[str, float]
    relative_change: float
    converged: bool
    history: list[dict[str, float]] = field(default_factory=list)


def fit_precision(losses: LossPair, means: dict[str, torch.Tensor], *, gamma: float, tau: float, steps: int,
                  lr: float = 0.0, scale: float = 1.0, generator: torch.Generator | None = None,
                  tolerance: float = 0.05, on_step: Callable[[int, dict[str, float]], None] | None = None,
                  state: dict | None = None, checkpoint: Callable[[int, Callable[[], dict]], bool] | None = None
                  ) -> VariationalResult | None:
    """Minimise Eq. 11 over Lambda for the parameters ``means`` (theta_hat, left unchanged).

    ``losses(plus, minus, step)`` returns the loss at theta_hat + sigma*xi and at theta_hat - sigma*xi for the
    step's batch (same images, same labels), sigma = Lambda^-1/2. Each step is a natural-gradient step of Eq. 11
    in the precision (the Bayesian learning rule, as in IVON/VOGN):

        Lambda <- (1 - rho) * Lambda + rho * (s * h / gamma + tau^-2),   h = xi * (g_plus - g_minus) / (2 sigma)

    where h is the reparameterization-trick estimate of the diagonal of E_q[Hessian] (Bonnet's theorem; the
    antithetic pair removes the gradient's first-order noise), and rho_t = max(lr, 1 / (t + 1)): a running
    average of the targets (lr = 0, the default) or an exponential one with weight lr. Its fixed point is
    Eq. 14. The precision used for sampling is floored at the prior's tau^-2 (curvature noise may be negative);
    the returned precision is the unfloored average, so Eq. 14 stays unbiased. Converged means the mean
    relative change of Lambda over the last 10% of the steps is below ``tolerance``.

    Resuming: after each step ``checkpoint(steps_done, get_state)`` is called; ``get_state()`` returns everything
    the rest of the run depends on (step, Lambda, the 10% snapshot, the noise generator's state, the last KL and the
    history). When ``checkpoint`` returns True the fit stops and returns None; ``state=get_state()`` of that
    moment continues it, and the result is bit-identical to an uninterrupted fit (same device).
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    means = {name: value.detach() for name, value in means.items()}
    device = next(iter(means.values())).device
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    noise = torch.Generator(device=device).manual_seed(seed)  # xi drawn where the parameters live
    prior_precision = tau**-2
    fit = _Fit(precision={name: torch.full_like(value, prior_precision, dtype=torch.float32)
                          for name, value in means.items()})
    if state is not None:  # a stopped fit: its Lambda, snapshot, noise stream and record
        fit.restore(state, noise)
    checkpoint_step = steps - max(1, steps // 10)
    kl_every = max(1, steps // 20)
    for step in range(fit.step, steps):
        if step == checkpoint_step:
            fit.snapshot = {name: value.clone() for name, value in fit.precision.items()}
        xis, sigmas, plus, minus = _antithetic_pair(means, fit.precision, prior_precision, noise)
        loss_plus, loss_minus = losses(plus, minus, step)
        names = list(means)
        grads_plus = _grads(loss_plus, [plus[n] for n in names])
        grads_minus = _grads(loss_minus, [minus[n] for n in names])
        rho = max(lr, 1.0 / (step + 1))
        with torch.no_grad():
            for name, g_plus, g_minus in zip(names, grads_plus, grads_minus):
                curvature = xis[name] * (g_plus.float() - g_minus.float()) / (2.0 * sigmas[name])
                target = scale * curvature / gamma + prior_precision
                fit.precision[name].mul_(1.0 - rho).add_(rho * target)
            expected = 0.5 * float(loss_plus.detach() + loss_minus.detach())
            if step % kl_every == 0 or step == steps - 1:  # a full pass over Lambda: not every step
                fit.kl = float(kl_to_prior({n: v.clamp_min(prior_precision).log() for n, v in fit.precision.items()},
                                           tau))
        terms = {"expected_loss": expected, "kl": fit.kl, "objective": scale * expected + gamma * fit.kl}
        fit.history.append(terms)
        fit.step = step + 1
        if on_step is not None:
            on_step(step, terms)
        if checkpoint is not None and step + 1 < steps and checkpoint(step + 1, lambda: fit.state(noise)):
            return None
    change = sum(float(((fit.precision[n] - fit.snapshot[n]).abs()
                        / fit.precision[n].abs().clamp_min(prior_precision)).sum())
                 for n in means) / max(1, sum(v.numel() for v in means.values()))
    return VariationalResult(precision=fit.precision, fisher=precision_to_fisher(fit.precision, gamma, tau, scale),
                             terms=fit.history[-1], relative_change=change, converged=change < tolerance,
                             history=fit.history)


@dataclass
class _Fit:
    """A fit in progress: Lambda, its snapshot at 90% of the steps, the last KL, the record and the next step."""

    precision: dict[str, torch.Tensor]
    snapshot: dict[str, torch.Tensor] = field(default_factory=dict)
    kl: float = math.nan
    history: list[dict[str, float]] = field(default_factory=list)
    step: int = 0

    def state(self, noise: torch.Generator) -> dict:
        """Everything the rest of the fit depends on (``fit_precision``'s ``state``)."""
        return {"step": self.step, "precision": self.precision, "snapshot": self.snapshot,
                "noise": noise.get_state(), "kl": self.kl, "history": self.history}

    def restore(self, state: dict, noise: torch.Generator) -> None:
        self.step, self.kl, self.history = int(state["step"]), float(state["kl"]), list(state["history"])
        self.precision = {n: state["precision"][n].to(device=v.device, dtype=torch.float32).clone()
                          for n, v in self.precision.items()}
        self.snapshot = {n: v.to(device=self.precision[n].device, dtype=torch.float32).clone()
                         for n, v in state.get("snapshot", {}).items()}
        noise.set_state(state["noise"].cpu())


def _antithetic_pair(means: dict[str, torch.Tensor], precision: dict[str, torch.Tensor], prior_precision: float,
                     noise: torch.Generator) -> tuple[dict, dict, dict, dict]:
    """(xi, sigma, theta_hat + sigma xi, theta_hat - sigma xi) per parameter, sigma = max(Lambda, tau^-2)^-1/2."""
    xis, sigmas, plus, minus = {}, {}, {}, {}
    for name, mean in means.items():
        xis[name] = torch.randn(mean.shape, generator=noise, device=mean.device, dtype=torch.float32)
        sigmas[name] = precision[name].clamp_min(prior_precision).rsqrt()
        offset = (sigmas[name] * xis[name]).to(mean.dtype)
        plus[name] = (mean + offset).requires_grad_(True)
        minus[name] = (mean - offset).requires_grad_(True)
    return xis, sigmas, plus, minus


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d params; a parameter with no path to the loss (a norm only another head reads) gets zeros."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def segmentation_losses(model: torch.nn.Module, next_batch: Callable[[int], tuple], *, ignore_index: int = 255,
                        autocast_dtype: torch.dtype | None = None) -> LossPair:
    """The likelihood term of Eq. 11 for a segmentation model: the mean over the batch's images of each image's
    summed pixel cross-entropy (Eq. 9's per-image loss), at theta_hat +/- sigma*xi.

    ``next_batch(step)`` returns (x, y, uniforms or None): with uniforms, labels are drawn from the model's
    softmax at theta_hat + sigma*xi (inverse CDF, valid pixels only) and reused for the minus side.
    """
    def logits_at(params, x, size):
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = functional_call(model, params, (x,))
        return upsample_logits(logits.float(), size)

    def losses(plus, minus, step):
        x, y, uniforms = next_batch(step)
        size = tuple(y.shape[-2:])
        logits_plus = logits_at(plus, x, size)
        target = y
        if uniforms is not None:
            target = sample_labels(logits_plus, uniforms.to(y.device), y != ignore_index, ignore_index)
        batch = x.shape[0]
        loss_plus = image_loss(logits_plus, target, ignore_index) / batch
        loss_minus = image_loss(logits_at(minus, x, size), target, ignore_index) / batch
        return loss_plus, loss_minus

    return losses


def variational_fisher(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, gamma: float,
                       tau: float, steps: int = 400, lr: float = 0.0, labels: str = "sampled", ignore_index: int = 255,
                       generator: torch.Generator | None = None, scale: float | None = None) -> dict[str, torch.Tensor]:
    """Variational diagonal Fisher (Eq. 10-14) of every parameter with requires_grad, float32, by name.

    Same meaning and normalisation as ``diagonal_fisher`` (mean over images of the per-image Fisher of the
    summed pixel loss). Prior N(theta_pt, tau^2 I) at the model's current parameters, KL weight ``gamma``;
    ``steps`` natural-gradient steps of Eq. 11 with step size ``lr`` (0: running average), cycling through
    ``batches`` (held in memory); the likelihood is scaled by ``scale`` (default: the number of images) and the
    scaling divided back out (``fisherscan.fisher.variational``). Labels: "sampled" draws them with uniforms from
    ``generator``; "given" uses y.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, not {labels!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("no batches")
    images = sum(x.shape[0] for x, _ in batches)

    def next_batch(step):
        x, y = batches[step % len(batches)]
        return x, y, torch.rand(y.shape, generator=generator) if labels == "sampled" else None

    losses = segmentation_losses(model, next_batch, ignore_index=ignore_index)
    result = fit_precision(losses, trainable_parameters(model), gamma=gamma, tau=tau, steps=steps, lr=lr,
                           scale=float(images if scale is None else scale), generator=generator)
    return result.fisher
