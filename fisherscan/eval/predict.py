"""Prediction PNGs of plain images: palette images in the Cityscapes colours (pixel values are the trainIds)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from ..errors import FisherscanError
from ..io import atomic_target
from ..runtime import progress_bar
from .inference import check_window, infer_logits, normalisation, parse_resize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

#: Cityscapes colours of the 19 trainIds (cityscapesScripts' labels.py), in trainId order; 255 is black.
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


def palette_image(pred: np.ndarray) -> Image.Image:
    """A palette-mode PNG image: pixel values are the trainIds, shown in the Cityscapes colours (255 black)."""
    image = Image.fromarray(np.ascontiguousarray(pred, dtype=np.uint8))  # "L"; putpalette makes it "P"
    flat = [0] * (256 * 3)
    for k, colour in enumerate(CITYSCAPES_PALETTE):
        flat[3 * k: 3 * k + 3] = colour
    image.putpalette(flat)
    return image


def colorize(pred: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a trainId map; unknown ids (255) black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(CITYSCAPES_PALETTE)] = CITYSCAPES_PALETTE
    return lut[np.asarray(pred, dtype=np.uint8)]


def blend(rgb: np.ndarray, pred: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``alpha`` x colours + (1 - alpha) x image, rounded, uint8."""
    mixed = alpha * colorize(pred).astype(np.float32) + (1.0 - alpha) * np.asarray(rgb, dtype=np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def find_images(source: Path, exclude: Path | None = None) -> list[Path]:
    """One image file, or every png/jpg/jpeg under a folder (recursive, sorted), minus those under ``exclude``."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FisherscanError(f"--images {source}: no such folder or file; pass a folder of png/jpg images")
    excluded = exclude.resolve() if exclude is not None else None
    found = []
    for path in sorted(source.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if excluded is not None and path.resolve().is_relative_to(excluded):
            continue
        found.append(path)
    if not found:
        raise FisherscanError(f"--images {source}: no .png, .jpg or .jpeg images found (searched recursively)")
    return found


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - a damaged file is the user's to fix
        text = " ".join(str(exc).split())
        raise FisherscanError(f"{path}: cannot read the image ({type(exc).__name__}: {text}); replace or remove it") \
            from None


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp:
        image.save(tmp, format="PNG")


@dataclass
class PredictResult:
    images: int
    segmentations: list[Path]
    overlays: list[Path]


def predict_images(segmenter: torch.nn.Module, source: Path | str, out: Path | str, *, crop: int | None = 512,
                   stride: int = 341, resize=None, keep_ratio: bool = False, overlay: bool = False,
                   alpha: float = 0.5, device: torch.device | str | None = None, batch_size: int = 4,
                   amp: bool | None = None, console: Console | None = None) -> PredictResult:
    """Predict every image under ``source``: ``out/<relative path>.png`` is the segmentation at the input size (a
    palette PNG: values are trainIds, colours Cityscapes'); with ``overlay`` also ``<name>_overlay.png``, the
    colours blended on the image with weight ``alpha``."""
    check_window(crop, stride)
    resize = parse_resize(resize)
    if not 0.0 <= alpha <= 1.0:
        raise FisherscanError(f"--alpha {alpha}: must be between 0 and 1")
    source, out = Path(source), Path(out)
    if out.exists() and not out.is_dir():
        raise FisherscanError(f"--out {out} is a file; pass a folder for the predictions")
    files = find_images(source, exclude=out)
    base = source if source.is_dir() else source.parent
    device = torch.device(device) if device is not None else next(segmenter.parameters()).device
    segmenter.to(device).eval()
    mean, std = normalisation(segmenter)
    segs, overlays, taken = [], [], set()
    with progress_bar(console) as progress:
        task = progress.add_task("predict", total=len(files), rate="")
        start = time.perf_counter()
        for done, path in enumerate(files, 1):
            rgb = _read_image(path)
            logits = infer_logits(segmenter, rgb, crop=crop, stride=stride, resize=resize, keep_ratio=keep_ratio,
                                  mean=mean, std=std, device=device, batch_size=batch_size, amp=amp)
            pred = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
            rel = path.relative_to(base)
            target = out / rel.with_suffix(".png")
            if target in taken:  # a.jpg beside a.png
                target = out / rel.with_name(f"{rel.stem}_{rel.suffix.lstrip('.').lower()}.png")
            taken.add(target)
            _save_png(palette_image(pred), target)
            segs.append(target)
            if overlay:
                blended = target.with_name(f"{target.stem}_overlay.png")
                _save_png(Image.fromarray(blend(rgb, pred, alpha)), blended)
                overlays.append(blended)
            progress.update(task, advance=1, rate=f"{done / max(time.perf_counter() - start, 1e-9):.2f} img/s")
    return PredictResult(len(files), segs, overlays)
