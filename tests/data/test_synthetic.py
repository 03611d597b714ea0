"""Tests of the procedural scene generator (fisherscan.data.scenes, fisherscan.data.synthetic)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fisherscan.data.scenes import CLASSES, scene_layout
from fisherscan.data.synthetic import DOMAINS, STYLES, make_scene, render_scene, write_dataset
from fisherscan.errors import FisherscanError

SIZE = (128, 128)
N = 32


@pytest.fixture(scope="module")
def layouts():
    return [scene_layout(0, i, SIZE) for i in range(N)]


@pytest.fixture(scope="module")
def images(layouts):
    """{domain: [rgb of scenes 0..7]}"""
    return {d: [render_scene(layouts[i], d, 0, i) for i in range(8)] for d in STYLES}


def _grey(img):
    return img.astype(np.float64).mean(axis=2)


def _high_frequency_energy(img):
    g = _grey(img)
    return (np.diff(g, axis=0) ** 2).mean() + (np.diff(g, axis=1) ** 2).mean()


def test_api_constants():
    assert CLASSES == {0: "road", 1: "sidewalk", 2: "building", 5: "pole", 8: "vegetation", 10: "sky", 11: "person",
                       13: "car"}
    assert DOMAINS == ("source", "fog", "night", "colour", "blur")
    assert STYLES == (*DOMAINS, "rain", "snow", "toon")  # appended: the ids of the first five never change


@pytest.mark.parametrize("domain", STYLES)
def test_deterministic(domain):
    rgb1, label1 = make_scene(3, 5, domain)
    rgb2, label2 = make_scene(3, 5, domain)
    assert rgb1.dtype == np.uint8 and rgb1.shape == (128, 128, 3)
    assert label1.dtype == np.uint8 and label1.shape == (128, 128)
    np.testing.assert_array_equal(rgb1, rgb2)
    np.testing.assert_array_equal(label1, label2)


def test_layout_depends_on_seed_and_index(layouts):
    assert not np.array_equal(layouts[0], layouts[1])
    assert not np.array_equal(scene_layout(0, 0, SIZE), scene_layout(1, 0, SIZE))
    np.testing.assert_array_equal(scene_layout(0, 0, SIZE), layouts[0])


def test_layout_same_across_domains_images_differ():
    rgbs = {}
    for domain in STYLES:
        rgb, label = make_scene(0, 7, domain)
        np.testing.assert_array_equal(label, scene_layout(0, 7, SIZE))
        rgbs[domain] = rgb.astype(np.int16)
    for i, a in enumerate(STYLES):
        for b in STYLES[i + 1 :]:
            assert np.abs(rgbs[a] - rgbs[b]).mean() > 5, (a, b)


def _saturation(img):
    rgb = img.astype(np.float64)
    return (rgb.max(axis=2) - rgb.min(axis=2)).mean()


def test_rain_is_darker_greyer_and_streaked(images):
    for rain, source in zip(images["rain"], images["source"]):
        assert rain.mean() < 0.92 * source.mean()
        assert _saturation(rain) < 0.7 * _saturation(source)
    # thin near-vertical streaks: rain's vertical neighbours agree more than its horizontal ones, beyond the source's
    rain_ratio = np.mean([(np.diff(_grey(r), axis=1) ** 2).mean() / (np.diff(_grey(r), axis=0) ** 2).mean()
                          for r in images["rain"]])
    source_ratio = np.mean([(np.diff(_grey(r), axis=1) ** 2).mean() / (np.diff(_grey(r), axis=0) ** 2).mean()
                            for r in images["source"]])
    assert rain_ratio > source_ratio


def test_snow_whitens_the_ground(layouts, images):
    for i, (snow, source) in enumerate(zip(images["snow"], images["source"])):
        ground = np.isin(layouts[i], (0, 1, 8))
        assert snow[ground].mean() > source[ground].mean() + 30


def test_toon_is_posterised_and_outlined(layouts, images):
    for i, (toon, source) in enumerate(zip(images["toon"], images["source"])):
        assert len(np.unique(toon.reshape(-1, 3), axis=0)) < 0.3 * len(np.unique(source.reshape(-1, 3), axis=0))
        boundary = layouts[i][1:, :] != layouts[i][:-1, :]  # a label change between a row and the next
        dark = _grey(toon)[1:, :] < 20
        assert dark[boundary].mean() > 0.5 and dark[~boundary].mean() < 0.1


def test_night_is_darker(images):
    for night, source in zip(images["night"], images["source"]):
        assert night.mean() < 0.5 * source.mean()


def test_fog_lowers_contrast(images):
    for fog, source in zip(images["fog"], images["source"]):
        assert _grey(fog).std() < 0.85 * _grey(source).std()
    # Fog is stronger higher up (further away): the top half loses more contrast than the bottom half.
    fog_top = np.mean([_grey(f)[:64].std() / _grey(s)[:64].std() for f, s in zip(images["fog"], images["source"])])
    fog_bottom = np.mean([_grey(f)[64:].std() / _grey(s)[64:].std() for f, s in zip(images["fog"], images["source"])])
    assert fog_top < fog_bottom


def test_blur_removes_high_frequencies(images):
    for blur, source in zip(images["blur"], images["source"]):
        assert _high_frequency_energy(blur) < 0.5 * _high_frequency_energy(source)


def test_colour_shifts_class_colours(layouts, images):
    """The colour domain changes the mean colour of the classes, not just the brightness."""
    shifts = []
    for i, (colour, source) in enumerate(zip(images["colour"], images["source"])):
        for cls in CLASSES:
            mask = layouts[i] == cls
            if mask.sum() > 50:
                a = colour[mask].astype(np.float64).mean(axis=0)
                b = source[mask].astype(np.float64).mean(axis=0)
                shifts.append(np.abs((a - a.mean()) - (b - b.mean())).max())  # chroma change
    assert np.median(shifts) > 20


def test_label_values_and_class_presence(layouts):
    allowed = set(CLASSES)
    for label in layouts:
        assert set(np.unique(label).tolist()) <= allowed
    for cls, name in CLASSES.items():
        present = sum(bool((label == cls).any()) for label in layouts)
        assert present >= 0.75 * N, f"{name} present in only {present}/{N} scenes"


def test_spatial_structure(layouts):
    top = np.mean([(label[:12] == 10).mean() for label in layouts])
    bottom = np.mean([np.isin(label[-12:], (0, 1, 13)).mean() for label in layouts])
    assert top > 0.9
    assert bottom > 0.75
    road_rows = [np.flatnonzero((label == 0).any(axis=1)) for label in layouts]
    assert all(rows.size and rows.min() > 0.25 * SIZE[0] for rows in road_rows)


def test_non_square_size():
    rgb, label = make_scene(1, 2, "night", size=(64, 96))
    assert rgb.shape == (64, 96, 3) and label.shape == (64, 96)


def test_bad_arguments():
    with pytest.raises(FisherscanError, match="unknown synthetic domain"):
        make_scene(0, 0, "hail")
    with pytest.raises(FisherscanError, match="at least 16x16"):
        scene_layout(0, 0, (8, 128))
    with pytest.raises(FisherscanError, match="uint8"):
        render_scene(np.zeros((16, 16), np.int64), "source", 0, 0)


def test_write_dataset(tmp_path):
    size = (48, 80)
    out = write_dataset(tmp_path / "synth", domains=("source", "fog", "blur"), images_per_domain=3, size=size, seed=4)
    assert out == {d: tmp_path / "synth" / d for d in ("source", "fog", "blur")}
    names = [f"scene_{i:05d}.png" for i in range(3)]
    for domain, folder in out.items():
        assert sorted(p.name for p in (folder / "images").iterdir()) == names
        assert sorted(p.name for p in (folder / "labels").iterdir()) == names
        for i, name in enumerate(names):
            with Image.open(folder / "images" / name) as im:
                assert im.mode == "RGB" and im.size == (80, 48)
                rgb = np.asarray(im)
            with Image.open(folder / "labels" / name) as im:
                assert im.mode == "L" and im.size == (80, 48)
                label = np.asarray(im)
            assert label.dtype == np.uint8 and rgb.dtype == np.uint8
            np.testing.assert_array_equal(label, scene_layout(4, i, size))
            np.testing.assert_array_equal(rgb, render_scene(label, domain, 4, i))


def test_write_dataset_rejects_unknown_domain(tmp_path):
    with pytest.raises(FisherscanError, match="unknown synthetic domain"):
        write_dataset(tmp_path, domains=("source", "hail"), images_per_domain=1)
    assert not any(tmp_path.iterdir())
