"""fisherscan.bench.pretrain: the coarse labels, the pretraining pool's styles, the cache (reused, reproducible, keyed
by every setting) and its damaged or foreign files (one-line errors, never silently replaced)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fisherscan.bench.pretrain import (
    COARSE_NAMES,
    MODEL,
    PRETRAIN_SEED,
    PRETRAIN_STYLES,
    PretrainConfig,
    cache_dir,
    coarse_labels,
    pretrained_weights,
    pretraining_pool,
)
from fisherscan.data.scenes import CLASSES, scene_layout
from fisherscan.data.synthetic import render_scene
from fisherscan.errors import FisherscanError
from fisherscan.models.backbone import build_backbone

TINY = PretrainConfig(scenes=2, steps=2, batch_size=2)


def test_coarse_labels_against_a_hand_written_table():
    oracle = {0: 0, 1: 0, 2: 1, 5: 1, 8: 1, 10: 2, 11: 3, 13: 3}  # road/sidewalk, building/pole/veg, sky, person/car
    assert set(oracle) == set(CLASSES) and COARSE_NAMES == ("ground", "static", "sky", "movable")
    label = np.array([[0, 1, 2, 5], [8, 10, 11, 13], [255, 3, 0, 13]], np.uint8)
    expected = np.array([[oracle.get(int(v), 255) for v in row] for row in label], np.uint8)
    np.testing.assert_array_equal(coarse_labels(label), expected)
    layout = scene_layout(0, 3, (64, 64))
    assert len(np.unique(coarse_labels(layout))) < len(np.unique(layout))  # coarser than the fine labels


def test_the_pool_holds_each_scene_in_the_pretraining_styles_only():
    """Oracle: render_scene of each pool scene in each of the four styles, in that order; toon, rain, night and snow
    never appear."""
    assert PRETRAIN_STYLES == ("source", "fog", "colour", "blur")
    images, labels = pretraining_pool(TINY)
    assert images.shape == (2 * 4, 3, 64, 64) and labels.shape == (2 * 4, 64, 64)
    for index in range(2):
        layout = scene_layout(PRETRAIN_SEED, index, (64, 64))
        for k, style in enumerate(PRETRAIN_STYLES):
            expected = torch.from_numpy(render_scene(layout, style, PRETRAIN_SEED, index)).permute(2, 0, 1)
            assert torch.equal(images[4 * index + k], expected)
            assert torch.equal(labels[4 * index + k], torch.from_numpy(coarse_labels(layout)).long())
        for style in ("toon", "rain", "night", "snow"):
            other = torch.from_numpy(render_scene(layout, style, PRETRAIN_SEED, index)).permute(2, 0, 1)
            assert not any(torch.equal(image, other) for image in images)


@pytest.mark.slow
def test_pretraining_is_cached_reused_and_reproducible(tmp_path):
    first = pretrained_weights(TINY, tmp_path / "a")
    assert not first.cached and first.path.name == f"{TINY.key()}.safetensors"
    again = pretrained_weights(TINY, tmp_path / "a")
    assert again.cached and again.path == first.path and again.seconds == pytest.approx(first.seconds)
    other = pretrained_weights(TINY, tmp_path / "b")  # a fresh pretraining elsewhere: the same bits
    a, b = load_file(str(first.path)), load_file(str(other.path))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    backbone = build_backbone(MODEL, weights=first.path)  # loads strictly into the benchmark's architecture
    own = backbone.model.state_dict()
    assert all(torch.equal(own[k], a[k]) for k in a) and set(own) == set(a)
    assert backbone.patch_size == 4


@pytest.mark.slow
def test_damaged_or_foreign_cache_files_are_one_line_errors(tmp_path):
    made = pretrained_weights(TINY, tmp_path)
    good = made.path.read_bytes()
    made.path.write_bytes(good[: len(good) // 2])  # truncated: the tensors cannot be read
    with pytest.raises(FisherscanError) as error:
        pretrained_weights(TINY, tmp_path)
    assert str(made.path) in str(error.value) and "delete it" in str(error.value) and "\n" not in str(error.value)
    other = dataclasses.replace(TINY, steps=3)
    made.path.write_bytes(good)
    made.path.rename(tmp_path / f"{other.key()}.safetensors")  # a file of TINY under another config's name
    with pytest.raises(FisherscanError, match="another pretraining configuration"):
        pretrained_weights(other, tmp_path)


def test_cache_key_and_location(monkeypatch, tmp_path):
    changes = ("timm:vit_tiny_patch16_224", 32, ("source",), 3, 3, 4, 1e-4, 0.1, 1)
    fields = dataclasses.fields(TINY)
    assert len(changes) == len(fields)
    keys = {dataclasses.replace(TINY, **{f.name: change}).key() for f, change in zip(fields, changes)}
    assert TINY.key() not in keys and len(keys) == len(fields)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "fisherscan" / "proxy_dg"
    assert cache_dir(tmp_path / "x") == tmp_path / "x"
