"""The per-image loss of Eq. 9 and its labels: what every Fisher estimator differentiates.

The per-image loss is the SUM of pixel cross-entropy over the image's valid pixels (label != ignore_index; padding
carries the ignore label), with logits upsampled bilinearly to the label size (``fisherscan.models.logits``).
"sampled" labels (the true Fisher) draw y pixel-wise from softmax(logits) by inverse-CDF sampling of given
uniforms, only at valid pixels; "given" labels (the empirical Fisher) use the label map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LABEL_MODES = ("sampled", "given")


def sample_labels(logits: torch.Tensor, uniforms: torch.Tensor, valid: torch.Tensor,
                  ignore_index: int = 255) -> torch.Tensor:
    """y ~ softmax(logits) per pixel by inverse CDF: the first class whose cumulative probability exceeds u.

    logits (B, C, H, W), uniforms and valid (B, H, W); pixels that are not valid get ``ignore_index``.
    """
    cdf = torch.softmax(logits.detach().float(), dim=1).cumsum(dim=1)
    drawn = (cdf < uniforms.unsqueeze(1)).sum(dim=1).clamp(max=logits.shape[1] - 1)
    return torch.where(valid, drawn, torch.full_like(drawn, ignore_index))


def image_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """The per-image loss of Eq. 9: SUM over valid pixels of the pixel cross-entropy (summed over the batch)."""
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")


def labelled_loss(logits: torch.Tensor, y: torch.Tensor, uniforms: torch.Tensor | None,
                  ignore_index: int = 255) -> torch.Tensor:
    """Eq. 9's loss of upsampled ``logits`` against ``y`` ("given"), or against labels drawn with ``uniforms``
    where ``y`` is valid ("sampled")."""
    target = y.to(logits.device)
    if uniforms is not None:
        target = sample_labels(logits, uniforms.to(logits.device), target != ignore_index, ignore_index)
    return image_loss(logits, target, ignore_index)


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
