"""Which backbone blocks a multi-level decoder reads."""

from __future__ import annotations

REIN_BLOCKS = {24: [7, 11, 15, 23]}  # Rein's out_indices for ViT-L (DINOv2-L, EVA02-L, CLIP-L)


def evenly_spaced_blocks(depth: int, count: int = 4) -> list[int]:
    """Block indices at the ends of ``count`` equal stages: depth 12 -> [2, 5, 8, 11], 24 -> [5, 11, 17, 23]."""
    return [depth * (i + 1) // count - 1 for i in range(count)]


def rein_blocks(depth: int) -> list[int]:
    """The blocks Mask2Former's neck reads: Rein's [7, 11, 15, 23] at depth 24, else the ends of 4 equal stages."""
    return list(REIN_BLOCKS.get(depth) or evenly_spaced_blocks(depth))
