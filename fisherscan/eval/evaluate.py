"""Evaluation of a segmenter on labelled data sets: per-dataset confusion matrices, mIoU tables, JSON and CSV.

Protocol (``docs/method.md``): one confusion matrix per data set over all its images (19 classes,
255 ignored), per class IoU and mIoU over the classes present (``fisherscan.eval.metrics``); ACDC per condition
and their mean; the headline is the plain mean of the per-dataset mIoUs. Inference: ``fisherscan.eval.inference``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .. import __version__
from ..data.datasets import check_pairs, load_pair
from ..data.labels import IGNORE_INDEX, NUM_CLASSES
from ..data.layouts import Pair, find_pairs, select_images
from ..errors import FisherscanError
from ..io import atomic_target
from ..runtime import progress_bar
from .inference import (
    SCORE_AT,
    check_window,
    infer_logits,
    normalisation,
    parse_resize,
    resized_shape,
)
from .metrics import (
    CITYSCAPES_CLASSES,
    ConfusionAccumulator,
    iou_from_confusion,
    mean_iou,
)


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
