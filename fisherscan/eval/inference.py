"""Inference of one image: resize, normalise, slide windows, logits at the label's size.

1. optional resize of the input (``resize``: an exact ``(width, height)``, or a scale factor; ``keep_ratio``
   fits the image into (width, height) the way mmcv does), bilinear, no antialias (as cv2.INTER_LINEAR);
2. normalisation with the backbone's ``pretrained_cfg`` mean/std (ImageNet's when absent), as in training;
3. slide inference (:func:`slide_logits`): crop x crop windows every ``stride`` pixels, the last one aligned to
   the border (mmseg's ``slide_inference``); a side shorter than the crop is one window of that side. Each window
   is padded bottom/right with 0 (the mean colour) to a multiple of the patch size, its patch-grid logits are
   upsampled bilinearly to the padded size and cropped back; overlapping windows are averaged (sum / count).
4. for scoring, the logits are upsampled bilinearly to the label's original size (mmseg's test pipeline: the
   label is never resized; ``score_at="resized"`` instead resizes the label, nearest, to the input size).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.labels import IMAGENET_MEAN, IMAGENET_STD
from ..errors import FisherscanError
from ..models.logits import upsample_logits

SCORE_AT = ("original", "resized")


def parse_resize(text: str | Sequence[int] | float | None) -> tuple[int, int] | float | None:
    """``"1024x512"`` -> (1024, 512) (width, height); ``"0.5"`` -> 0.5 (a scale factor); None/"" -> None."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, (tuple, list)):
        if len(text) == 2 and all(isinstance(v, int) and v > 0 for v in text):
            return int(text[0]), int(text[1])
        raise FisherscanError(f"--resize {text}: expected (width, height) of positive integers")
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text > 0 and math.isfinite(text):
            return float(text)
        raise FisherscanError(f"--resize {text}: a scale factor must be positive")
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if match:
        width, height = int(match.group(1)), int(match.group(2))
        if width > 0 and height > 0:
            return width, height
    else:
        try:
            factor = float(text)
        except ValueError:
            factor = math.nan
        if factor > 0 and math.isfinite(factor):
            return factor
    raise FisherscanError(f"--resize {text}: expected WIDTHxHEIGHT such as 1024x512, or a scale factor such as 0.5")


def resized_shape(height: int, width: int, resize, keep_ratio: bool = False) -> tuple[int, int]:
    """(height, width) of an image after ``resize`` (see :func:`parse_resize`).

    With ``keep_ratio`` a (width, height) target is a bound, as mmcv's ``rescale``: the scale is
    min(max(W, H) / long side, min(W, H) / short side) and sides are rounded half up.
    """
    resize = parse_resize(resize)
    if resize is None:
        return height, width
    if isinstance(resize, float):
        scale_h = scale_w = resize
    elif keep_ratio:
        target_w, target_h = resize
        long_side, short_side = max(target_w, target_h), min(target_w, target_h)
        scale_h = scale_w = min(long_side / max(height, width), short_side / min(height, width))
    else:
        return resize[1], resize[0]
    return max(1, int(height * scale_h + 0.5)), max(1, int(width * scale_w + 0.5))


def check_window(crop: int | None, stride: int) -> None:
    if crop is not None and crop < 0:
        raise FisherscanError(f"--crop {crop}: must be a positive window size (0: the whole image)")
    if stride < 1:
        raise FisherscanError(f"--stride {stride}: must be at least 1")
    if crop and stride > crop:
        raise FisherscanError(f"--stride {stride} is larger than --crop {crop}: windows would leave gaps; "
                              "use a stride of at most the crop")


def normalisation(segmenter: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone was trained with: its timm ``pretrained_cfg``, else ImageNet's (as in training)."""
    cfg = getattr(segmenter.backbone, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean and std:
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return IMAGENET_MEAN, IMAGENET_STD


def _patch_size(segmenter: torch.nn.Module) -> int:
    size = getattr(segmenter, "patch_size", 1)
    return int(size[0] if isinstance(size, (tuple, list)) else size)




def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows along one side (mmseg's slide_inference): every ``stride`` pixels, the last one
    moved back so that it ends at the border. ``window`` <= ``size``."""
    count = max(size - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride + window, size) - window, 0) for i in range(count)]


def slide_logits(segmenter: torch.nn.Module, image: torch.Tensor, crop: int | None, stride: int,
                 num_classes: int | None = None, *, batch_size: int = 4, amp: bool = False) -> torch.Tensor:
    """Logits (1, C, H, W), float32, of a normalised image (1, 3, H, W) by slide inference (see module doc).

    ``crop`` None or 0 is whole-image inference (one window). ``batch_size`` windows go through the model
    at once; ``amp`` runs the model under bf16 autocast (CUDA).
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"slide_logits takes one image (1, 3, H, W), got {tuple(image.shape)}")
    check_window(crop, stride)
    _, _, height, width = image.shape
    win_h, win_w = (height, width) if not crop else (min(crop, height), min(crop, width))
    patch = _patch_size(segmenter)
    pad_h, pad_w = -(-win_h // patch) * patch, -(-win_w // patch) * patch
    windows = [(y, x) for y in window_starts(height, win_h, stride) for x in window_starts(width, win_w, stride)]
    total: torch.Tensor | None = None
    count = torch.zeros(height, width, dtype=torch.float32, device=image.device)
    for first in range(0, len(windows), max(int(batch_size), 1)):
        chunk = windows[first: first + max(int(batch_size), 1)]
        batch = image.new_zeros(len(chunk), image.shape[1], pad_h, pad_w)
        for i, (y, x) in enumerate(chunk):
            batch[i, :, :win_h, :win_w] = image[0, :, y: y + win_h, x: x + win_w]
        with torch.no_grad(), torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = segmenter(batch)
        logits = upsample_logits(logits.float(), (pad_h, pad_w))[:, :, :win_h, :win_w]
        if total is None:
            classes = num_classes or logits.shape[1]
            if logits.shape[1] != classes:
                raise ValueError(f"the model gives {logits.shape[1]} classes, expected {classes}")
            total = torch.zeros(1, classes, height, width, dtype=torch.float32, device=image.device)
        for i, (y, x) in enumerate(chunk):
            total[0, :, y: y + win_h, x: x + win_w] += logits[i]
            count[y: y + win_h, x: x + win_w] += 1
    return total / count


def infer_logits(segmenter: torch.nn.Module, rgb: torch.Tensor | np.ndarray, *, crop: int | None, stride: int,
                 resize=None, keep_ratio: bool = False, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, out_size: tuple[int, int] | None = None,
                 device: torch.device | str | None = None, batch_size: int = 4,
                 amp: bool | None = None) -> torch.Tensor:
    """Logits (1, C, h, w) of an RGB uint8 image (H, W, 3): resize, normalise, slide, then upsample (bilinear)
    to ``out_size`` (default: the original H x W)."""
    if device is None:
        device = next(segmenter.parameters()).device
    device = torch.device(device)
    if mean is None or std is None:
        mean, std = normalisation(segmenter)
    rgb = torch.from_numpy(np.require(rgb, requirements='W')) if isinstance(rgb, np.ndarray) else rgb  # PIL: read-only
    height, width = int(rgb.shape[0]), int(rgb.shape[1])
    x = rgb.to(device).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    size = resized_shape(height, width, resize, keep_ratio)
    if size != (height, width):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    x = (x - m) / s
    logits = slide_logits(segmenter, x, crop, stride, batch_size=batch_size,
                          amp=device.type == "cuda" if amp is None else amp)
    return upsample_logits(logits, tuple(out_size) if out_size is not None else (height, width))
