"""Per-image squared gradients (Eq. 9) by torch.func: vmap of grad over the images of a batch.

The reference path (``engine="vmap"``), and the hook engine's exact fallback for parameters no rule covers. Chunks
of ``chunk_size`` images bound the memory; the squares go into fp32 sums.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..models.logits import upsample_logits
from .loss import labelled_loss
from .perturb import TokenShift


def add_sums(total: dict[str, torch.Tensor] | None, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``total + sums`` by name (``sums`` itself when ``total`` is None): how label draws' sums are added, in order."""
    return sums if total is None else {n: total[n] + sums[n] for n in total}


def vmap_squared_gradient_sum(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                              uniforms: torch.Tensor | None = None, *, ignore_index: int = 255,
                              shift: TokenShift | None = None,
                              shift_eps: tuple[torch.Tensor, ...] | None = None,
                              chunk_size: int = 8, autocast_dtype: torch.dtype | None = None
                              ) -> dict[str, torch.Tensor]:
    """``squared_gradient_sum`` by torch.func: vmap of grad over the images, in chunks, for the parameters
    ``params`` (name -> parameter) only; the others stay fixed. The reference path, and the hook engine's
    fallback for parameters no rule covers."""
    params = {name: p.detach() for name, p in params.items()}
    device_type = x.device.type
    sampled = uniforms is not None

    def loss_of_one(params, x1, y1, u1, *draws1):
        if shift is not None:
            shift.eps = tuple(d.unsqueeze(0) for d in draws1)
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = functional_call(model, params, (x1.unsqueeze(0),))
        logits = upsample_logits(logits.float(), tuple(y1.shape[-2:]))
        return labelled_loss(logits, y1.unsqueeze(0), u1.unsqueeze(0) if sampled else None, ignore_index)

    batch = x.shape[0]
    if not sampled:
        uniforms = torch.zeros(y.shape)
    if shift_eps is None:
        shift_eps = (torch.zeros(batch, 1), torch.zeros(batch, 1))
    # randomness allowed: an eval-mode model may still draw (transformers < 5.x Mask2Former draws its layer-drop
    # coin even in eval mode, without using it)
    per_image_grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0, 0, *[0] * len(shift_eps)), randomness="different")
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


class VmapEngine:
    """``vmap_squared_gradient_sum`` for the scored ``params`` of ``model``, with the hook engine's interface."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], chunk_size: int = 8):
        self.model, self.params, self.chunk_size = model, dict(params), max(1, int(chunk_size))

    def squared_gradient_sum(self, x: torch.Tensor, y: torch.Tensor, uniforms: torch.Tensor | None = None,
                             **options) -> dict[str, torch.Tensor]:
        return vmap_squared_gradient_sum(self.model, self.params, x, y, uniforms, chunk_size=self.chunk_size,
                                         **options)

    def squared_gradient_sum_over_draws(self, x: torch.Tensor, y: torch.Tensor,
                                        draws: Sequence[torch.Tensor | None], **options) -> dict[str, torch.Tensor]:
        """The sum over the label draws of ``squared_gradient_sum``, added in draw order (a map of its own per
        draw: torch.func shares no forward between them)."""
        total = None
        for uniforms in draws:
            total = add_sums(total, self.squared_gradient_sum(x, y, uniforms, **options))
        return total
