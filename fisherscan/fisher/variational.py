"""Stable (variational) Fisher estimation: Eq. 10-14.

Posterior q(theta) = N(theta_hat, diag(Lambda)^-1), prior p(theta) = N(theta_pt, tau^2 I) (Eq. 10), with the
mean fixed at the pretrained parameters (theta_hat = theta_pt: "the mean is the model itself"). Lambda is learned
by minimising (Eq. 11)

    L(Lambda) = s * E_{theta ~ q}[ loss(theta) ] + gamma * KL(q || p)

with natural-gradient steps in the precision (the Bayesian learning rule, as in IVON/VOGN). With theta_hat =
theta_pt the closed-form KL between diagonal Gaussians (Eq. 13) is

    KL = 1/2 sum_n ( tau^-2 / Lambda_n - 1 + ln tau^2 + ln Lambda_n ).

The likelihood and its scaling. ``loss`` is the mean over the batch's images of each image's SUM of pixel
cross-entropy -- the per-image loss of Eq. 9, so its Hessian in expectation over sampled labels is exactly the
quantity ``diagonal_fisher`` estimates. By Eq. 12, E_q[loss] ~ loss(theta_hat) + 1/2 sum_n H_nn / Lambda_n, and
the stationary point of L is

    s * H_nn = gamma * (Lambda_n - tau^-2) = gamma * D_n            (Eq. 14, the likelihood scaled by s)

so the Fisher estimate is F_n = gamma * D_n / s, clamped at 0. s is a dataset-size scaling of the likelihood, as
IVON uses (default: the number of images scored); dividing it back out gives the units of ``diagonal_fisher``.

The data part D = Lambda - tau^-2 is what the fit stores and updates: Lambda = tau^-2 + D is never formed in the
update, so nothing cancels against a large tau^-2 in float32 (with tau = 1e-3, Lambda - 1e6 has a resolution of
0.0625). tau: given, or (``tau=None``) chosen from a short pilot of the same curvature probe, tau^-2 =
``PRIOR_FRACTION`` * s * m / gamma with m the pilot's mean curvature over all elements: the prior then holds
only where the data term is below a tenth of its mean, and the data term dominates elsewhere (``docs/method.md``).

Curvature (the target of each natural-gradient step), ``curvature=``:

- ``"reparam"`` (default): the reparameterization-trick estimate of diag E_q[Hessian] (Bonnet's theorem) from an
  antithetic pair theta_hat +/- sigma xi (same batch and labels; the first-order term cancels exactly), with
  the control variate -(xi^2 - 1) * D (zero mean; it removes the chi-square noise of xi^2 on the diagonal term);
  two forward+backward passes per step.
- ``"vogn"``: per-image squared gradients at theta_hat + sigma xi (the Gauss-Newton / Fisher diagonal at perturbed
  weights, as VOGN uses); one pass of the per-image engine per step. This is a diagonal Fisher at perturbed
  weights: compare it with the diagonal estimator at the same number of draws.

Converged means the data part moved little over the second half of the steps: sum |D_T - D_{T/2}| / sum |D_T|
below ``tolerance``, with at least ``MIN_WINDOW`` steps in that half. With a running average the change over the
second half is about the standard error of D_T, so the test says whether more steps would still move it.

``legacy=True`` is the estimator before the data part was kept apart (for reproducing old score files): Lambda
stored with its prior in float32, no control variate, converged when the mean relative change of Lambda over the
last 10% of the steps is below ``tolerance``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

LossPair = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], int], tuple[torch.Tensor, torch.Tensor]]
SquaresAt = Callable[[dict[str, torch.Tensor], int], tuple[dict[str, torch.Tensor], torch.Tensor]]

DEFAULT_STEPS = 200  # natural-gradient steps per precision: the one default of the library, the config and the CLI
PRIOR_FRACTION = 0.1  # tau=None: tau^-2 = PRIOR_FRACTION * s * (the pilot's mean curvature) / gamma
PILOT_STEPS = 4  # steps of the pilot that picks tau (their passes count as compute)
PILOT_SIGMA = 1e-3  # the pilot's first probe: a finite-difference step; the later ones use the prior it implies
NARROW = 0.1  # scale=None: s = gamma * n / (2 * NARROW * L0), so 1/2 Tr(F Lambda^-1) <= NARROW * loss(theta_hat)
TOLERANCE = 0.05  # converged: relative change of D over the second half of the steps below this
MIN_WINDOW = 10  # ... and at least this many steps in that half
CURVATURES = ("reparam", "vogn")
DEFAULT_CURVATURE = "vogn"  # of a segmentation model (the library's, the config's, the CLI's): docs/method.md
PASSES_PER_STEP = {"reparam": 2, "vogn": 1}  # forward+backward passes of one step


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


def data_to_fisher(data: dict[str, torch.Tensor], gamma: float, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Eq. 14 on the data part D = Lambda - tau^-2: F = gamma * D / s, clamped at 0."""
    return {name: (gamma * value / scale).clamp_min(0.0).float() for name, value in data.items()}


def prior_tau(mean_curvature: float, gamma: float, scale: float, fraction: float = PRIOR_FRACTION) -> float:
    """The data-derived prior std: tau^-2 = fraction * s * m / gamma (m: the pilot's mean curvature)."""
    if not (math.isfinite(mean_curvature) and mean_curvature > 0):
        raise ValueError(f"the pilot's mean curvature is {mean_curvature!r}, not a positive number; give tau")
    return (fraction * scale * mean_curvature / gamma) ** -0.5


@dataclass
class VariationalResult:
    """Learned precisions, their Fisher estimates (Eq. 14) and the optimisation record."""

    precision: dict[str, torch.Tensor]  # Lambda = tau^-2 + D (float32: for the record)
    fisher: dict[str, torch.Tensor]
    terms: dict[str, float]
    relative_change: float
    converged: bool
    history: list[dict[str, float]] = field(default_factory=list)
    data: dict[str, torch.Tensor] | None = None  # D = Lambda - tau^-2, what the fit updates
    tau: float | None = None  # the prior std used (given, or picked by the pilot)
    prior: dict = field(default_factory=dict)  # how tau was chosen
    bad_steps: int = 0  # steps skipped for a non-finite loss or curvature
    passes: int = 0  # forward+backward passes, the pilot's included
    scale: float | None = None  # the likelihood scale s used (given, or picked by the pilot)


@dataclass
class FitOptions:
    """What ``fit_precision`` was asked for, with the prior it uses."""

    gamma: float
    tau: float | None
    steps: int
    lr: float
    scale: float | None
    scale_floor: float
    tolerance: float
    control: bool
    curvature: str
    fraction: float
    legacy: bool

    @property
    def pilot_steps(self) -> int:
        return 0 if self.tau is not None else PILOT_STEPS


@dataclass
class _Fit:
    """A fit in progress: D (Lambda when legacy), its snapshot for the convergence test, the record, the pilot."""

    stored: dict[str, torch.Tensor]
    snapshot: dict[str, torch.Tensor] = field(default_factory=dict)
    kl: float = math.nan
    history: list[dict[str, float]] = field(default_factory=list)
    step: int = 0  # steps done, the pilot's included
    updates: int = 0  # finite steps of the fit (the running average's count)
    bad_steps: int = 0
    tau: float | None = None
    scale: float | None = None
    pilot_loss: float | None = None  # the loss at the pilot's first finite probe (picks s when it is not given)
    pilot_sum: float = 0.0  # sum over finite pilot steps of the mean curvature
    pilot_done: int = 0

    def state(self, noise: torch.Generator, legacy: bool) -> dict:
        """Everything the rest of the fit depends on (``fit_precision``'s ``state``)."""
        state = {"step": self.step, "precision" if legacy else "data": self.stored, "snapshot": self.snapshot,
                 "noise": noise.get_state(), "kl": self.kl, "history": self.history}
        if not legacy:
            state.update(updates=self.updates, bad_steps=self.bad_steps, tau=self.tau, scale=self.scale,
                         pilot_loss=self.pilot_loss, pilot_sum=self.pilot_sum, pilot_done=self.pilot_done)
        return state

    def restore(self, state: dict, noise: torch.Generator, legacy: bool) -> None:
        self.step, self.kl, self.history = int(state["step"]), float(state["kl"]), list(state["history"])
        self.updates = int(state.get("updates", self.step))
        self.bad_steps, self.tau = int(state.get("bad_steps", 0)), state.get("tau", self.tau)
        self.scale, self.pilot_loss = state.get("scale", self.scale), state.get("pilot_loss")
        self.pilot_sum, self.pilot_done = float(state.get("pilot_sum", 0.0)), int(state.get("pilot_done", 0))
        saved = state["precision" if legacy else "data"]
        self.stored = {n: saved[n].to(device=v.device, dtype=torch.float32).clone() for n, v in self.stored.items()}
        self.snapshot = {n: v.to(device=self.stored[n].device, dtype=torch.float32).clone()
                         for n, v in state.get("snapshot", {}).items()}
        noise.set_state(state["noise"].cpu())


def fit_precision(losses: LossPair | SquaresAt, means: dict[str, torch.Tensor], *, gamma: float,
                  tau: float | None = None, steps: int = DEFAULT_STEPS, lr: float = 0.0,
                  scale: float | None = 1.0, scale_floor: float = 1.0, generator: torch.Generator | None = None,
                  tolerance: float = TOLERANCE, control: bool = True,
                  curvature: str = "reparam", prior_fraction: float = PRIOR_FRACTION, legacy: bool = False,
                  on_step: Callable[[int, dict[str, float]], None] | None = None,
                  on_bad: Callable[[int, int], None] | None = None, state: dict | None = None,
                  checkpoint: Callable[[int, Callable[[], dict]], bool] | None = None) -> VariationalResult | None:
    """Minimise Eq. 11 over Lambda for the parameters ``means`` (theta_hat, left unchanged).

    ``losses``: for ``curvature="reparam"`` a function ``(plus, minus, step) -> (loss_plus, loss_minus)``, the loss
    at theta_hat + sigma xi and at theta_hat - sigma xi for the step's batch (same images, same labels); for
    ``"vogn"`` a function ``(params, step) -> (mean over images of the squared per-image gradients, loss)`` at
    ``params``. Each step is a natural-gradient step of Eq. 11 on the data part of the precision:

        D <- (1 - rho) * D + rho * s * h / gamma,   Lambda = tau^-2 + D,   sigma = max(Lambda, tau^-2)^-1/2

    h the step's curvature (module docstring), rho_t = max(lr, 1 / (t + 1)): a running average of the targets
    (lr = 0, the default) or an exponential one with weight lr. Its fixed point is Eq. 14. ``tau=None`` runs a
    pilot of ``PILOT_STEPS`` probes first and picks tau (``prior_tau``); with ``scale=None`` too, the pilot's first
    probe also picks the likelihood scale s = max(scale_floor, gamma * n / (2 * NARROW * L0)), n the number of
    elements and L0 the loss there: since Lambda >= s F / gamma, the second-order term of Eq. 12,
    1/2 Tr(F Lambda^-1) <= gamma n / (2 s), is then at most NARROW of the loss, so the posterior stays narrow enough
    for Eq. 12. A step whose loss or curvature is not finite is skipped and counted (``on_bad(step, bad_steps)``
    is told; raise there to stop).

    Resuming: after each step (the pilot's included) ``checkpoint(steps_done, get_state)`` is called; ``get_state()``
    returns everything the rest of the run depends on. When ``checkpoint`` returns True the fit stops and returns
    None; ``state=get_state()`` of that moment continues it, bit-identical to an uninterrupted fit (same device).
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, not {curvature!r}")
    if gamma <= 0 or (tau is not None and tau <= 0):
        raise ValueError("gamma and tau must be > 0")
    if legacy and curvature != "reparam":
        raise ValueError("the legacy estimator has the reparam curvature only")
    if scale is None and tau is not None:
        raise ValueError("scale=None is picked by the pilot: leave tau=None too, or give the scale")
    options = FitOptions(gamma, tau, steps, lr, scale, scale_floor, tolerance, control and not legacy, curvature,
                         prior_fraction, legacy)
    means = {name: value.detach() for name, value in means.items()}
    device = next(iter(means.values())).device
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    noise = torch.Generator(device=device).manual_seed(seed)  # xi drawn where the parameters live
    start = tau**-2 if legacy else 0.0  # legacy stores Lambda, which starts at the prior
    fit = _Fit(stored={name: torch.full_like(value, start, dtype=torch.float32) for name, value in means.items()},
               tau=tau, scale=scale)
    if state is not None:  # a stopped fit: its D, snapshot, noise stream, pilot and record
        fit.restore(state, noise, legacy)
    total = options.pilot_steps + steps
    for step in range(fit.step, total):
        terms = {}  # a pilot step or a skipped one has no terms
        if step < options.pilot_steps:
            _pilot_step(losses, means, fit, options, noise, step, on_bad)
        else:
            terms = _fit_step(losses, means, fit, options, noise, step, on_bad) or {}
        fit.step = step + 1
        if on_step is not None:
            on_step(step, terms)
        if checkpoint is not None and step + 1 < total and checkpoint(step + 1, lambda: fit.state(noise, legacy)):
            return None
    return _result(fit, options)


def _pilot_step(losses, means: dict, fit: _Fit, options: FitOptions, noise: torch.Generator, step: int,
                on_bad) -> None:
    """One probe at a uniform sigma (``PILOT_SIGMA`` first, then the prior the pilot implies so far); its mean
    curvature over all elements goes into the pilot's sum. The last pilot step sets tau."""
    sigma = PILOT_SIGMA
    if fit.pilot_done:
        sigma = prior_tau(fit.pilot_sum / fit.pilot_done, options.gamma, fit.scale, options.fraction)
    uniform = {n: torch.full_like(v, sigma**-2, dtype=torch.float32) for n, v in means.items()}
    h, _, _, expected = _curvature(losses, means, uniform, options.curvature, noise, step)
    if _finite(h, expected):
        count = sum(v.numel() for v in h.values())
        fit.pilot_sum += sum(float(v.double().sum()) for v in h.values()) / max(count, 1)
        fit.pilot_done += 1
        if fit.scale is None:  # s from the loss at theta_hat (sigma = PILOT_SIGMA: a negligible perturbation)
            fit.pilot_loss = expected
            narrow = options.gamma * count / (2.0 * NARROW * expected) if expected > 0 else 0.0
            fit.scale = max(options.scale_floor, narrow)
    else:
        fit.bad_steps += 1
        if on_bad is not None:
            on_bad(step, fit.bad_steps)
    if step == options.pilot_steps - 1:
        if not fit.pilot_done:
            raise ValueError("every pilot step had a non-finite loss or curvature")
        fit.tau = prior_tau(fit.pilot_sum / fit.pilot_done, options.gamma, fit.scale, options.fraction)


def _fit_step(losses, means: dict, fit: _Fit, options: FitOptions, noise: torch.Generator, step: int,
              on_bad) -> dict | None:
    """One natural-gradient step of Eq. 11 on D (on Lambda when legacy): its terms, None when skipped."""
    t, prior = step - options.pilot_steps, fit.tau**-2
    steps = options.steps
    snapshot_at = steps - max(1, steps // 10) if options.legacy else steps // 2
    if t == snapshot_at:
        fit.snapshot = {name: value.clone() for name, value in fit.stored.items()}
    if options.legacy:
        sampling = {n: v.clamp_min(prior) for n, v in fit.stored.items()}
    else:
        sampling = {n: (v + prior).clamp_min_(prior) for n, v in fit.stored.items()}
    h, xis, _, expected = _curvature(losses, means, sampling, options.curvature, noise, step)
    del sampling
    if not _finite(h, expected):
        fit.bad_steps += 1
        if on_bad is not None:
            on_bad(step, fit.bad_steps)
        return None
    rho = max(options.lr, 1.0 / (fit.updates + 1))
    kl_every = max(1, steps // 20)
    with torch.no_grad():
        for name, curvature in h.items():
            if options.legacy:
                target = fit.scale * curvature / options.gamma + prior
                fit.stored[name].mul_(1.0 - rho).add_(rho * target)
                continue
            target = curvature.mul_(fit.scale / options.gamma)
            if options.control and xis is not None:  # zero mean: E[xi^2] = 1, D is fixed before xi is drawn
                target.sub_(xis[name].square_().sub_(1.0).mul_(fit.stored[name].clamp_min(0.0)))
            fit.stored[name].lerp_(target, rho)
        if t % kl_every == 0 or t == steps - 1:  # a full pass over Lambda: not every step
            if options.legacy:
                log_precision = {n: v.clamp_min(prior).log() for n, v in fit.stored.items()}
            else:
                log_precision = {n: (v.clamp_min(0.0) + prior).log() for n, v in fit.stored.items()}
            fit.kl = float(kl_to_prior(log_precision, fit.tau))
    fit.updates += 1
    fit.history.append({"expected_loss": expected, "kl": fit.kl,
                        "objective": fit.scale * expected + options.gamma * fit.kl})
    return fit.history[-1]


def _curvature(losses, means: dict, precision: dict, curvature: str, noise: torch.Generator, step: int
               ) -> tuple[dict, dict | None, dict, float]:
    """(h, xi or None, sigma, E[loss]) of one step: the curvature target per element (module docstring)."""
    xis, sigmas, plus, minus = {}, {}, {}, {}
    for name, mean in means.items():
        xis[name] = torch.randn(mean.shape, generator=noise, device=mean.device, dtype=torch.float32)
        sigmas[name] = precision[name].rsqrt_()  # the caller's temporary
        offset = (sigmas[name] * xis[name]).to(mean.dtype)
        plus[name] = (mean + offset).requires_grad_(curvature == "reparam")
        if curvature == "reparam":
            minus[name] = (mean - offset).requires_grad_(True)
    if curvature == "vogn":
        squares, loss = losses(plus, step)
        return {n: squares[n].float() for n in means}, None, sigmas, float(loss.detach())
    loss_plus, loss_minus = losses(plus, minus, step)
    names = list(means)
    grads_plus = _grads(loss_plus, [plus[n] for n in names])
    grads_minus = _grads(loss_minus, [minus[n] for n in names])
    with torch.no_grad():
        h = {name: xis[name] * (g_plus.float() - g_minus.float()) / (2.0 * sigmas[name])
             for name, g_plus, g_minus in zip(names, grads_plus, grads_minus)}
    return h, xis, sigmas, 0.5 * float(loss_plus.detach() + loss_minus.detach())


def _finite(h: dict[str, torch.Tensor], expected: float) -> bool:
    """True when the loss and every curvature element are finite (one device sync): a sum is finite exactly when
    its terms are (short of an overflow of the sum itself, which would count as non-finite)."""
    return math.isfinite(expected) and bool(torch.stack([v.sum(dtype=torch.float32) for v in h.values()])
                                            .isfinite().all())


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d params; a parameter with no path to the loss (a norm only another head reads) gets zeros."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _result(fit: _Fit, options: FitOptions) -> VariationalResult:
    """The finished fit: Lambda, D, F (Eq. 14), the convergence test and the record."""
    if fit.updates == 0:
        raise ValueError("every step had a non-finite loss or curvature")
    prior = fit.tau**-2
    if options.legacy:  # the mean relative change of Lambda over the last 10% of the steps
        precision, data = fit.stored, {n: v - prior for n, v in fit.stored.items()}
        fisher = precision_to_fisher(precision, options.gamma, fit.tau, fit.scale)
        change = sum(float(((precision[n] - fit.snapshot[n]).abs() / precision[n].abs().clamp_min(prior)).sum())
                     for n in precision) / max(1, sum(v.numel() for v in precision.values()))
        converged = change < options.tolerance
    else:
        data, precision = fit.stored, {n: v + prior for n, v in fit.stored.items()}
        fisher = data_to_fisher(data, options.gamma, fit.scale)
        change = relative_change(data, fit.snapshot)
        converged = change < options.tolerance and options.steps - options.steps // 2 >= MIN_WINDOW
    prior_record = {"tau": fit.tau, "given": options.tau is not None}
    if options.tau is None:
        prior_record.update(pilot_steps=PILOT_STEPS, pilot_finite_steps=fit.pilot_done,
                            mean_curvature=fit.pilot_sum / fit.pilot_done, fraction=options.fraction,
                            first_sigma=PILOT_SIGMA,
                            rule="tau^-2 = fraction * s * m / gamma, m the mean over all elements of the pilot's "
                                 "curvature; the first probe at sigma = first_sigma, the later ones at the prior "
                                 "the pilot implies so far")
    if options.scale is None:
        prior_record["likelihood_scale"] = {
            "value": fit.scale, "loss_at_mean": fit.pilot_loss, "elements": sum(v.numel() for v in data.values()),
            "narrow": NARROW, "floor": options.scale_floor,
            "rule": "s = max(floor, gamma * elements / (2 * narrow * loss_at_mean)): the second-order term of "
                    "Eq. 12, 1/2 Tr(F Lambda^-1) <= gamma * elements / (2 s), at most narrow of the loss"}
    passes = PASSES_PER_STEP[options.curvature] * (options.pilot_steps + options.steps)
    return VariationalResult(precision=precision, fisher=fisher, terms=fit.history[-1], relative_change=change,
                             converged=converged, history=fit.history, data=data, tau=fit.tau, prior=prior_record,
                             bad_steps=fit.bad_steps, passes=passes, scale=fit.scale)


def relative_change(data: dict[str, torch.Tensor], snapshot: dict[str, torch.Tensor]) -> float:
    """sum |D - D_snapshot| / sum |D| over every element (inf when D is zero everywhere)."""
    moved = sum(float((data[n] - snapshot[n]).abs().double().sum()) for n in data)
    size = sum(float(v.abs().double().sum()) for v in data.values())
    return moved / size if size > 0 else math.inf
