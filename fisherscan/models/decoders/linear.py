"""The smallest head that makes a backbone's features a segmentation model."""

from __future__ import annotations

import torch
from torch import nn


class LinearDecoder(nn.Module):
    """Per-token LayerNorm + 1x1 classifier over patch tokens (B, N, D) -> logits (B, classes, h, w)."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        logits = self.classifier(self.norm(patch_tokens))
        return logits.transpose(1, 2).reshape(logits.shape[0], -1, *grid)
