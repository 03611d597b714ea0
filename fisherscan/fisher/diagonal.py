"""Diagonal Fisher information of a segmentation model (Eq. 4, 8, 9).

Eq. 9:  F_n = 1/N sum_i E_{y_i ~ p_theta(y | x_i)} (d loss(f(x_i), y_i) / d theta_n)^2

The per-image loss is Eq. 9's (``fisherscan.fisher.loss``: the SUM of pixel cross-entropy over the image's
valid pixels). The square is taken of each image's own gradient -- the square of a batch-mean gradient is not
Eq. 9. Per-image gradients come, by default, from the hook engine (``fisherscan.fisher.engine``): one batched
forward and backward with per-layer rules, at about the cost of a training step; ``engine="vmap"`` keeps the
reference path, one vectorised map over the batch (``fisherscan.fisher.vmap``). Both work in chunks that bound
memory and add the squares into fp32 accumulators. ``make_engine`` builds one for a whole run; the accumulator
is one object whose state can be saved and restored.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .engine import HookEngine
from .loss import LABEL_MODES, trainable_parameters
from .perturb import TokenShift
from .vmap import VmapEngine

ENGINES = ("hooks", "vmap")


def make_engine(model: nn.Module, engine: str = "hooks", chunk_size: int = 8,
                params: dict[str, torch.Tensor] | None = None, fused: bool = False) -> HookEngine | VmapEngine:
    """The per-image gradient engine for ``params`` (default: every parameter with requires_grad) of ``model``;
    build it once and call ``squared_gradient_sum`` per batch. ``fused`` (hooks only, experimental): Linear
    weights by the fused Triton kernel of ``fisherscan.fisher.fused`` where it can run."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    params = trainable_parameters(model) if params is None else params
    if engine == "hooks":
        return HookEngine(model, params, chunk_size, fused=fused)
    return VmapEngine(model, params, chunk_size)


def squared_gradient_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, uniforms: torch.Tensor | None = None,
                         *, ignore_index: int = 255, shift: TokenShift | None = None,
                         shift_eps: tuple[torch.Tensor, ...] | None = None,
                         chunk_size: int = 8, autocast_dtype: torch.dtype | None = None,
                         engine: str = "hooks") -> dict[str, torch.Tensor]:
    """sum_i (d loss_i / d theta)^2 over the images of one batch, fp32, for every parameter with requires_grad.

    ``uniforms`` (B, H, W) in [0, 1) selects sampled labels (Eq. 9's expectation by one draw per pixel);
    None uses ``y``. With ``shift`` (Eq. 6 at a block input), ``shift_eps`` holds each image's eps draws.
    ``engine="hooks"`` (default): one batched forward and backward with per-layer rules; ``"vmap"``: torch.func
    vmap(grad). Both are exact and agree. One call builds one engine; ``make_engine`` keeps one for many batches.
    """
    return make_engine(model, engine, chunk_size).squared_gradient_sum(
        x, y, uniforms, ignore_index=ignore_index, shift=shift, shift_eps=shift_eps, autocast_dtype=autocast_dtype)


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
                    labels: str = "sampled", label_draws: int = 1, ignore_index: int = 255,
                    generator: torch.Generator | None = None, engine: str = "hooks") -> dict[str, torch.Tensor]:
    """Exact diagonal Fisher (Eq. 8, 9) of every parameter with requires_grad, float32, by name.

    ``model(x)`` returns logits (B, C, h, w); ``batches`` yields (x, y) with y (B, H, W) int64. The value is
    (1/N) sum over images of the squared gradient of that image's summed pixel loss. With
    ``labels="sampled"`` each image's label map is drawn from softmax(logits) with uniforms drawn from
    ``generator`` (``torch.rand(y.shape)`` per batch and draw, on the CPU), and Eq. 9's expectation over y is the
    mean over ``label_draws`` draws (one forward per batch serves them all; ``fisherscan score`` takes 2);
    ``labels="given"`` uses y. Put the model in eval mode first (dropout and drop-path would make the gradients
    random). ``engine`` as in ``squared_gradient_sum``.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, not {labels!r}")
    if label_draws < 1 or (labels == "given" and label_draws != 1):
        raise ValueError(f"label_draws must be 1 with given labels and at least 1 otherwise, not {label_draws}")
    estimator = make_engine(model, engine)
    accumulator = FisherAccumulator({name: p.shape for name, p in estimator.params.items()})
    for x, y in batches:
        draws = ([torch.rand(y.shape, generator=generator) for _ in range(label_draws)] if labels == "sampled"
                 else [None])
        sums = estimator.squared_gradient_sum_over_draws(x, y, draws, ignore_index=ignore_index)
        accumulator.add({n: v / label_draws for n, v in sums.items()}, x.shape[0])
    return accumulator.fisher()
