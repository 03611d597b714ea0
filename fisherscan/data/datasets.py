"""Segmentation data: decode and check image/label pairs, crop them into a dataset, and load them in order.

Every label ends as the 19 Cityscapes trainIds with 255 = ignore (``labels``). Images are never rescaled: an item
is a random (or, without augmentation, top-left) crop, padded where the image is smaller than the crop; or, with
an ``Augmentation`` (``augment``), Rein's resize, class-balanced crop, flip and photometric distortion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import FisherscanError
from ..rng import keyed_generator
from .augment import augment_rng
from .labels import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES, label_lut
from .layouts import Pair


def _one_line(exc: Exception) -> str:
    """An exception as one line of text."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unreadable(path: Path, exc: Exception) -> FisherscanError:
    return FisherscanError(f"{path}: cannot read the image ({_one_line(exc)}); replace or remove this file")


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:
        raise _unreadable(path, exc) from None


def _check_same_size(pair: Pair, image_size: tuple[int, int], label_size: tuple[int, int]) -> None:
    if image_size != label_size:
        (iw, ih), (lw, lh) = image_size, label_size
        raise FisherscanError(
            f"{pair.image} is {iw}x{ih} but its label {pair.label} is {lw}x{lh} (width x height); "
            "an image and its label must have the same size: fix or remove this pair"
        )


def validate_pairs(pairs: Sequence[Pair]) -> None:
    """Open every image and label header (no pixel decoding): unreadable files and size mismatches raise."""
    for pair in pairs:
        size = _header_size(pair.image)
        _check_same_size(pair, size, _header_size(pair.label) if pair.label is not None else size)


def check_pairs(pairs: Sequence[Pair], skip_bad: bool = False) -> tuple[list[Pair], list[dict]]:
    """(usable pairs in their order, skipped pairs) -- the ``--skip-bad`` decision, made once before a run.

    Without ``skip_bad`` this is :func:`validate_pairs` (headers only; the first bad pair raises, and a file whose
    pixels are corrupt still raises when it is decoded). With ``skip_bad`` every pair is decoded in full
    (:func:`load_pair`: unreadable or corrupt files, size mismatches, label values outside the trainIds) and the
    bad ones are left out, each listed as ``{"image", "label", "reason"}``; the set is fixed up front, so a resumed
    run skips the same pairs. It is an error when no pair is left.
    """
    if not skip_bad:
        validate_pairs(pairs)
        return list(pairs), []
    kept, skipped = [], []
    for pair in pairs:
        try:
            load_pair(pair)
        except FisherscanError as error:
            skipped.append({"image": str(pair.image), "label": str(pair.label), "reason": str(error)})
        else:
            kept.append(pair)
    if not kept:
        raise FisherscanError(f"--skip-bad: all {len(skipped)} image/label pairs are unreadable or invalid (first: "
                              f"{skipped[0]['reason']}); fix the data set")
    return kept, skipped


def skipped_note(skipped: Sequence[dict], total: int) -> str:
    """One line for the printed summary: how many pairs --skip-bad left out, and the first few images."""
    shown = ", ".join(Path(s["image"]).name for s in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    return (f"--skip-bad: {len(skipped)} of {total} image/label pairs were unreadable or invalid and skipped "
            f"({shown}; all listed in the metadata)")


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:
        raise _unreadable(path, exc) from None


def _read_label(path: Path) -> np.ndarray:
    """The raw label values of a single-channel label image, as a 2-D integer array."""
    try:
        with Image.open(path) as im:
            bands = im.getbands()
            array = np.asarray(im)
    except Exception as exc:
        raise _unreadable(path, exc) from None
    if len(bands) != 1:
        raise FisherscanError(
            f"{path}: label has {len(bands)} channels ({''.join(bands)}); expected a single-channel PNG of class ids "
            "(convert colour-coded labels to ids first)"
        )
    return array


def _bad_values_error(pair: Pair, values: np.ndarray) -> FisherscanError:
    shown = ", ".join(str(int(v)) for v in values[:10]) + (", ..." if len(values) > 10 else "")
    mapped = f" after the {pair.label_map!r} label map" if pair.label_map else ""
    return FisherscanError(
        f"{pair.label}: label values {shown}{mapped} are not trainIds (0-18, 255 = ignore); pass --layout with the "
        "right label map (raw Cityscapes/GTA5 labelIds: cityscapes or gta5, Mapillary v1.2 ids: mapillary)"
    )


def load_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 (H, W, 3), trainId label int64 (H, W)) of one pair, the label map applied and checked. An
    unlabelled image (``pair.label`` None) gets label 0 everywhere: every pixel valid, for sampled labels."""
    image = _read_rgb(pair.image)
    if pair.label is None:
        return image, np.zeros(image.shape[:2], dtype=np.int64)
    raw = _read_label(pair.label)
    _check_same_size(pair, (image.shape[1], image.shape[0]), (raw.shape[1], raw.shape[0]))
    if raw.dtype != np.uint8:
        raw = raw.astype(np.int64)
        out_of_byte = np.unique(raw[(raw < 0) | (raw > 255)])
        if out_of_byte.size:
            raise _bad_values_error(pair, out_of_byte)
    label = label_lut(pair.label_map)[raw]
    counts = np.bincount(label.ravel(), minlength=256)
    bad = np.flatnonzero(counts[NUM_CLASSES:IGNORE_INDEX]) + NUM_CLASSES
    if bad.size:
        raise _bad_values_error(pair, bad)
    return image, label.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Dataset and loader


def padded_size(crop: int, pad_multiple: int) -> int:
    """The smallest multiple of ``pad_multiple`` that is >= ``crop``."""
    if pad_multiple < 1:
        raise FisherscanError(f"pad multiple {pad_multiple} is invalid; it must be at least 1")
    return -(-crop // pad_multiple) * pad_multiple


class SegmentationDataset(torch.utils.data.Dataset):
    """Items (image float32 (3, S, S), label int64 (S, S), index) with S = padded_size(crop, pad_multiple).

    Each item is a crop x crop window of the unscaled image: random position and horizontal flip drawn from
    ``keyed_generator(seed, index, "crop")`` (so independent of workers and batch size), or the top-left
    window without flip when ``augment`` is False. A side smaller than ``crop`` is padded first (image with
    the mean colour, i.e. 0 after normalisation; label with 255). The window is normalised with
    (x / 255 - mean) / std and then padded bottom/right to S with 0 (image) and 255 (label). With an
    ``augmentation`` (``fisherscan.data.augment.Augmentation``) it replaces the window and flip: resize, class-balanced
    crop, flip and photometric distortion, drawn from ``augment_rng(seed, index, visit)``.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        crop: int,
        *,
        pad_multiple: int = 1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
        augment: bool = True,
        augmentation: Callable | None = None,
    ):
        if crop < 1:
            raise FisherscanError(f"crop size {crop} is invalid; pass a crop of at least 1 pixel")
        self.pairs = list(pairs)
        self.crop = int(crop)
        self.size = padded_size(self.crop, pad_multiple)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.seed = int(seed)
        self.augment = augment
        self.augmentation = augmentation if augment else None

    def __len__(self) -> int:
        return len(self.pairs)

    def _window(self, index: int, height: int, width: int, visit: int = 0) -> tuple[int, int, bool]:
        """(top, left, flip) of the crop window in an image of height x width (padded up to the crop)."""
        if not self.augment:
            return 0, 0, False
        gen = keyed_generator(self.seed, index, "crop", visit)
        top = int(torch.randint(0, max(height - self.crop, 0) + 1, (1,), generator=gen))
        left = int(torch.randint(0, max(width - self.crop, 0) + 1, (1,), generator=gen))
        flip = bool(torch.rand(1, generator=gen) < 0.5)
        return top, left, flip

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Item ``i``, or ``(i, visit)``: the visit-th time image i is drawn (training epochs crop afresh)."""
        i, visit = item if isinstance(item, tuple) else (item, 0)
        image, label = load_pair(self.pairs[i])
        if self.augmentation is not None:
            image, label = self.augmentation(image, label, self.crop, augment_rng(self.seed, i, visit))
            top, left, flip = 0, 0, False
        else:
            top, left, flip = self._window(i, *label.shape, visit=visit)
        image = image[top : top + self.crop, left : left + self.crop]
        label = label[top : top + self.crop, left : left + self.crop]
        h, w = label.shape

        window_image = np.zeros((self.crop, self.crop, 3), dtype=np.float32)
        window_image[:h, :w] = (image.astype(np.float32) / 255.0 - self.mean) / self.std
        window_label = np.full((self.crop, self.crop), IGNORE_INDEX, dtype=np.int64)
        window_label[:h, :w] = label
        if flip:
            window_image, window_label = window_image[:, ::-1], window_label[:, ::-1]

        out_image = np.zeros((self.size, self.size, 3), dtype=np.float32)
        out_image[: self.crop, : self.crop] = window_image
        out_label = np.full((self.size, self.size), IGNORE_INDEX, dtype=np.int64)
        out_label[: self.crop, : self.crop] = window_label
        return torch.from_numpy(out_image.transpose(2, 0, 1).copy()), torch.from_numpy(out_label), i


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader in dataset order (no shuffle, last partial batch kept, no persistent workers or pinning)."""
    if batch_size < 1:
        raise FisherscanError(f"batch size {batch_size} is invalid; pass a batch size of at least 1")
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=max(int(workers), 0),
        drop_last=False,
        persistent_workers=False,
        pin_memory=False,
    )


class EpochSampler(torch.utils.data.Sampler):
    """Training order: a seeded permutation per epoch, yielding (index, epoch) so crops differ between epochs.

    It starts at draw ``start`` (= steps done x global batch size) so a resumed run sees exactly the remaining
    draws. With ``shard=(rank, world)`` a rank takes the draws rank, rank + world, ... of that one sequence.
    """

    def __init__(self, size: int, seed: int, start: int = 0, total: int | None = None,
                 shard: tuple[int, int] = (0, 1)):
        self.size, self.seed, self.start = size, seed, start
        self.total = total
        self.rank, self.world = shard

    def order(self, epoch: int) -> list[int]:
        return torch.randperm(self.size, generator=keyed_generator(self.seed, epoch, "crop", 1)).tolist()

    def __iter__(self):
        draw, epoch, order = self.start, -1, []
        while self.total is None or draw < self.total:
            if draw // self.size != epoch:
                epoch = draw // self.size
                order = self.order(epoch)
            if draw % self.world == self.rank:
                yield (order[draw % self.size], epoch)
            draw += 1

    def __len__(self) -> int:
        return len(range(self.start + (self.rank - self.start) % self.world, self.total or 0, self.world))
