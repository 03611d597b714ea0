"""The evaluation layer: mIoU as the DG papers compute it, slide inference, prediction PNGs, tuned runs reloaded.

``metrics`` (confusion matrices, IoU), ``inference`` (resize, normalise, slide windows), ``evaluate`` (data sets
-> tables, JSON, CSV), ``predict`` (palette PNGs), ``runs`` (a tuned model from its run folder).
"""

from .evaluate import EvalDataset, EvalResult, evaluate_datasets, prepare_datasets, results_table, save_results
from .metrics import ConfusionAccumulator, confusion_matrix, iou_from_confusion, mean_iou
from .predict import predict_images
from .runs import load_run

__all__ = ["EvalDataset", "EvalResult", "evaluate_datasets", "prepare_datasets", "results_table", "save_results",
           "ConfusionAccumulator", "confusion_matrix", "iou_from_confusion", "mean_iou", "predict_images", "load_run"]
