"""Evaluation and prediction of a segmenter: slide inference, per-dataset confusion matrices, mIoU tables, PNGs.

Protocol (DATASETS.md): one confusion matrix per data set over all its images (19 classes, 255 ignored), per
class IoU and mIoU over the classes present (``fisherscan.metrics``); ACDC per condition and their mean; the
headline is the plain mean of the per-dataset mIoUs.

Inference of one image (:func:`infer_logits`):

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

import contextlib

import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from . import __version__
from .data import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES, Pair, check_pairs, find_pairs, load_pair, \
    select_images
from .errors import FisherscanError
from .fisher import upsample_logits
from .metrics import CITYSCAPES_CLASSES, ConfusionAccumulator, iou_from_confusion, mean_iou
from .scores import atomic_target

SCORE_AT = ("original", "resized")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

#: Cityscapes colours of the 19 trainIds (cityscapesScripts' labels.py), in trainId order; 255 is black.
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


# ----------------------------------------------------------------------------------------------------------
# Options



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


# ----------------------------------------------------------------------------------------------------------
# Inference


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


# ----------------------------------------------------------------------------------------------------------
# Results


@dataclass
class DatasetResult:
    """One evaluated data set (or one ACDC condition). IoU values are fractions in [0, 1], NaN = class absent."""

    name: str
    path: str
    layout: str
    split: str
    images: int
    confusion: np.ndarray  # (19, 19) int64, [label, prediction]
    iou: np.ndarray  # (19,) float64
    miou: float
    conditions: list["DatasetResult"] = field(default_factory=list)  # ACDC: one per condition; iou/miou = their mean

    def to_dict(self) -> dict:
        out = {"name": self.name, "path": self.path, "layout": self.layout, "split": self.split,
               "images": self.images, "miou": _percent(self.miou),
               "iou": {c: _percent(v) for c, v in zip(CITYSCAPES_CLASSES, self.iou)},
               "confusion": self.confusion.tolist()}
        if self.conditions:
            out["miou_is"] = "mean of the conditions' mIoUs"
            out["conditions"] = [c.to_dict() for c in self.conditions]
        return out


@dataclass
class EvalResult:
    """Per-dataset results; ``miou`` is the headline: the plain mean of the datasets' mIoUs (fraction)."""

    datasets: list[DatasetResult]
    options: dict = field(default_factory=dict)

    @property
    def miou(self) -> float:
        values = [d.miou for d in self.datasets if not math.isnan(d.miou)]
        return float(np.mean(values)) if values else math.nan

    def columns(self) -> list[DatasetResult]:
        """Table columns in order: each data set, preceded by its ACDC conditions when it has them."""
        return [c for d in self.datasets for c in (*d.conditions, d)]

    def miou_by_dataset(self) -> dict[str, float]:
        """{column name: mIoU (fraction)} for every column, ACDC conditions included, plus ``"mean"``."""
        return {**{c.name: c.miou for c in self.columns()}, "mean": self.miou}

    def frame(self):
        """pandas DataFrame in percent: rows the 19 classes and ``mIoU``, columns the data sets and ``mean``."""
        import pandas as pd

        data = {}
        for column in self.columns():
            data[column.name] = [_percent(v) for v in column.iou] + [_percent(column.miou)]
        data["mean"] = [_percent(v) for v in _nanmean_rows([d.iou for d in self.datasets])] + [_percent(self.miou)]
        frame = pd.DataFrame(data, index=[*CITYSCAPES_CLASSES, "mIoU"], dtype=float)
        frame.index.name = "class"
        return frame

    def to_dict(self) -> dict:
        return {"kind": "fisherscan-eval", "fisherscan_version": __version__, "unit": "percent (IoU x 100)",
                "miou": _percent(self.miou), "miou_is": "plain mean of the per-dataset mIoUs",
                "classes": list(CITYSCAPES_CLASSES), "options": self.options,
                "datasets": [d.to_dict() for d in self.datasets]}


def _percent(value: float) -> float | None:
    return None if value is None or math.isnan(float(value)) else 100.0 * float(value)


def _nanmean_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        return np.nanmean(np.stack(rows), axis=0) if rows else np.full(NUM_CLASSES, np.nan)


def _result(name: str, path: str, layout: str, split: str, acc: ConfusionAccumulator) -> DatasetResult:
    conf = acc.matrix
    iou = iou_from_confusion(conf)
    return DatasetResult(name, path, layout, split, acc.images, conf, iou, mean_iou(iou))


def _mean_of_conditions(name: str, path: str, layout: str, split: str, parts: list[DatasetResult]) -> DatasetResult:
    mious = [p.miou for p in parts if not math.isnan(p.miou)]
    return DatasetResult(name, path, layout, split, sum(p.images for p in parts),
                         np.sum([p.confusion for p in parts], axis=0), _nanmean_rows([p.iou for p in parts]),
                         float(np.mean(mious)) if mious else math.nan, conditions=parts)


def results_table(result: EvalResult, title: str | None = None) -> Table:
    """The paper's Table 2 layout: classes x data sets (IoU %), the mean over data sets, and an mIoU row."""
    from rich.markup import escape

    frame = result.frame()
    table = Table(title=escape(title) if title else None, show_lines=False)
    table.add_column("class")
    for column in frame.columns:
        table.add_column(escape(str(column)), justify="right", style="bold" if column == "mean" else None)
    for name, row in frame.iterrows():
        cells = ["-" if (v is None or math.isnan(v)) else f"{v:.1f}" for v in row]
        table.add_row(escape(str(name)), *cells, end_section=name == CITYSCAPES_CLASSES[-1],
                      style="bold" if name == "mIoU" else None)
    return table


def save_results(result: EvalResult, folder: Path | str, stem: str = "eval") -> tuple[Path, Path]:
    """Write ``<folder>/<stem>.json`` (everything, confusion matrices included) and ``<stem>.csv`` (the table),
    atomically; returns their paths."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FisherscanError(f"--out {folder} is a file; pass a folder for the evaluation results")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FisherscanError(f"--out {folder}: cannot create the folder ({error.strerror}); choose another --out") \
            from None
    json_path, csv_path = folder / f"{stem}.json", folder / f"{stem}.csv"
    with atomic_target(json_path) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False))
    with atomic_target(csv_path) as tmp:
        result.frame().to_csv(tmp, float_format="%.4f")
    return json_path, csv_path


# ----------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalDataset:
    """A data set ready for evaluation: its pairs found, subset drawn and headers validated."""

    name: str
    path: Path
    layout: str
    split: str
    pairs: list[Pair]
    skipped: list[dict] = field(default_factory=list)  # --skip-bad: pairs left out, with the reason


def prepare_datasets(data_dirs: Sequence[Path | str], layout: str | Sequence[str] = "auto", split: str = "val",
                     images: int | None = None, seed: int = 0, skip_bad: bool = False) -> list[EvalDataset]:
    """Find every data set's pairs (``layout`` one for all, or one per folder) before any inference, so a wrong
    folder fails at once. Column names are the folder names (``name#2`` for a repeated name). With ``skip_bad``
    unreadable or invalid pairs are left out (``fisherscan.data.check_pairs``) and listed in ``skipped``."""
    data_dirs = [Path(d) for d in data_dirs]
    if not data_dirs:
        raise FisherscanError("no data set given; pass --data DIR")
    layouts = [layout] * len(data_dirs) if isinstance(layout, str) else list(layout)
    if len(layouts) == 1 and len(data_dirs) > 1:
        layouts = layouts * len(data_dirs)
    if len(layouts) != len(data_dirs):
        raise FisherscanError(f"{len(layouts)} --layout values for {len(data_dirs)} --data folders; "
                              "pass one --layout for all, or one per --data")
    out, names = [], {"mean"}  # "mean" is the table's column of means
    for folder, lay in zip(data_dirs, layouts):
        resolved, pairs = find_pairs(folder, lay, split)
        pairs = select_images(pairs, images, seed)
        pairs, skipped = check_pairs(pairs, skip_bad)
        base = folder.resolve().name or str(folder)
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}#{k}"
        names.add(name)
        out.append(EvalDataset(name, folder, resolved, split, pairs, skipped))
    return out


class _PairImages(torch.utils.data.Dataset):
    """(RGB uint8 (H, W, 3), label int64 (H, W), index) per pair, decoded in DataLoader workers."""

    def __init__(self, pairs: Sequence[Pair]):
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        image, label = load_pair(self.pairs[i])
        return torch.from_numpy(np.array(image)), torch.from_numpy(label), i  # PIL's arrays are read-only


def acdc_condition(pair: Pair) -> str:
    """The ACDC condition of a pair: rgb_anon/<condition>/<split>/<sequence>/<image>."""
    return pair.image.parts[-4]


def evaluate_datasets(segmenter: torch.nn.Module, data_dirs: Sequence[Path | str | EvalDataset], *,
                      crop: int | None = 512, stride: int = 341, resize=None, keep_ratio: bool = False,
                      score_at: str = "original", device: torch.device | str | None = None,
                      layout: str | Sequence[str] = "auto", split: str = "val", images: int | None = None,
                      seed: int = 0, workers: int = 0, batch_size: int = 4, amp: bool | None = None,
                      progress: Progress | None = None, console: Console | None = None) -> EvalResult:
    """Evaluate ``segmenter`` on each data set (folders, or :class:`EvalDataset` from :func:`prepare_datasets`).

    Returns an :class:`EvalResult`: per data set the confusion matrix, per-class IoU and mIoU (ACDC: per condition
    and their mean), and the headline ``result.miou``. ``progress`` adds a task per data set to a running rich
    Progress (needs no particular columns; a ``rate`` field is set); else a bar is drawn on ``console`` (None: none).
    The model is put in eval mode and restored to its previous mode afterwards; nothing is written.
    """
    from .scoring import progress_bar

    check_window(crop, stride)
    resize = parse_resize(resize)
    if score_at not in SCORE_AT:
        raise FisherscanError(f"--score-at {score_at}: use one of {', '.join(SCORE_AT)}")
    if all(isinstance(d, EvalDataset) for d in data_dirs):
        datasets = list(data_dirs)
    else:
        datasets = prepare_datasets([d.path if isinstance(d, EvalDataset) else d for d in data_dirs], layout, split,
                                    images, seed)
    device = torch.device(device) if device is not None else next(segmenter.parameters()).device
    segmenter.to(device)
    mean, std = normalisation(segmenter)
    was_training = segmenter.training
    segmenter.eval()
    results = []
    try:
        with (progress_bar(console) if progress is None else contextlib.nullcontext(progress)) as bar:
            for dataset in datasets:
                results.append(_evaluate_one(segmenter, dataset, bar, crop=crop, stride=stride, resize=resize,
                                             keep_ratio=keep_ratio, score_at=score_at, device=device, mean=mean,
                                             std=std, workers=workers, batch_size=batch_size, amp=amp))
    finally:
        segmenter.train(was_training)
    options = {"crop": crop, "stride": stride, "resize": list(resize) if isinstance(resize, tuple) else resize,
               "keep_ratio": keep_ratio, "score_at": score_at, "split": split, "images": images, "seed": seed,
               "normalisation": {"mean": list(mean), "std": list(std)},
               "skipped_pairs": {d.name: d.skipped for d in datasets if d.skipped}}
    return EvalResult(results, options)


def _evaluate_one(segmenter, dataset: EvalDataset, progress: Progress, *, crop, stride, resize, keep_ratio, score_at,
                  device, mean, std, workers, batch_size, amp) -> DatasetResult:
    acdc = dataset.layout == "acdc"
    groups: dict[str, ConfusionAccumulator] = {}
    loader = torch.utils.data.DataLoader(_PairImages(dataset.pairs), batch_size=None, shuffle=False,
                                         num_workers=max(int(workers), 0))
    task = progress.add_task(f"eval {dataset.name}", total=len(dataset.pairs), rate="")
    start = time.perf_counter()
    for done, (rgb, label, i) in enumerate(loader, 1):
        height, width = label.shape
        size = resized_shape(height, width, resize, keep_ratio)
        out_size = (height, width) if score_at == "original" else size
        logits = infer_logits(segmenter, rgb, crop=crop, stride=stride, resize=resize, keep_ratio=keep_ratio,
                              mean=mean, std=std, out_size=out_size, device=device, batch_size=batch_size, amp=amp)
        label = label.to(device)
        if out_size != (height, width):
            label = F.interpolate(label[None, None].float(), size=out_size, mode="nearest")[0, 0].long()
        group = acdc_condition(dataset.pairs[int(i)]) if acdc else ""
        groups.setdefault(group, ConfusionAccumulator(NUM_CLASSES, IGNORE_INDEX)).update(logits.argmax(1)[0], label)
        elapsed = time.perf_counter() - start
        progress.update(task, advance=1, rate=f"{done / max(elapsed, 1e-9):.2f} img/s")
    path = str(dataset.path)
    if not acdc:
        return _result(dataset.name, path, dataset.layout, dataset.split, groups[""])
    parts = [_result(f"{dataset.name}/{cond}", path, dataset.layout, dataset.split, groups[cond])
             for cond in sorted(groups)]
    return _mean_of_conditions(dataset.name, path, dataset.layout, dataset.split, parts)


# ----------------------------------------------------------------------------------------------------------
# Loading a run


# ----------------------------------------------------------------------------------------------------------
# Prediction PNGs


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
    from .scoring import progress_bar

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
