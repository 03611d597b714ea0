"""fisherscan.augment: each transform against a hand computation (mmcv's rescale size, nearest = repeated pixels,
an exhaustive search for balanced windows, colorsys for HSV), and the pipeline's keyed determinism in the dataset."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from fisherscan.data.augment import (
    Augmentation,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    augment_rng,
    cat_max_crop,
    photometric_distortion,
    random_resize,
)
from fisherscan.data.datasets import SegmentationDataset, load_pair
from fisherscan.data.layouts import find_pairs
from fisherscan.data.synthetic import write_dataset


def test_random_resize_keeps_the_aspect_ratio_and_labels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (20, 40))
    # mmcv rescale: fit (long, short) = r * (80, 40) -> factor min(80/40, 40/20) * r; r = 1 -> exactly x2
    big_image, big = random_resize(image, label, (80, 40), (1.0, 1.0), rng)
    assert big.shape == (40, 80) and big_image.shape == (40, 80, 3)
    np.testing.assert_array_equal(big, label.repeat(2, axis=0).repeat(2, axis=1))  # nearest x2 = repeated pixels
    _, small = random_resize(image, label, (80, 40), (0.25, 0.25), rng)  # r = 0.25 -> factor 0.5
    assert small.shape == (10, 20) and set(np.unique(small)) <= set(np.unique(label))
    flat = np.full((20, 40, 3), 77, dtype=np.uint8)
    resized, _ = random_resize(flat, label, (80, 40), (0.7, 1.3), rng)  # bilinear keeps a constant image
    assert (resized == 77).all()
    sizes = {random_resize(image, label, (80, 40), (0.5, 2.0), np.random.default_rng(s))[1].shape for s in range(20)}
    assert len(sizes) > 5 and all(20 <= h <= 80 and abs(w - 2 * h) <= 1 for h, w in sizes)  # factor 2r, r ~ U(0.5, 2)


def test_cat_max_crop_prefers_balanced_windows():
    label = np.zeros((32, 32), dtype=np.int64)
    label[:, 28:] = 1  # only windows that reach the right edge hold > 25% class 1
    label[:4] = 255
    crop = 8
    balanced = set()
    for top in range(25):  # exhaustive oracle: windows where no class has >= 75% of the labelled pixels
        for left in range(25):
            w = label[top : top + crop, left : left + crop]
            counts = np.bincount(w[w != 255].ravel())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < 0.75:
                balanced.add((top, left))
    hits = [cat_max_crop(label, crop, 0.75, np.random.default_rng(s)) in balanced for s in range(40)]
    uniform = len(balanced) / 25 ** 2
    assert np.mean(hits) > 0.5 > 3 * uniform  # ~1 - (1 - p)^11 with 11 draws vs p for one draw
    assert cat_max_crop(label, crop, 0.75, np.random.default_rng(3)) == cat_max_crop(label, crop, 0.75,
                                                                                     np.random.default_rng(3))
    one_class = np.zeros((16, 16), dtype=np.int64)  # no balanced window: still a valid one after 10 redraws
    top, left = cat_max_crop(one_class, crop, 0.75, np.random.default_rng(0))
    assert 0 <= top <= 8 and 0 <= left <= 8
    assert cat_max_crop(label, 64, 0.75, np.random.default_rng(0)) == (0, 0)  # crop larger than the image


def test_photometric_steps_against_closed_forms_and_colorsys():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    x = image.astype(np.float64)
    np.testing.assert_array_equal(adjust_brightness(image, 20.5), np.floor(np.clip(x + 20.5, 0, 255)))
    np.testing.assert_array_equal(adjust_contrast(image, 1.3), np.floor(np.clip(x * 1.3, 0, 255)))

    def oracle(change):
        out = np.zeros_like(x)
        for i, j in np.ndindex(6, 7):
            h, s, v = colorsys.rgb_to_hsv(*(x[i, j] / 255))
            out[i, j] = np.round(np.array(colorsys.hsv_to_rgb(*change(h, s, v))) * 255)
        return out

    np.testing.assert_allclose(adjust_saturation(image, 1.4), oracle(lambda h, s, v: (h, min(s * 1.4, 1.0), v)), atol=1)
    np.testing.assert_allclose(adjust_hue(image, -7), oracle(lambda h, s, v: ((h - 7 / 180) % 1, s, v)), atol=1)
    np.testing.assert_array_equal(adjust_hue(image, 0), image)


def test_photometric_distortion_is_keyed_and_varied():
    image = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    first = photometric_distortion(image, np.random.default_rng(5))
    np.testing.assert_array_equal(first, photometric_distortion(image, np.random.default_rng(5)))
    outputs = [photometric_distortion(image, np.random.default_rng(s)) for s in range(400)]
    unchanged = sum(np.array_equal(o, image) for o in outputs)
    assert 10 < unchanged < 45  # all four steps skipped with probability 1/16: 25 +- 4.8 expected
    assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outputs)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("data"), domains=("source",), images_per_domain=2, size=(48, 40))
    return find_pairs(root["source"])[1]


def test_pipeline_flips_and_is_deterministic_per_visit(pairs):
    image, label = load_pair(pairs[0])
    mirror = Augmentation(scale=None, ratio_range=(1.0, 1.0), cat_max_ratio=1.0, flip_prob=1.0, photometric=False)
    flipped_image, flipped = mirror(image, label, 64, augment_rng(0, 0))
    np.testing.assert_array_equal(flipped, label[:, ::-1])  # crop larger than the image: the flip alone
    np.testing.assert_array_equal(flipped_image, image[:, ::-1])

    dataset = SegmentationDataset(pairs, 32, pad_multiple=16, seed=3, augmentation=Augmentation(scale=(48, 40)))
    again = SegmentationDataset(pairs, 32, pad_multiple=16, seed=3, augmentation=Augmentation(scale=(48, 40)))
    x, y, _ = dataset[(1, 2)]
    x2, y2, _ = again[(1, 2)]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    assert (x == x2).all() and (y == y2).all()  # keyed on (seed, index, visit): no global state
    assert any(not (dataset[(1, v)][0] == x).all() for v in range(3))  # other visits draw afresh
    _, raw = load_pair(pairs[1])
    assert set(y.unique().tolist()) <= set(np.unique(raw).tolist()) | {255}
