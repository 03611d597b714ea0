"""The paper's (Rein's, mmseg's) training augmentation, deterministic per (seed, image index, visit).

Applied to the decoded RGB uint8 image and its trainId label, before normalisation and padding:

1. :func:`random_resize` -- scale the image so it fits a base size (long, short) times a ratio drawn from
   [0.5, 2.0], keeping its aspect ratio (mmseg ``RandomResize(scale, ratio_range, keep_ratio=True)``); bilinear for
   the image, nearest for the label. Rein's GTA config resizes to 1280x720 without the random ratio
   (``ratio_range=(1, 1)``); the paper's text and the issue ask for 0.5-2.0, the default here.
2. :func:`cat_max_crop` -- a random ``crop`` x ``crop`` window, drawn again (up to 10 times, as mmseg's
   ``RandomCrop(cat_max_ratio=0.75)``) while one class covers 75% or more of its labelled pixels.
3. horizontal flip with probability 0.5.
4. :func:`photometric_distortion` -- mmseg's ``PhotoMetricDistortion``: brightness +-32, contrast 0.5-1.5 (before
   or after the colour steps), saturation 0.5-1.5 and hue +-18 (OpenCV's 180-step hue circle), each applied with
   probability 0.5. HSV is computed in floating point (mmseg rounds through OpenCV's uint8 HSV), so the draws are
   mmseg's but pixel values may differ by a rounding step.

All draws come from one ``numpy.random.Generator`` seeded with ``keyed_seed(seed, index, "augment", visit)``, so
an image's augmentation does not depend on workers, batch size or ranks, and a resumed run repeats it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

from ..rng import keyed_seed
from .labels import IGNORE_INDEX


def random_resize(image: np.ndarray, label: np.ndarray, scale: tuple[int, int] | None,
                  ratio_range: tuple[float, float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Resize by a ratio r ~ U(ratio_range): to fit (long, short) = r * ``scale`` with the aspect ratio kept
    (mmcv's ``rescale_size``), or by r itself when ``scale`` is None."""
    ratio = rng.uniform(*ratio_range)
    height, width = label.shape
    if scale is None:
        factor = ratio
    else:
        long_side, short_side = max(scale) * ratio, min(scale) * ratio
        factor = min(long_side / max(height, width), short_side / min(height, width))
    size = (max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5)))
    if size == (height, width):
        return image, label
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    resized = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
    image = resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    classes = torch.from_numpy(np.array(label))[None, None].float()
    label = F.interpolate(classes, size=size, mode="nearest")[0, 0].long().numpy()
    return image, label


def cat_max_crop(label: np.ndarray, crop: int, cat_max_ratio: float, rng: np.random.Generator,
                 ignore_index: int = IGNORE_INDEX, tries: int = 10) -> tuple[int, int]:
    """(top, left) of a crop window; redrawn up to ``tries`` times while it holds fewer than 2 classes or one
    class has ``cat_max_ratio`` or more of its labelled pixels (mmseg's ``RandomCrop``)."""
    height, width = label.shape

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(height - crop, 0) + 1)), int(rng.integers(0, max(width - crop, 0) + 1))

    top, left = draw()
    if cat_max_ratio < 1:
        for _ in range(tries):
            window = label[top : top + crop, left : left + crop]
            counts = np.bincount(window[window != ignore_index].ravel())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return top, left


def adjust_brightness(image: np.ndarray, delta: float) -> np.ndarray:
    """clip(x + delta, 0, 255), truncated to uint8 (mmseg's ``convert``)."""
    return np.clip(image.astype(np.float32) + delta, 0, 255).astype(np.uint8)


def adjust_contrast(image: np.ndarray, alpha: float) -> np.ndarray:
    """clip(alpha x, 0, 255), truncated to uint8 (mmseg's ``convert``)."""
    return np.clip(image.astype(np.float32) * alpha, 0, 255).astype(np.uint8)


def _via_hsv(image: np.ndarray, change) -> np.ndarray:
    hsv = rgb_to_hsv(image.astype(np.float64) / 255.0)
    change(hsv)
    return np.clip(np.round(hsv_to_rgb(hsv) * 255.0), 0, 255).astype(np.uint8)


def adjust_saturation(image: np.ndarray, alpha: float) -> np.ndarray:
    """HSV saturation times ``alpha``, clipped to [0, 1]."""
    def change(hsv):
        hsv[..., 1] = np.clip(hsv[..., 1] * alpha, 0.0, 1.0)
    return _via_hsv(image, change)


def adjust_hue(image: np.ndarray, shift: int) -> np.ndarray:
    """Hue rotated by ``shift`` steps of OpenCV's 180-step circle (2 degrees each)."""
    def change(hsv):
        hsv[..., 0] = (hsv[..., 0] + shift / 180.0) % 1.0
    return _via_hsv(image, change)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion``, its draws in its order: brightness, contrast mode, [contrast],
    saturation, hue, [contrast]; each step with probability 0.5."""
    if rng.integers(2):
        image = adjust_brightness(image, rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        image = adjust_contrast(image, rng.uniform(*contrast_range))
    if rng.integers(2):
        image = adjust_saturation(image, rng.uniform(*saturation_range))
    if rng.integers(2):
        image = adjust_hue(image, int(rng.integers(-hue_delta, hue_delta)))  # numpy's randint: high exclusive
    if not contrast_first and rng.integers(2):
        image = adjust_contrast(image, rng.uniform(*contrast_range))
    return image


@dataclass(frozen=True)
class Augmentation:
    """Resize, class-balanced crop, flip and photometric distortion (the paper's / Rein's training pipeline)."""

    scale: tuple[int, int] | None = (1280, 720)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True

    def __call__(self, image: np.ndarray, label: np.ndarray, crop: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (h, w, 3), label (h, w)) with h, w <= crop (smaller only where the resized image is)."""
        image, label = random_resize(image, label, self.scale, self.ratio_range, rng)
        top, left = cat_max_crop(label, crop, self.cat_max_ratio, rng)
        image, label = image[top : top + crop, left : left + crop], label[top : top + crop, left : left + crop]
        if rng.uniform() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


AUGMENTATIONS = {"crop": None, "rein": Augmentation()}  # "crop": the dataset's own random crop and flip


def augment_rng(seed: int, index: int, visit: int = 0) -> np.random.Generator:
    """The generator of one image's augmentation draws on its ``visit``-th draw."""
    return np.random.default_rng(keyed_seed(seed, index, "augment", visit))
