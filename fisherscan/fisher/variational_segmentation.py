"""The variational estimator (Eq. 10-14, ``fisherscan.fisher.variational``) for a segmentation model: the likelihood
of Eq. 11 at perturbed weights, as the reparam curvature's loss pair or the VOGN curvature's per-image squares, and
``variational_fisher``, the whole estimate from batches held in memory."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call

from ..models.logits import upsample_logits
from .diagonal import make_engine
from .loss import LABEL_MODES, image_loss, sample_labels, trainable_parameters
from .perturb import TokenShift
from .variational import (
    CURVATURES,
    DEFAULT_CURVATURE,
    DEFAULT_STEPS,
    LossPair,
    SquaresAt,
    VariationalResult,
    fit_precision,
)


def segmentation_losses(model: torch.nn.Module, next_batch: Callable[[int], tuple], *, ignore_index: int = 255,
                        autocast_dtype: torch.dtype | None = None) -> LossPair:
    """The likelihood term of Eq. 11 for a segmentation model: the mean over the batch's images of each image's
    summed pixel cross-entropy (Eq. 9's per-image loss), at theta_hat +/- sigma*xi (``curvature="reparam"``).

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


def segmentation_squares(model: nn.Module, next_batch: Callable[[int], tuple], *, ignore_index: int = 255,
                         autocast_dtype: torch.dtype | None = None, shift: TokenShift | None = None,
                         chunk_size: int = 8) -> SquaresAt:
    """The VOGN curvature (``curvature="vogn"``): the mean over the batch's images of the squared per-image gradient
    of Eq. 9's loss at the perturbed parameters, by the per-image engine, and the batch's mean loss there.

    The model's parameters point at the perturbed values for the pass and at their own storage again afterwards
    (no copy; the originals are never written). ``next_batch(step)`` as in ``segmentation_losses``; with ``shift``
    (Eq. 6), ``next_batch`` sets its spread and ``shift.eps`` for the batch and the engine applies it.
    """
    engine = make_engine(model, chunk_size=chunk_size)
    params = engine.params

    def squares(perturbed, step):
        x, y, uniforms = next_batch(step)
        kept = {name: p.data for name, p in params.items()}  # the original storage, never written
        try:
            for name, p in params.items():
                p.data = perturbed[name]
            sums = engine.squared_gradient_sum(x, y, uniforms, ignore_index=ignore_index, autocast_dtype=autocast_dtype,
                                               shift=shift, shift_eps=None if shift is None else shift.eps)
        finally:
            for name, p in params.items():
                p.data = kept[name]
        batch = x.shape[0]
        return {n: v.div_(batch) for n, v in sums.items()}, engine.last_loss / batch

    return squares


def variational_fit(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, gamma: float = 1.0,
                    tau: float | None = None, steps: int = DEFAULT_STEPS, lr: float = 0.0, labels: str = "sampled",
                    ignore_index: int = 255, generator: torch.Generator | None = None, scale: float | None = None,
                    curvature: str = DEFAULT_CURVATURE, control: bool = True, **options) -> VariationalResult:
    """``variational_fisher`` with its whole record (tau and how it was chosen, convergence, passes)."""
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, not {labels!r}")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, not {curvature!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("no batches")
    images = sum(x.shape[0] for x, _ in batches)

    def next_batch(step):
        x, y = batches[step % len(batches)]
        return x, y, torch.rand(y.shape, generator=generator) if labels == "sampled" else None

    if curvature == "vogn":
        likelihood = segmentation_squares(model, next_batch, ignore_index=ignore_index)
    else:
        likelihood = segmentation_losses(model, next_batch, ignore_index=ignore_index)
    if scale is None and tau is not None:  # no pilot: the number of images
        scale = float(images)
    return fit_precision(likelihood, trainable_parameters(model), gamma=gamma, tau=tau, steps=steps, lr=lr,
                         scale=scale, scale_floor=float(images), generator=generator, curvature=curvature,
                         control=control, **options)


def variational_fisher(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, gamma: float = 1.0,
                       tau: float | None = None, steps: int = DEFAULT_STEPS, lr: float = 0.0, labels: str = "sampled",
                       ignore_index: int = 255, generator: torch.Generator | None = None, scale: float | None = None,
                       curvature: str = DEFAULT_CURVATURE, control: bool = True, **options) -> dict[str, torch.Tensor]:
    """Variational diagonal Fisher (Eq. 10-14) of every parameter with requires_grad, float32, by name.

    Same meaning and normalisation as ``diagonal_fisher`` (mean over images of the per-image Fisher of the
    summed pixel loss). Prior N(theta_pt, tau^2 I) at the model's current parameters (``tau=None``: picked by a
    pilot, ``fisherscan.fisher.variational``), KL weight ``gamma``; ``steps`` natural-gradient steps of Eq. 11
    with step size ``lr`` (0: running average), cycling through ``batches`` (held in memory); the likelihood is
    scaled by ``scale`` and divided back out (default: picked by the pilot so that the posterior stays narrow, at
    least the number of images; with a given tau, the number of images). Labels: "sampled" draws
    them with uniforms from ``generator``; "given" uses y. ``curvature``: "reparam" (antithetic reparameterization,
    ``control``: with its control variate) or "vogn" (per-image squares at perturbed weights). ``options`` go to
    ``fit_precision`` (tolerance, prior_fraction, legacy, ...); ``variational_fit`` returns the whole record.
    """
    return variational_fit(model, batches, gamma=gamma, tau=tau, steps=steps, lr=lr, labels=labels,
                           ignore_index=ignore_index, generator=generator, scale=scale, curvature=curvature,
                           control=control, **options).fisher
