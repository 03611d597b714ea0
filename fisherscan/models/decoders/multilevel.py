"""A simple feature pyramid over 4 blocks' patch-token maps and a light fusion head.

Strides 4, 8, 16, 32 for patch 16 (x4, x2, x1, x0.5 of the patch grid, as ViTDet/Rein), each level projected to
128 channels, upsampled to the finest level and summed, then a 3x3 conv + GroupNorm + GELU fusion and a 1x1
classifier; logits at 4x the grid.
"""

from __future__ import annotations

import torch
from torch import nn


class MultiLevelDecoder(nn.Module):
    """The ``multilevel`` decoder on the maps (B, D, h, w) of the blocks ``blocks``."""

    def __init__(self, embed_dim: int, num_classes: int, blocks: list[int], channels: int = 128):
        super().__init__()
        self.blocks = list(blocks)
        self.resample = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2), nn.GELU(),
                          nn.ConvTranspose2d(embed_dim, channels, 2, stride=2)),  # x4
            nn.ConvTranspose2d(embed_dim, channels, 2, stride=2),  # x2
            nn.Conv2d(embed_dim, channels, 1),  # x1
            nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(embed_dim, channels, 1)),  # x0.5
        ])
        self.fuse = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(8, channels), nn.GELU())
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        levels = [resample(m) for resample, m in zip(self.resample, maps)]
        size = levels[0].shape[-2:]
        fused = sum(nn.functional.interpolate(level, size=size, mode="bilinear", align_corners=False)
                    if level.shape[-2:] != size else level for level in levels)
        return self.classifier(self.fuse(fused))
