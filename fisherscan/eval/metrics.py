"""Segmentation metrics as the DG papers compute them (``docs/method.md``, "Data").

A confusion matrix is accumulated over a whole data set (rows: label, columns: prediction; pixels labelled
``ignore_index`` are left out), then per class IoU = TP / (TP + FP + FN). A class absent from both the
predictions and the labels of the whole set has no IoU (NaN) and is left out of the mean: mIoU = nanmean.
A class that is predicted but never labelled has IoU 0 and counts.

Pure functions; torch tensors (any device) or numpy arrays in, the same kind out.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.labels import IGNORE_INDEX, NUM_CLASSES

#: The 19 Cityscapes trainId classes, in trainId order.
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)


def confusion_matrix(pred, label, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX):
    """(num_classes, num_classes) int64 counts, ``[label, prediction]``, of same-shaped class-id maps.

    Pixels whose label is ``ignore_index`` are skipped; any other label or prediction outside
    [0, num_classes) is a ValueError (a wrong label map, not something to drop silently).
    """
    if isinstance(pred, np.ndarray) or isinstance(label, np.ndarray):
        conf = confusion_matrix(torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(label)),
                                num_classes, ignore_index)
        return conf.numpy()
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    pred, label = pred.reshape(-1).long(), label.reshape(-1).to(pred.device).long()
    valid = label != ignore_index
    pred, label = pred[valid], label[valid]
    bad_label = (label < 0) | (label >= num_classes)
    bad_pred = (pred < 0) | (pred >= num_classes)
    if bool(bad_label.any()) or bool(bad_pred.any()):
        which = "label" if bool(bad_label.any()) else "prediction"
        values = torch.unique(label[bad_label] if which == "label" else pred[bad_pred])[:5].tolist()
        raise ValueError(f"{which} values {values} are outside 0..{num_classes - 1} (ignore {ignore_index})")
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(conf):
    """Per-class IoU = TP / (TP + FP + FN) as float64; NaN for a class absent from both labels and predictions."""
    if isinstance(conf, torch.Tensor):
        return torch.from_numpy(iou_from_confusion(conf.detach().cpu().numpy()))
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def mean_iou(iou) -> float:
    """The mean of the per-class IoUs that exist (nanmean); NaN when no class has any pixel."""
    values = np.asarray(iou.detach().cpu() if isinstance(iou, torch.Tensor) else iou, dtype=np.float64)
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else math.nan


class ConfusionAccumulator:
    """A running confusion matrix over a data set, kept on the device of the first update (int64)."""

    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self._conf: torch.Tensor | None = None
        self.images = 0

    def update(self, pred, label) -> None:
        conf = confusion_matrix(torch.as_tensor(pred), torch.as_tensor(label), self.num_classes, self.ignore_index)
        self._conf = conf if self._conf is None else self._conf + conf.to(self._conf.device)
        self.images += 1

    @property
    def matrix(self) -> np.ndarray:
        if self._conf is None:
            return np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        return self._conf.cpu().numpy().astype(np.int64)

    def iou(self) -> np.ndarray:
        return iou_from_confusion(self.matrix)

    def miou(self) -> float:
        return mean_iou(self.iou())
