"""Algorithm 1 step 1: the decoder trained on the frozen backbone's features before any Fisher is estimated."""

from __future__ import annotations

import itertools

import torch
from rich.progress import Progress

from ..models.segmenter import Segmenter, float_features


def warm_up_decoder(segmenter: Segmenter, loader, steps: int, lr: float, device: torch.device,
                    autocast: bool, progress: Progress, reuse_limit: int = 256) -> float:
    """Algorithm 1 step 1: train the decoder with the backbone frozen (its training loss: mean pixel
    cross-entropy, Eq. 1, or Mask2Former's matched set loss).

    The crops are the same on every pass and the backbone is frozen, so when the warm-up passes over a small
    data set (at most ``reuse_limit`` images) more than once, the backbone features of the first pass are kept.
    Only the decoder requires grad meanwhile; every flag is as it was afterwards.
    """
    flags = {p: p.requires_grad for p in segmenter.parameters()}
    try:
        for p in segmenter.backbone.parameters():
            p.requires_grad_(False)
        for p in segmenter.decoder.parameters():
            p.requires_grad_(True)
        return _train_decoder(segmenter, loader, steps, lr, device, autocast, progress, reuse_limit)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _train_decoder(segmenter: Segmenter, loader, steps: int, lr: float, device: torch.device, autocast: bool,
                   progress: Progress, reuse_limit: int) -> float:
    optimizer = torch.optim.AdamW(segmenter.decoder.parameters(), lr=lr, weight_decay=0.0)
    task = progress.add_task("warm-up decoder", total=steps, rate="")
    loss_value = float("nan")
    per_pass = len(loader)
    reuse = steps > per_pass and len(loader.dataset) <= reuse_limit
    kept: list[tuple[tuple, torch.Tensor]] = []
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for step in range(steps):
        if reuse and step >= per_pass:
            features, y = kept[step % per_pass]
        else:
            x, y, _ = next(batches)
            x, y = x.to(device), y.to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                features = segmenter.features(x)
            if reuse:
                kept.append((features, y))
        loss = segmenter.loss(float_features(features), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        progress.update(task, advance=1, rate=f"loss {loss_value:.3f}")
    return loss_value
