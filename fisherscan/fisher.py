"""Diagonal Fisher information of a segmentation model (Eq. 4, 8, 9) and its domain-related form (Eq. 5, 7).

Eq. 9:  F_n = 1/N sum_i E_{y_i ~ p_theta(y | x_i)} (d loss(f(x_i), y_i) / d theta_n)^2

The per-image loss is the SUM of pixel cross-entropy over the image's valid pixels (label != ignore_index;
padding carries the ignore label), with logits upsampled bilinearly to the label size. The square is taken of
each image's own gradient -- the square of a batch-mean gradient is not Eq. 9. "sampled" labels (the true
Fisher) draw y pixel-wise from softmax(logits) by inverse-CDF sampling of given uniforms, only at valid
pixels; "given" labels (the empirical Fisher) use the label map.

Per-image gradients come, by default, from the hook engine (``fisherscan.fisher_engine``): one batched forward
and backward with per-layer rules, at about the cost of a training step; ``engine="vmap"`` keeps the reference
path, one vectorised map over the batch (torch.func.vmap of grad). Both work in chunks that bound memory and
add the squares into fp32 accumulators. The accumulator is one object whose state can be
saved and restored.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .perturb import TokenShift

LABEL_MODES = ("sampled", "given")


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (B, C, h, w) logits to the label size (no-op when equal)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def sample_labels(logits: torch.Tensor, uniforms: torch.Tensor, valid: torch.Tensor,
                  ignore_index: int = 255) -> torch.Tensor:
    """y ~ softmax(logits) per pixel by inverse CDF: the first class whose cumulative probability exceeds u.

    logits (B, C, H, W), uniforms and valid (B, H, W); pixels that are not valid get ``ignore_index``.
    """
    cdf = torch.softmax(logits.detach().float(), dim=1).cumsum(dim=1)
    drawn = (cdf < uniforms.unsqueeze(1)).sum(dim=1).clamp(max=logits.shape[1] - 1)
    return torch.where(valid, drawn, torch.full_like(drawn, ignore_index))


def image_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """The per-image loss of Eq. 9: SUM over valid pixels of the pixel cross-entropy (B=1 inputs)."""
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


ENGINES = ("hooks", "vmap")


def squared_gradient_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, uniforms: torch.Tensor | None = None,
                         *, ignore_index: int = 255, shift: TokenShift | None = None,
                         shift_eps: tuple[torch.Tensor, torch.Tensor] | None = None,
                         chunk_size: int = 8, autocast_dtype: torch.dtype | None = None,
                         engine: str = "hooks") -> dict[str, torch.Tensor]:
    """sum_i (d loss_i / d theta)^2 over the images of one batch, fp32, for every parameter with requires_grad.

    ``uniforms`` (B, H, W) in [0, 1) selects sampled labels (Eq. 9's expectation by one draw per pixel);
    None uses ``y``. With ``shift`` (Eq. 6 at a block input), ``shift_eps`` holds each image's eps draws.
    ``engine="hooks"`` (default): one batched forward and backward with per-layer rules
    (``fisherscan.fisher_engine``); ``"vmap"``: torch.func vmap(grad). Both are exact and agree.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    params = trainable_parameters(model)
    common = dict(ignore_index=ignore_index, shift=shift, shift_eps=shift_eps, autocast_dtype=autocast_dtype)
    if engine == "vmap":
        return vmap_squared_gradient_sum(model, params, x, y, uniforms, chunk_size=chunk_size, **common)
    from .fisher_engine import HookEngine

    return HookEngine(model, params, chunk_size).squared_gradient_sum(x, y, uniforms, **common)


def vmap_squared_gradient_sum(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, uniforms: torch.Tensor | None = None,
                         *, ignore_index: int = 255, shift: TokenShift | None = None,
                         shift_eps: tuple[torch.Tensor, torch.Tensor] | None = None,
                         chunk_size: int = 8, autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``squared_gradient_sum`` by torch.func: vmap of grad over the images, in chunks, for the parameters
    ``params`` (name -> parameter) only; the others stay fixed. The reference path, and the hook engine's
    fallback for parameters no rule covers."""
    params = {name: p.detach() for name, p in params.items()}
    device_type = x.device.type
    sampled = uniforms is not None

    def loss_of_one(params, x1, y1, u1, eps_mu1, eps_sigma1):
        if shift is not None:
            shift.eps = (eps_mu1.unsqueeze(0), eps_sigma1.unsqueeze(0))
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = functional_call(model, params, (x1.unsqueeze(0),))
        logits = upsample_logits(logits.float(), tuple(y1.shape[-2:]))
        target = y1.unsqueeze(0)
        if sampled:
            target = sample_labels(logits, u1.unsqueeze(0), target != ignore_index, ignore_index)
        return image_loss(logits, target, ignore_index)

    batch = x.shape[0]
    if not sampled:
        uniforms = torch.zeros(y.shape)
    if shift_eps is None:
        shift_eps = (torch.zeros(batch, 1), torch.zeros(batch, 1))
    # randomness allowed: an eval-mode model may still draw (transformers < 5.x Mask2Former draws its layer-drop
    # coin even in eval mode, without using it)
    per_image_grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0, 0, 0, 0), randomness="different")
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    inputs = (x, y, uniforms, *shift_eps)
    # no_grad outside: torch.func.grad still differentiates inside, but parameters outside ``params`` that
    # require grad do not make the sums carry a graph
    with warnings.catch_warnings(), torch.no_grad(), (shift if shift is not None else contextlib.nullcontext()):
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        for chunk in zip(*(t.to(x.device).split(chunk_size) for t in inputs)):
            for name, g in per_image_grads(params, *chunk).items():
                sums[name] += g.float().square().sum(dim=0)
    return sums


class FisherAccumulator:
    """Running sum of squared per-image gradients and the number of images seen (Eq. 9 before the 1/N).

    ``state_dict()`` / ``load_state_dict()`` hold everything needed to continue an interrupted run.
    """

    def __init__(self, shapes: dict[str, torch.Size]):
        self.sums = {name: torch.zeros(shape, dtype=torch.float32) for name, shape in shapes.items()}
        self.images = 0

    def add(self, batch_sums: dict[str, torch.Tensor], images: int) -> None:
        for name, value in batch_sums.items():
            self.sums[name] += value.to(self.sums[name].device)
        self.images += images

    def fisher(self) -> dict[str, torch.Tensor]:
        """F = sums / N (Eq. 9)."""
        if self.images == 0:
            raise ValueError("no images were accumulated")
        return {name: value / self.images for name, value in self.sums.items()}

    def state_dict(self) -> dict:
        return {"sums": {k: v.clone() for k, v in self.sums.items()}, "images": self.images}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {k: v.clone().float() for k, v in state["sums"].items()}
        self.images = int(state["images"])


def diagonal_fisher(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                    labels: str = "sampled", ignore_index: int = 255,
                    generator: torch.Generator | None = None, engine: str = "hooks") -> dict[str, torch.Tensor]:
    """Exact diagonal Fisher (Eq. 8, 9) of every parameter with requires_grad, float32, by name.

    ``model(x)`` returns logits (B, C, h, w); ``batches`` yields (x, y) with y (B, H, W) int64. The value is
    (1/N) sum over images of the squared gradient of that image's summed pixel loss. With
    ``labels="sampled"`` each image's label map is drawn from softmax(logits) with uniforms drawn from
    ``generator`` (``torch.rand(y.shape)`` per batch, on the CPU); ``labels="given"`` uses y.
    Put the model in eval mode first (dropout and drop-path would make the gradients random). ``engine`` as in
    ``squared_gradient_sum``.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, not {labels!r}")
    shapes = {name: p.shape for name, p in trainable_parameters(model).items()}
    accumulator = FisherAccumulator(shapes)
    for x, y in batches:
        uniforms = torch.rand(y.shape, generator=generator) if labels == "sampled" else None
        accumulator.add(squared_gradient_sum(model, x, y, uniforms, ignore_index=ignore_index, engine=engine), x.shape[0])
    return accumulator.fisher()


def variational_fisher(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, gamma: float,
                       tau: float, steps: int = 400, lr: float = 0.0, labels: str = "sampled", ignore_index: int = 255,
                       generator: torch.Generator | None = None, scale: float | None = None) -> dict[str, torch.Tensor]:
    """Variational diagonal Fisher (Eq. 10-14) of every parameter with requires_grad, float32, by name.

    Same meaning and normalisation as ``diagonal_fisher`` (mean over images of the per-image Fisher of the
    summed pixel loss). Prior N(theta_pt, tau^2 I) at the model's current parameters, KL weight ``gamma``;
    ``steps`` natural-gradient steps of Eq. 11 with step size ``lr`` (0: running average), cycling through
    ``batches`` (held in memory); the likelihood is scaled by ``scale`` (default: the number of images) and the
    scaling divided back out (``fisherscan.variational``). Labels: "sampled" draws them with uniforms from
    ``generator``; "given" uses y.
    """
    from .variational import fit_precision, segmentation_losses

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


def delta_fisher(f_clean: dict[str, torch.Tensor], f_shift: dict[str, torch.Tensor],
                 eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """Eq. 5: Delta F = |F(x) - F(x')| / (min(F(x), F(x')) + eps), element-wise, per parameter."""
    return {name: (f_clean[name] - f_shift[name]).abs() / (torch.minimum(f_clean[name], f_shift[name]) + eps)
            for name in f_clean}


def fisher_scale(f_clean: dict[str, torch.Tensor], candidates: Iterable[str] | None = None) -> float:
    """The mean of F(x) over all elements of the ``candidates`` parameters (default: all) -- the unit of F."""
    names = list(f_clean) if candidates is None else list(candidates)
    total = sum(float(f_clean[n].double().sum()) for n in names)
    count = sum(f_clean[n].numel() for n in names)
    return total / count if count else 0.0


def shift_weight(magnitude: float) -> float:
    """exp(-s): the damping of the domain term in Eq. 7, with s the mean relative shift actually applied."""
    return math.exp(-magnitude)


def dr_fim_terms(f_clean: dict[str, torch.Tensor], f_shift: dict[str, torch.Tensor], shift_weight: float,
                 normalize: bool = True, candidates: Iterable[str] | None = None, eps: float | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """Eq. 7 with its parts: (Delta F of Eq. 5, DRF = F(x) + w * Delta F, the scale F was divided by).

    ``normalize=True`` (fisherscan's default, FISHERTUNE.md): F(x) and F(x') are divided by the mean of F(x)
    over the candidate elements first, so both terms are O(1), and Eq. 5's eps is a relative floor (default
    1e-3). ``normalize=False`` is the literal formula with eps = 1e-8 (scale 1).
    """
    if eps is None:
        eps = 1e-3 if normalize else 1e-8
    scale = 1.0
    if normalize:
        scale = fisher_scale(f_clean, candidates)
        if scale <= 0:
            raise ValueError("F(x) is zero on every candidate element; nothing to normalise by")
        f_clean = {n: v / scale for n, v in f_clean.items()}
        f_shift = {n: v / scale for n, v in f_shift.items()}
    delta = delta_fisher(f_clean, f_shift, eps)
    return delta, {name: f_clean[name] + shift_weight * delta[name] for name in f_clean}, scale


def dr_fim(f_clean: dict[str, torch.Tensor], f_shift: dict[str, torch.Tensor], shift_weight: float,
           normalize: bool = True, candidates: Iterable[str] | None = None,
           eps: float | None = None) -> dict[str, torch.Tensor]:
    """Eq. 7: DRF = F(x) + w * Delta F (Eq. 5), w the shift weight; normalisation as in ``dr_fim_terms``."""
    return dr_fim_terms(f_clean, f_shift, shift_weight, normalize, candidates, eps)[1]
