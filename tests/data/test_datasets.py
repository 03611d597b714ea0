"""Tests for fisherscan.data: layouts, label maps, input errors, the dataset's crops and the loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fisherscan.data.datasets import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmentationDataset,
    load_pair,
    make_loader,
    padded_size,
    validate_pairs,
)
from fisherscan.data.labels import CITYSCAPES_LABELID_TO_TRAINID, MAPILLARY_TO_TRAINID, label_lut
from fisherscan.data.layouts import LAYOUTS, Pair, detect_layout, find_pairs, select_images
from fisherscan.errors import FisherscanError

H, W = 20, 30


# ----------------------------------------------------------------------------------------------------------
# helpers


def write_image(path: Path, h: int = H, w: int = W, seed: int = 0) -> Path:
    """A random RGB image (PNG or JPEG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_label(path: Path, values=(0,), h: int = H, w: int = W) -> Path:
    """A single-channel label PNG whose pixels cycle through ``values``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = np.resize(np.asarray(values, dtype=np.uint8), h * w)
    Image.fromarray(flat.reshape(h, w), mode="L").save(path)
    return path


def label_values(pair: Pair) -> set[int]:
    return set(np.unique(load_pair(pair)[1]).tolist())


def names(pairs) -> list[tuple[str, str, str | None]]:
    return [(p.image.name, p.label.name, p.label_map) for p in pairs]


# ----------------------------------------------------------------------------------------------------------
# label maps


def test_label_lut_tables():
    identity = label_lut(None)
    assert identity.dtype == np.uint8 and identity.shape == (256,)
    assert np.array_equal(identity, np.arange(256))
    city = label_lut("cityscapes")
    assert (city[26], city[7], city[5], city[33], city[255]) == (13, 0, 255, 18, 255)
    assert sorted(city[city != 255].tolist()) == list(range(19))
    assert len(CITYSCAPES_LABELID_TO_TRAINID) == 19
    mapillary = label_lut("mapillary")
    assert (mapillary[55], mapillary[1], mapillary[61], mapillary[13]) == (13, 255, 14, 0)
    assert len(MAPILLARY_TO_TRAINID) == 34 and int((mapillary != 255).sum()) == 34
    with pytest.raises(FisherscanError, match="unknown label map"):
        label_lut("ade20k")


# ----------------------------------------------------------------------------------------------------------
# layouts


def test_gta5_converted_labels(tmp_path):
    for k in (1, 2):
        write_image(tmp_path / "images" / f"0000{k}.png", seed=k)
        write_label(tmp_path / "labels" / f"0000{k}_labelTrainIds.png", values=(0, 13, 255))
    assert detect_layout(tmp_path) == "gta5"
    layout, pairs = find_pairs(tmp_path)
    assert layout == "gta5"
    assert names(pairs) == [
        ("00001.png", "00001_labelTrainIds.png", None),
        ("00002.png", "00002_labelTrainIds.png", None),
    ]
    assert label_values(pairs[0]) == {0, 13, 255}


def test_gta5_raw_labels(tmp_path):
    for k in (1, 2, 3):
        write_image(tmp_path / "images" / f"0000{k}.png", seed=k)
        write_label(tmp_path / "labels" / f"0000{k}.png", values=(26, 7, 5))
    assert detect_layout(tmp_path) == "gta5"  # flat five-digit PNG names
    layout, pairs = find_pairs(tmp_path, split="val")  # gta5 has no split
    assert layout == "gta5" and len(pairs) == 3
    assert all(p.label_map == "cityscapes" for p in pairs)
    image, label = load_pair(pairs[0])
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    assert label.dtype == np.int64 and label.shape == (H, W)
    assert label.ravel()[:3].tolist() == [13, 0, 255]


def test_generic_vs_gta5_detection(tmp_path):
    generic, gta = tmp_path / "generic", tmp_path / "gta"
    write_image(generic / "images" / "scene_00001.png")
    write_label(generic / "labels" / "scene_00001.png")
    write_image(gta / "images" / "00001.png")
    write_label(gta / "labels" / "00001.png")
    assert detect_layout(generic) == "generic"
    assert detect_layout(gta) == "gta5"
    assert find_pairs(generic)[1][0].label_map is None
    assert find_pairs(gta)[1][0].label_map == "cityscapes"


def test_cityscapes_both_label_variants(tmp_path):
    a = "aachen_000000_000019"
    b = "bremen_000001_000019"
    write_image(tmp_path / "leftImg8bit" / "train" / "aachen" / f"{a}_leftImg8bit.png")
    write_label(tmp_path / "gtFine" / "train" / "aachen" / f"{a}_gtFine_labelTrainIds.png", values=(2, 255))
    write_image(tmp_path / "leftImg8bit" / "train" / "bremen" / f"{b}_leftImg8bit.png")
    write_label(tmp_path / "gtFine" / "train" / "bremen" / f"{b}_gtFine_labelIds.png", values=(26, 7, 5))
    write_label(tmp_path / "gtFine" / "train" / "bremen" / f"{b}_gtFine_color.png", values=(1,))
    v = "frankfurt_000000_000294"
    write_image(tmp_path / "leftImg8bit" / "val" / "frankfurt" / f"{v}_leftImg8bit.png")
    write_label(tmp_path / "gtFine" / "val" / "frankfurt" / f"{v}_gtFine_labelTrainIds.png")

    assert detect_layout(tmp_path) == "cityscapes"
    layout, pairs = find_pairs(tmp_path, "auto", "train")
    assert layout == "cityscapes"
    assert names(pairs) == [
        (f"{a}_leftImg8bit.png", f"{a}_gtFine_labelTrainIds.png", None),
        (f"{b}_leftImg8bit.png", f"{b}_gtFine_labelIds.png", "cityscapes"),
    ]
    assert label_values(pairs[0]) == {2, 255}
    assert label_values(pairs[1]) == {13, 0, 255}
    assert names(find_pairs(tmp_path, "cityscapes", "val")[1]) == [
        (f"{v}_leftImg8bit.png", f"{v}_gtFine_labelTrainIds.png", None)
    ]


def test_bdd100k(tmp_path):
    for stem in ("b2", "a1"):
        write_image(tmp_path / "images" / "10k" / "train" / f"{stem}.jpg")
        write_label(tmp_path / "labels" / "sem_seg" / "masks" / "train" / f"{stem}.png", values=(18, 255))
    assert detect_layout(tmp_path) == "bdd100k"
    layout, pairs = find_pairs(tmp_path)
    assert layout == "bdd100k"
    assert names(pairs) == [("a1.jpg", "a1.png", None), ("b2.jpg", "b2.png", None)]
    assert label_values(pairs[1]) == {18, 255}


def test_mapillary_raw_labels(tmp_path):
    for stem in ("m1", "m2"):
        write_image(tmp_path / "validation" / "images" / f"{stem}.jpg")
        write_label(tmp_path / "validation" / "v1.2" / "labels" / f"{stem}.png", values=(55, 1, 13))
    assert detect_layout(tmp_path) == "mapillary"
    layout, pairs = find_pairs(tmp_path, split="val")
    assert layout == "mapillary"
    assert names(pairs) == [("m1.jpg", "m1.png", "mapillary"), ("m2.jpg", "m2.png", "mapillary")]
    assert load_pair(pairs[0])[1].ravel()[:3].tolist() == [13, 255, 0]
    with pytest.raises(FisherscanError, match="training"):
        find_pairs(tmp_path, split="train")


@pytest.mark.parametrize("converted_split", ["training", "train"])
def test_mapillary_converted_labels_preferred(tmp_path, converted_split):
    for stem in ("m1", "m2"):
        write_image(tmp_path / "training" / "images" / f"{stem}.jpg")
        write_label(tmp_path / "training" / "v1.2" / "labels" / f"{stem}.png", values=(55,))
    write_label(tmp_path / "cityscapes_trainIdLabel" / converted_split / "label" / "m1.png", values=(4, 255))
    layout, pairs = find_pairs(tmp_path, split="train")
    assert layout == "mapillary"
    assert pairs[0].label.parent == tmp_path / "cityscapes_trainIdLabel" / converted_split / "label"
    assert pairs[0].label_map is None and label_values(pairs[0]) == {4, 255}
    assert pairs[1].label_map == "mapillary" and label_values(pairs[1]) == {13}


def test_acdc_all_conditions(tmp_path):
    for cond in ("snow", "fog", "night"):
        seq = "GOPR0475"
        write_image(tmp_path / "rgb_anon" / cond / "train" / seq / f"{seq}_{cond}_rgb_anon.png")
        write_label(tmp_path / "gt" / cond / "train" / seq / f"{seq}_{cond}_gt_labelTrainIds.png", values=(10,))
        write_image(tmp_path / "rgb_anon" / cond / "train_ref" / seq / f"{seq}_{cond}_ref_rgb_anon.png")
    assert detect_layout(tmp_path) == "acdc"
    layout, pairs = find_pairs(tmp_path)
    assert layout == "acdc"
    assert [p.image.parts[-4] for p in pairs] == ["fog", "night", "snow"]
    assert all(p.label.name.endswith("_gt_labelTrainIds.png") and p.label_map is None for p in pairs)
    assert label_values(pairs[2]) == {10}


def test_generic_nested_jpg(tmp_path):
    write_image(tmp_path / "images" / "town" / "day" / "x.jpg")
    write_label(tmp_path / "labels" / "town" / "day" / "x.png", values=(3,))
    write_image(tmp_path / "images" / "y.png")
    write_label(tmp_path / "labels" / "y.png", values=(5,))
    write_image(tmp_path / "images" / "town" / "z.jpeg")
    write_label(tmp_path / "labels" / "town" / "z.png", values=(7,))
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    assert detect_layout(tmp_path) == "generic"
    layout, pairs = find_pairs(tmp_path)
    assert layout == "generic"
    rel = [(p.image.relative_to(tmp_path).as_posix(), p.label.relative_to(tmp_path).as_posix()) for p in pairs]
    assert rel == [
        ("images/town/day/x.jpg", "labels/town/day/x.png"),
        ("images/town/z.jpeg", "labels/town/z.png"),
        ("images/y.png", "labels/y.png"),
    ]
    assert [label_values(p) for p in pairs] == [{3}, {7}, {5}]


def test_explicit_layout_overrides_detection(tmp_path):
    write_image(tmp_path / "images" / "00001.png")
    write_label(tmp_path / "labels" / "00001.png", values=(7,))
    layout, pairs = find_pairs(tmp_path, layout="generic")
    assert layout == "generic" and pairs[0].label_map is None


# ----------------------------------------------------------------------------------------------------------
# bad input


def test_missing_label_names_image_and_expected_path(tmp_path):
    image = write_image(tmp_path / "images" / "scene_a.png")
    (tmp_path / "labels").mkdir()
    with pytest.raises(FisherscanError) as err:
        find_pairs(tmp_path, "generic")
    message = str(err.value)
    assert str(image) in message and str(tmp_path / "labels" / "scene_a.png") in message
    assert "\n" not in message


def test_missing_label_gta5_lists_both_candidates(tmp_path):
    write_image(tmp_path / "images" / "00001.png")
    (tmp_path / "labels").mkdir()
    with pytest.raises(FisherscanError) as err:
        find_pairs(tmp_path)
    assert "00001_labelTrainIds.png" in str(err.value) and str(tmp_path / "labels" / "00001.png") in str(err.value)


def test_size_mismatch(tmp_path):
    image = write_image(tmp_path / "images" / "a.png", h=20, w=30)
    label = write_label(tmp_path / "labels" / "a.png", h=20, w=31)
    pairs = find_pairs(tmp_path, "generic")[1]
    for check in (validate_pairs, lambda p: load_pair(p[0])):
        with pytest.raises(FisherscanError) as err:
            check(pairs)
        message = str(err.value)
        assert str(image) in message and str(label) in message
        assert "30x20" in message and "31x20" in message and "\n" not in message


def test_corrupt_image(tmp_path):
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"this is not a png at all" * 10)
    write_label(tmp_path / "labels" / "a.png")
    pairs = find_pairs(tmp_path, "generic")[1]
    for check in (validate_pairs, lambda p: load_pair(p[0])):
        with pytest.raises(FisherscanError) as err:
            check(pairs)
        assert str(image) in str(err.value) and "\n" not in str(err.value)


def test_truncated_label(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    label = write_label(tmp_path / "labels" / "a.png", values=tuple(range(19)))
    label.write_bytes(label.read_bytes()[:60])
    with pytest.raises(FisherscanError, match="a.png"):
        load_pair(find_pairs(tmp_path, "generic")[1][0])


def test_label_value_outside_train_ids(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    label = write_label(tmp_path / "labels" / "a.png", values=(0, 40, 255))
    with pytest.raises(FisherscanError) as err:
        load_pair(find_pairs(tmp_path, "generic")[1][0])
    message = str(err.value)
    assert str(label) in message and "40" in message and "--layout" in message and "\n" not in message


def test_rgb_label_rejected(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    label = write_image(tmp_path / "labels" / "a.png")
    with pytest.raises(FisherscanError, match="single-channel") as err:
        load_pair(find_pairs(tmp_path, "generic")[1][0])
    assert str(label) in str(err.value)


def test_missing_and_empty_folders(tmp_path):
    missing = tmp_path / "nowhere"
    for call in (lambda: detect_layout(missing), lambda: find_pairs(missing)):
        with pytest.raises(FisherscanError, match="not found") as err:
            call()
        assert str(missing) in str(err.value)

    with pytest.raises(FisherscanError, match="cannot recognise") as err:
        detect_layout(tmp_path)
    assert str(tmp_path) in str(err.value)

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(FisherscanError, match="no images") as err:
        find_pairs(tmp_path, "generic")
    assert str(tmp_path / "images") in str(err.value)

    with pytest.raises(FisherscanError, match="not found") as err:
        find_pairs(tmp_path, "cityscapes")
    assert str(tmp_path / "leftImg8bit" / "train") in str(err.value)


def test_unknown_layout_lists_layouts(tmp_path):
    with pytest.raises(FisherscanError) as err:
        find_pairs(tmp_path, "kitti")
    assert all(name in str(err.value) for name in LAYOUTS)


# ----------------------------------------------------------------------------------------------------------
# selection


def _fake_pairs(n: int) -> list[Pair]:
    return [Pair(Path(f"img{k:02d}.png"), Path(f"lab{k:02d}.png"), None) for k in range(n)]


def test_select_images():
    pairs = _fake_pairs(10)
    shuffled = pairs[::-1]
    for n in (None, 0, -1, 10, 50):
        assert select_images(shuffled, n, seed=3) == pairs
    chosen = select_images(shuffled, 4, seed=3)
    expected = [pairs[j] for j in np.random.default_rng(3).permutation(10)[:4]]
    assert chosen == expected and len(set(chosen)) == 4
    assert select_images(pairs, 4, seed=3) == chosen
    assert select_images(pairs, 4, seed=4) != chosen


# ----------------------------------------------------------------------------------------------------------
# dataset


def make_coded(root: Path, sizes: list[tuple[int, int]]) -> list[Pair]:
    """Generic pairs whose image colour encodes position and label: R = y, G = x, label = (y + 2x) % 19."""
    for k, (h, w) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        image = np.stack([y, x, np.full_like(y, 7)], axis=-1).astype(np.uint8)
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"{k:03d}.png")
        write_label(root / "labels" / f"{k:03d}.png", values=((y + 2 * x) % 19).ravel(), h=h, w=w)
    return find_pairs(root, "generic")[1]


def denormalise(image: torch.Tensor) -> np.ndarray:
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    return np.rint((image.numpy() * std + mean) * 255).astype(np.int64)


def test_padded_size():
    assert padded_size(20, 14) == 28
    assert padded_size(28, 14) == 28
    assert padded_size(512, 1) == 512
    assert padded_size(512, 16) == 512


def test_item_shapes_and_dtypes(tmp_path):
    pairs = make_coded(tmp_path, [(40, 50), (30, 60)])
    dataset = SegmentationDataset(pairs, crop=16)
    assert len(dataset) == 2
    image, label, index = dataset[1]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert label.shape == (16, 16) and label.dtype == torch.int64
    assert index == 1
    assert int(label.max()) < 19  # no padding needed


def test_small_image_padded_with_ignore(tmp_path):
    pairs = make_coded(tmp_path, [(10, 12)])
    for augment in (False, True):
        image, label, _ = SegmentationDataset(pairs, crop=16, augment=augment)[0]
        assert int((label != IGNORE_INDEX).sum()) == 10 * 12
        assert int((label == IGNORE_INDEX).sum()) == 16 * 16 - 10 * 12
        assert torch.all(image[:, label == IGNORE_INDEX] == 0)
    image, label, _ = SegmentationDataset(pairs, crop=16, augment=False)[0]
    assert torch.all(label[10:, :] == IGNORE_INDEX) and torch.all(label[:, 12:] == IGNORE_INDEX)


def test_pad_multiple(tmp_path):
    pairs = make_coded(tmp_path, [(40, 50)])
    image, label, _ = SegmentationDataset(pairs, crop=20, pad_multiple=14)[0]
    assert image.shape == (3, 28, 28) and label.shape == (28, 28)
    assert torch.all(label[20:, :] == IGNORE_INDEX) and torch.all(label[:, 20:] == IGNORE_INDEX)
    assert torch.all(image[:, 20:, :] == 0) and torch.all(image[:, :, 20:] == 0)
    assert torch.all(label[:20, :20] != IGNORE_INDEX)


def test_no_augment_is_top_left(tmp_path):
    pairs = make_coded(tmp_path, [(40, 50)])
    image, label, _ = SegmentationDataset(pairs, crop=16, augment=False)[0]
    raw_image, raw_label = load_pair(pairs[0])
    assert np.array_equal(label.numpy(), raw_label[:16, :16])
    assert np.array_equal(denormalise(image).transpose(1, 2, 0), raw_image[:16, :16])


def test_determinism_and_seed(tmp_path):
    pairs = make_coded(tmp_path, [(60, 60)] * 4)
    a = SegmentationDataset(pairs, crop=16, seed=1)
    b = SegmentationDataset(pairs, crop=16, seed=1)
    c = SegmentationDataset(pairs, crop=16, seed=2)
    for i in range(len(pairs)):
        assert torch.equal(a[i][0], a[i][0]) and torch.equal(a[i][1], b[i][1])
    assert any(not torch.equal(a[i][0], c[i][0]) for i in range(len(pairs)))


def test_crop_and_flip_consistent(tmp_path):
    pairs = make_coded(tmp_path, [(40, 50), (25, 12)] * 6)
    dataset = SegmentationDataset(pairs, crop=16, pad_multiple=14, seed=5)
    flips = offsets = 0
    for i in range(len(dataset)):
        image, label, _ = dataset[i]
        rgb = denormalise(image)
        valid = label.numpy() != IGNORE_INDEX
        y, x = rgb[0][valid], rgb[1][valid]
        assert np.array_equal(label.numpy()[valid], (y + 2 * x) % 19)  # label follows the image pixels
        assert np.all(rgb[2][valid] == 7)
        row = rgb[1][0][valid[0]]
        flips += bool(row[0] > row[-1])
        offsets += bool(rgb[0][0, 0] > 0 or min(row) > 0)
    assert 0 < flips < len(dataset)  # both flipped and unflipped items occur
    assert offsets > 0  # crops do not all start at the top-left


def test_loader_order_and_workers(tmp_path):
    pairs = make_coded(tmp_path, [(30, 30)] * 5)
    dataset = SegmentationDataset(pairs, crop=16, seed=9)
    batches = list(make_loader(dataset, batch_size=2))
    assert [b[2].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert batches[0][0].shape == (2, 3, 16, 16)
    single = list(make_loader(dataset, batch_size=1, workers=2))
    for i, (image, label, index) in enumerate(single):
        assert index.item() == i
        assert torch.equal(image[0], batches[i // 2][0][i % 2])
        assert torch.equal(label[0], batches[i // 2][1][i % 2])


def test_loader_worker_error_is_one_line(tmp_path):
    pairs = make_coded(tmp_path, [(30, 30)] * 2)
    pairs[1].image.write_bytes(b"garbage")
    loader = make_loader(SegmentationDataset(pairs, crop=16), batch_size=1, workers=1)
    with pytest.raises(FisherscanError) as err:
        list(loader)
    message = str(err.value)
    assert str(pairs[1].image) in message and "\n" not in message
