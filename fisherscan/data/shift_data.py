"""Real images of another style for F(x') (``score --shift-data DIR``): the same scenes, or unlabelled images.

Paired mode: every source image has an image with the same path relative to its data folder in DIR (that scene
rendered or photographed in the other style, the same size). It is cropped as its source image is (the same
window, keyed on (seed, image index)) and uses the source image's label map and label draws. Unpaired mode (no
source image has such a partner): all png/jpg images under DIR, in a seeded order, one per source image (cycled
when DIR has fewer), each cropped on its own and scored with labels sampled from the model everywhere inside the
image. Some partners present and some missing is an error: the mode would be a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import FisherscanError
from .datasets import SegmentationDataset, validate_pairs
from .layouts import Pair

SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ShiftImages:
    """The images of ``--shift-data``: ``pairs[i]`` is source image i's partner (paired), or one of the
    ``count`` images of DIR (unpaired)."""

    mode: str  # "paired" or "unpaired"
    pairs: list[Pair]
    count: int  # images found in DIR


def _images_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())


def find_shift_images(shift_root: Path, source_root: Path, source_pairs: Sequence[Pair], seed: int) -> ShiftImages:
    """Pair the source images with the images of ``shift_root`` (see the module doc); one-line errors for a
    missing, empty or unreadable folder, a half-paired one, or a partner of another size."""
    shift_root, source_root = Path(shift_root), Path(source_root)
    if not shift_root.is_dir():
        raise FisherscanError(f"--shift-data {shift_root}: folder not found; pass a folder of images of the other "
                              "style")
    found = _images_under(shift_root)
    if not found:
        raise FisherscanError(f"--shift-data {shift_root}: no png/jpg images in it; pass a folder of images of the "
                              "other style")
    partners = [shift_root / pair.image.relative_to(source_root) for pair in source_pairs]
    present = [p.is_file() for p in partners]
    if all(present):
        pairs = [Pair(partner, pair.label, pair.label_map) for partner, pair in zip(partners, source_pairs)]
        validate_pairs(pairs)  # each partner has its source label's size
        return ShiftImages("paired", pairs, len(found))
    if any(present):
        missing = partners[present.index(False)]
        raise FisherscanError(f"--shift-data {shift_root}: holds partners of some source images but not {missing}; "
                              "give every source image its partner (paired) or none (unpaired)")
    order = np.random.default_rng(seed).permutation(len(found))
    pairs = [Pair(found[order[i % len(found)]], None, None) for i in range(len(source_pairs))]
    validate_pairs(pairs[:len(found)])
    return ShiftImages("unpaired", pairs, len(found))


class ShiftedDataset(torch.utils.data.Dataset):
    """(x, y, index, x', y') per source image: the source item and its partner's, cropped alike when paired (the
    same index, seed and crop), on its own when unpaired (y' then marks the image's pixels valid)."""

    def __init__(self, source: SegmentationDataset, shift: ShiftImages):
        self.source, self.mode = source, shift.mode
        self.shift = SegmentationDataset(shift.pairs, source.crop, pad_multiple=source.size, mean=source.mean,
                                         std=source.std, seed=source.seed, augment=source.augment)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item):
        x, y, i = self.source[item]
        x_shift, y_shift, _ = self.shift[i]  # paired: the source's label map in the source's crop
        return x, y, i, x_shift, y_shift
