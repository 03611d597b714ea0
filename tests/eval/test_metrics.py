"""fisherscan.metrics against a confusion matrix and IoUs worked out by hand (oracle: the numbers in this file).

The example has ignore pixels (whose predictions must not count), classes predicted only on ignore pixels
(absent: NaN, left out of the mean), a class predicted but never labelled and one labelled but never predicted
(both IoU 0, counted in the mean).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fisherscan.eval.metrics import (
    CITYSCAPES_CLASSES,
    ConfusionAccumulator,
    confusion_matrix,
    iou_from_confusion,
    mean_iou,
)

LABEL = np.array([[0, 3, 1, 255],
                  [0, 2, 1, 255],
                  [2, 2, 255, 1]])
PRED = np.array([[0, 1, 1, 5],
                 [0, 2, 1, 0],
                 [2, 4, 7, 1]])
# the 9 labelled pixels, (label, prediction): (0,0) x2, (3,1), (1,1) x3, (2,2) x2, (2,4)
HAND_CONFUSION = {(0, 0): 2, (3, 1): 1, (1, 1): 3, (2, 2): 2, (2, 4): 1}
# class: TP / (TP + FP + FN)
HAND_IOU = {0: 2 / 2, 1: 3 / (3 + 1), 2: 2 / (2 + 1), 3: 0 / 1, 4: 0 / 1}
HAND_MIOU = (1 + 0.75 + 2 / 3 + 0 + 0) / 5


def miou_from_confusion(conf) -> float:
    """mIoU straight from a confusion matrix (the tests' shorthand)."""
    return mean_iou(iou_from_confusion(conf))


def expected_matrix() -> np.ndarray:
    conf = np.zeros((19, 19), dtype=np.int64)
    for (row, col), n in HAND_CONFUSION.items():
        conf[row, col] = n
    return conf


def test_confusion_matrix_by_hand_numpy_and_torch():
    conf = confusion_matrix(PRED, LABEL)
    assert isinstance(conf, np.ndarray) and conf.dtype == np.int64 and conf.shape == (19, 19)
    np.testing.assert_array_equal(conf, expected_matrix())
    conf_t = confusion_matrix(torch.from_numpy(PRED), torch.from_numpy(LABEL))
    assert isinstance(conf_t, torch.Tensor)
    np.testing.assert_array_equal(conf_t.numpy(), expected_matrix())


def test_iou_and_miou_by_hand():
    iou = iou_from_confusion(expected_matrix())
    for k in range(19):
        if k in HAND_IOU:
            assert iou[k] == pytest.approx(HAND_IOU[k], abs=1e-12), k
        else:  # 5 and 7 are predicted only on ignore pixels: absent from both, no IoU
            assert math.isnan(iou[k]), k
    assert mean_iou(iou) == pytest.approx(HAND_MIOU, abs=1e-12)
    assert miou_from_confusion(confusion_matrix(PRED, LABEL)) == pytest.approx(HAND_MIOU, abs=1e-12)
    assert len(CITYSCAPES_CLASSES) == 19 and CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[18] == "bicycle"


def test_predictions_on_ignore_pixels_do_not_count():
    other = PRED.copy()
    other[LABEL == 255] = 18
    np.testing.assert_array_equal(confusion_matrix(other, LABEL), expected_matrix())


def test_whole_set_confusion_is_not_a_mean_of_per_image_ious():
    # image A: class 0 everywhere, all right; image B: one class-0 pixel predicted as class 1
    label_a, pred_a = np.zeros((2, 2), int), np.zeros((2, 2), int)
    label_b, pred_b = np.array([[0, 1]]), np.array([[1, 1]])
    acc = ConfusionAccumulator()
    acc.update(torch.from_numpy(pred_a), torch.from_numpy(label_a))
    acc.update(pred_b, label_b)
    assert acc.images == 2
    # whole set: class 0 TP 4, FN 1 -> 4/5; class 1 TP 1, FP 1 -> 1/2
    assert acc.iou()[0] == pytest.approx(0.8) and acc.iou()[1] == pytest.approx(0.5)
    assert acc.miou() == pytest.approx(0.65)
    per_image = np.mean([miou_from_confusion(confusion_matrix(pred_a, label_a)),
                         miou_from_confusion(confusion_matrix(pred_b, label_b))])
    assert per_image == pytest.approx((1.0 + 0.25) / 2)  # what the protocol does NOT do


def test_empty_and_invalid_inputs():
    assert math.isnan(mean_iou(iou_from_confusion(np.zeros((19, 19)))))
    assert math.isnan(ConfusionAccumulator().miou())
    np.testing.assert_array_equal(confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 255)), np.zeros((19, 19)))
    with pytest.raises(ValueError, match="label values"):
        confusion_matrix(np.zeros((1, 2), int), np.array([[0, 19]]))
    with pytest.raises(ValueError, match="prediction values"):
        confusion_matrix(np.array([[0, 20]]), np.zeros((1, 2), int))
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int))
