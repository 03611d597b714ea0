"""Segmentation data: find image/label pairs in the folder layouts users already have, decode and crop them.

The layouts and label maps follow the method notes' DATASETS.md (Rein / DAFormer / mmsegmentation conversions).
Every label ends as the 19 Cityscapes trainIds with 255 = ignore. Images are never rescaled: an item is a
random (or, without augmentation, top-left) crop, padded where the image is smaller than the crop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from fisherscan.errors import FisherscanError
from fisherscan.rng import keyed_generator

NUM_CLASSES = 19
IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUTS = ("gta5", "cityscapes", "bdd100k", "mapillary", "acdc", "generic")
LABEL_MAPS = ("cityscapes", "mapillary")

# Cityscapes / GTA5 labelId -> trainId; every other id -> 255 (explicit table, as DAFormer/Rein's gta.py).
CITYSCAPES_LABELID_TO_TRAINID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# Mapillary Vistas v1.2 (66 ids) -> trainId, the Rein/openseg rule set; every other id -> 255.
MAPILLARY_TO_TRAINID = {
    2: 1,    # Curb
    3: 4,    # Fence
    6: 3,    # Wall
    7: 0,    # Bike Lane
    8: 0,    # Crosswalk - Plain
    9: 1,    # Curb Cut
    10: 0,   # Parking
    11: 1,   # Pedestrian Area
    13: 0,   # Road
    14: 0,   # Service Lane
    15: 1,   # Sidewalk
    17: 2,   # Building
    19: 11,  # Person
    20: 12,  # Bicyclist
    21: 12,  # Motorcyclist
    22: 12,  # Other Rider
    23: 0,   # Lane Marking - Crosswalk
    24: 0,   # Lane Marking - General
    27: 10,  # Sky
    29: 9,   # Terrain
    30: 8,   # Vegetation
    44: 5,   # Street Light
    45: 5,   # Pole
    46: 7,   # Traffic Sign Frame
    47: 5,   # Utility Pole
    48: 6,   # Traffic Light
    49: 7,   # Traffic Sign (Back)
    50: 7,   # Traffic Sign (Front)
    52: 18,  # Bicycle
    54: 15,  # Bus
    55: 13,  # Car
    57: 17,  # Motorcycle
    58: 16,  # On Rails
    61: 14,  # Truck
}

_MAPILLARY_SPLITS = {"train": "training", "val": "validation"}
_GTA5_FRAME = re.compile(r"^\d{5}\.png$")
_GENERIC_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Pair:
    """One image and its label file.

    label_map: None when the label already holds trainIds, "cityscapes" for raw Cityscapes/GTA5 labelIds,
    "mapillary" for the 66 Mapillary Vistas v1.2 ids.
    """

    image: Path
    label: Path
    label_map: str | None


# ----------------------------------------------------------------------------------------------------------
# Label maps


def label_lut(label_map: str | None) -> np.ndarray:
    """A uint8 lookup table of 256 entries from raw label value to trainId (unmapped values -> 255)."""
    if label_map is None:
        return np.arange(256, dtype=np.uint8)
    tables = {"cityscapes": CITYSCAPES_LABELID_TO_TRAINID, "mapillary": MAPILLARY_TO_TRAINID}
    if label_map not in tables:
        raise FisherscanError(f"unknown label map {label_map!r}; use one of: {', '.join(LABEL_MAPS)}")
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for raw, train_id in tables[label_map].items():
        lut[raw] = train_id
    return lut


# ----------------------------------------------------------------------------------------------------------
# Layout detection


def _is_gta5_images(images: Path) -> bool:
    """True when images/ is flat and every image in it is a GTA5 frame name such as 00001.png."""
    names = [p.name for p in images.iterdir() if not p.name.startswith(".")]
    return bool(names) and all(_GTA5_FRAME.match(name) for name in names)


def detect_layout(root: Path) -> str:
    """The layout name of the dataset folder ``root``, recognised by its characteristic sub-folders."""
    root = Path(root)
    if not root.is_dir():
        raise FisherscanError(f"{root}: dataset folder not found; pass an existing dataset folder")
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    if (root / "rgb_anon").is_dir():
        return "acdc"
    if (root / "images" / "10k").is_dir():
        return "bdd100k"
    if (root / "training" / "images").is_dir() or (root / "validation" / "images").is_dir():
        return "mapillary"
    images, labels = root / "images", root / "labels"
    if images.is_dir() and labels.is_dir():
        if next(labels.glob("*_labelTrainIds.png"), None) is not None or _is_gta5_images(images):
            return "gta5"
        return "generic"
    raise FisherscanError(
        f"{root}: cannot recognise the dataset layout; expected leftImg8bit/ (cityscapes), rgb_anon/ (acdc), "
        "images/10k/ (bdd100k), training/images/ or validation/images/ (mapillary), or images/ + labels/ "
        "(gta5, generic); pass the dataset's root folder or --layout"
    )


# ----------------------------------------------------------------------------------------------------------
# Pair finding, one function per layout


def _require_dir(folder: Path, expected: str) -> None:
    """FisherscanError naming ``folder`` unless it exists."""
    if not folder.is_dir():
        raise FisherscanError(f"{folder}: folder not found; expected {expected}; check the dataset root and --layout")


def _require_images(images: list[Path], folder: Path, pattern: str) -> list[Path]:
    """FisherscanError naming ``folder`` when no image matched ``pattern`` in it."""
    if not images:
        raise FisherscanError(f"{folder}: no images found (expected {pattern}); check the dataset root and --layout")
    return images


def _first_existing(image: Path, candidates: Sequence[tuple[Path, str | None]]) -> Pair:
    """The Pair for the first candidate label that exists, else a FisherscanError naming what was expected."""
    for label, label_map in candidates:
        if label.is_file():
            return Pair(image, label, label_map)
    expected = " or ".join(str(label) for label, _ in candidates)
    raise FisherscanError(f"{image}: label not found, expected {expected}; add the label or remove the image")


def _gta5_pairs(root: Path, split: str) -> list[Pair]:
    """GTA5: images/*.png with labels/<stem>_labelTrainIds.png, else raw labelIds labels/<stem>.png."""
    images_dir, labels_dir = root / "images", root / "labels"
    _require_dir(images_dir, "images/*.png (gta5)")
    _require_dir(labels_dir, "labels/*.png (gta5)")
    images = _require_images(sorted(images_dir.glob("*.png")), images_dir, "*.png")
    return [
        _first_existing(image, [
            (labels_dir / f"{image.stem}_labelTrainIds.png", None),
            (labels_dir / f"{image.stem}.png", "cityscapes"),
        ])
        for image in images
    ]


def _cityscapes_pairs(root: Path, split: str) -> list[Pair]:
    """Cityscapes: leftImg8bit/<split>/<city>/X_leftImg8bit.png with gtFine/<split>/<city>/X_gtFine_*.png."""
    images_dir = root / "leftImg8bit" / split
    _require_dir(images_dir, f"leftImg8bit/{split}/<city>/*_leftImg8bit.png (cityscapes)")
    images = _require_images(sorted(images_dir.glob("*/*_leftImg8bit.png")), images_dir, "<city>/*_leftImg8bit.png")
    pairs = []
    for image in images:
        base = image.name[: -len("_leftImg8bit.png")]
        gt = root / "gtFine" / split / image.parent.name
        pairs.append(_first_existing(image, [
            (gt / f"{base}_gtFine_labelTrainIds.png", None),
            (gt / f"{base}_gtFine_labelIds.png", "cityscapes"),
        ]))
    return pairs


def _bdd100k_pairs(root: Path, split: str) -> list[Pair]:
    """BDD100K: images/10k/<split>/*.jpg with labels/sem_seg/masks/<split>/<stem>.png (trainIds)."""
    images_dir = root / "images" / "10k" / split
    _require_dir(images_dir, f"images/10k/{split}/*.jpg (bdd100k)")
    images = _require_images(sorted(images_dir.glob("*.jpg")), images_dir, "*.jpg")
    masks = root / "labels" / "sem_seg" / "masks" / split
    return [_first_existing(image, [(masks / f"{image.stem}.png", None)]) for image in images]


def _mapillary_pairs(root: Path, split: str) -> list[Pair]:
    """Mapillary: <split>/images/*.jpg with converted trainId labels if present, else v1.2 raw labels.

    The converted folder is looked up under both split spellings: Rein's config uses
    cityscapes_trainIdLabel/train/label next to training/images.
    """
    long_split = _MAPILLARY_SPLITS.get(split, split)
    short_split = {v: k for k, v in _MAPILLARY_SPLITS.items()}.get(long_split, long_split)
    images_dir = root / long_split / "images"
    _require_dir(images_dir, f"{long_split}/images/*.jpg (mapillary)")
    images = _require_images(sorted(images_dir.glob("*.jpg")), images_dir, "*.jpg")
    converted = [root / "cityscapes_trainIdLabel" / s / "label" for s in dict.fromkeys([long_split, short_split])]
    raw = root / long_split / "v1.2" / "labels"
    pairs = []
    for image in images:
        candidates = [(folder / f"{image.stem}.png", None) for folder in converted]
        pairs.append(_first_existing(image, candidates + [(raw / f"{image.stem}.png", "mapillary")]))
    return pairs


def _acdc_pairs(root: Path, split: str) -> list[Pair]:
    """ACDC: rgb_anon/<cond>/<split>/<seq>/X_rgb_anon.png with gt/<cond>/<split>/<seq>/X_gt_labelTrainIds.png."""
    rgb = root / "rgb_anon"
    _require_dir(rgb, "rgb_anon/<condition>/<split>/ (acdc)")
    images = sorted(rgb.glob(f"*/{split}/*/*_rgb_anon.png"))
    images = _require_images(images, rgb, f"<condition>/{split}/<sequence>/*_rgb_anon.png")
    pairs = []
    for image in images:
        seq_dir = image.parent
        condition = seq_dir.parent.parent.name
        base = image.name[: -len("_rgb_anon.png")]
        gt = root / "gt" / condition / split / seq_dir.name / f"{base}_gt_labelTrainIds.png"
        pairs.append(_first_existing(image, [(gt, None)]))
    return pairs


def _generic_pairs(root: Path, split: str) -> list[Pair]:
    """Generic: images/**/*.{png,jpg,jpeg} with labels/**/<same relative stem>.png (trainIds); no split."""
    images_dir, labels_dir = root / "images", root / "labels"
    _require_dir(images_dir, "images/**/*.png|jpg|jpeg (generic)")
    _require_dir(labels_dir, "labels/**/*.png (generic)")
    images = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in _GENERIC_SUFFIXES and p.is_file())
    images = _require_images(images, images_dir, "**/*.png, *.jpg or *.jpeg")
    return [
        _first_existing(image, [((labels_dir / image.relative_to(images_dir)).with_suffix(".png"), None)])
        for image in images
    ]


_FINDERS: dict[str, Callable[[Path, str], list[Pair]]] = {
    "gta5": _gta5_pairs,
    "cityscapes": _cityscapes_pairs,
    "bdd100k": _bdd100k_pairs,
    "mapillary": _mapillary_pairs,
    "acdc": _acdc_pairs,
    "generic": _generic_pairs,
}


def find_pairs(root: Path | str, layout: str = "auto", split: str = "train") -> tuple[str, list[Pair]]:
    """(resolved layout, image/label pairs sorted by image path) of the dataset in ``root``.

    ``split`` selects train/val where the layout has splits; gta5 and generic have none and ignore it.
    """
    root = Path(root)
    if layout != "auto" and layout not in LAYOUTS:
        raise FisherscanError(f"unknown layout {layout!r}; use auto or one of: {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise FisherscanError(f"{root}: dataset folder not found; pass an existing dataset folder")
    if layout == "auto":
        layout = detect_layout(root)
    pairs = sorted(_FINDERS[layout](root, split), key=lambda pair: pair.image)
    return layout, pairs


def select_images(pairs: Sequence[Pair], n: int | None, seed: int) -> list[Pair]:
    """All pairs in sorted order when n is None, <= 0 or >= len(pairs); else n pairs drawn with ``seed``.

    The subset is the first n of numpy ``default_rng(seed).permutation`` over the sorted pairs, kept in
    permutation order.
    """
    ordered = sorted(pairs, key=lambda pair: pair.image)
    if n is None or n <= 0 or n >= len(ordered):
        return ordered
    order = np.random.default_rng(seed).permutation(len(ordered))[:n]
    return [ordered[j] for j in order]


# ----------------------------------------------------------------------------------------------------------
# Reading files


def _one_line(exc: Exception) -> str:
    """An exception as one line of text."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unreadable(path: Path, exc: Exception) -> FisherscanError:
    return FisherscanError(f"{path}: cannot read the image ({_one_line(exc)}); replace or remove this file")


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:
        raise _unreadable(path, exc) from None


def _check_same_size(pair: Pair, image_size: tuple[int, int], label_size: tuple[int, int]) -> None:
    if image_size != label_size:
        (iw, ih), (lw, lh) = image_size, label_size
        raise FisherscanError(
            f"{pair.image} is {iw}x{ih} but its label {pair.label} is {lw}x{lh} (width x height); "
            "an image and its label must have the same size: fix or remove this pair"
        )


def validate_pairs(pairs: Sequence[Pair]) -> None:
    """Open every image and label header (no pixel decoding): unreadable files and size mismatches raise."""
    for pair in pairs:
        _check_same_size(pair, _header_size(pair.image), _header_size(pair.label))


def check_pairs(pairs: Sequence[Pair], skip_bad: bool = False) -> tuple[list[Pair], list[dict]]:
    """(usable pairs in their order, skipped pairs) -- the ``--skip-bad`` decision, made once before a run.

    Without ``skip_bad`` this is :func:`validate_pairs` (headers only; the first bad pair raises, and a file whose
    pixels are corrupt still raises when it is decoded). With ``skip_bad`` every pair is decoded in full
    (:func:`load_pair`: unreadable or corrupt files, size mismatches, label values outside the trainIds) and the
    bad ones are left out, each listed as ``{"image", "label", "reason"}``; the set is fixed up front, so a resumed
    run skips the same pairs. It is an error when no pair is left.
    """
    if not skip_bad:
        validate_pairs(pairs)
        return list(pairs), []
    kept, skipped = [], []
    for pair in pairs:
        try:
            load_pair(pair)
        except FisherscanError as error:
            skipped.append({"image": str(pair.image), "label": str(pair.label), "reason": str(error)})
        else:
            kept.append(pair)
    if not kept:
        raise FisherscanError(f"--skip-bad: all {len(skipped)} image/label pairs are unreadable or invalid (first: "
                              f"{skipped[0]['reason']}); fix the data set")
    return kept, skipped


def skipped_note(skipped: Sequence[dict], total: int) -> str:
    """One line for the printed summary: how many pairs --skip-bad left out, and the first few images."""
    shown = ", ".join(Path(s["image"]).name for s in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    return (f"--skip-bad: {len(skipped)} of {total} image/label pairs were unreadable or invalid and skipped "
            f"({shown}; all listed in the metadata)")


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:
        raise _unreadable(path, exc) from None


def _read_label(path: Path) -> np.ndarray:
    """The raw label values of a single-channel label image, as a 2-D integer array."""
    try:
        with Image.open(path) as im:
            bands = im.getbands()
            array = np.asarray(im)
    except Exception as exc:
        raise _unreadable(path, exc) from None
    if len(bands) != 1:
        raise FisherscanError(
            f"{path}: label has {len(bands)} channels ({''.join(bands)}); expected a single-channel PNG of class ids "
            "(convert colour-coded labels to ids first)"
        )
    return array


def _bad_values_error(pair: Pair, values: np.ndarray) -> FisherscanError:
    shown = ", ".join(str(int(v)) for v in values[:10]) + (", ..." if len(values) > 10 else "")
    mapped = f" after the {pair.label_map!r} label map" if pair.label_map else ""
    return FisherscanError(
        f"{pair.label}: label values {shown}{mapped} are not trainIds (0-18, 255 = ignore); pass --layout with the "
        "right label map (raw Cityscapes/GTA5 labelIds: cityscapes or gta5, Mapillary v1.2 ids: mapillary)"
    )


def load_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 (H, W, 3), trainId label int64 (H, W)) of one pair, the label map applied and checked."""
    image = _read_rgb(pair.image)
    raw = _read_label(pair.label)
    _check_same_size(pair, (image.shape[1], image.shape[0]), (raw.shape[1], raw.shape[0]))
    if raw.dtype != np.uint8:
        raw = raw.astype(np.int64)
        out_of_byte = np.unique(raw[(raw < 0) | (raw > 255)])
        if out_of_byte.size:
            raise _bad_values_error(pair, out_of_byte)
    label = label_lut(pair.label_map)[raw]
    counts = np.bincount(label.ravel(), minlength=256)
    bad = np.flatnonzero(counts[NUM_CLASSES:IGNORE_INDEX]) + NUM_CLASSES
    if bad.size:
        raise _bad_values_error(pair, bad)
    return image, label.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Dataset and loader


def padded_size(crop: int, pad_multiple: int) -> int:
    """The smallest multiple of ``pad_multiple`` that is >= ``crop``."""
    if pad_multiple < 1:
        raise FisherscanError(f"pad multiple {pad_multiple} is invalid; it must be at least 1")
    return -(-crop // pad_multiple) * pad_multiple


class SegmentationDataset(torch.utils.data.Dataset):
    """Items (image float32 (3, S, S), label int64 (S, S), index) with S = padded_size(crop, pad_multiple).

    Each item is a crop x crop window of the unscaled image: random position and horizontal flip drawn from
    ``keyed_generator(seed, index, "crop")`` (so independent of workers and batch size), or the top-left
    window without flip when ``augment`` is False. A side smaller than ``crop`` is padded first (image with
    the mean colour, i.e. 0 after normalisation; label with 255). The window is normalised with
    (x / 255 - mean) / std and then padded bottom/right to S with 0 (image) and 255 (label). With an
    ``augmentation`` (``fisherscan.augment.Augmentation``) it replaces the window and flip: resize, class-balanced
    crop, flip and photometric distortion, drawn from ``augment_rng(seed, index, visit)``.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        crop: int,
        *,
        pad_multiple: int = 1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
        augment: bool = True,
        augmentation: Callable | None = None,
    ):
        if crop < 1:
            raise FisherscanError(f"crop size {crop} is invalid; pass a crop of at least 1 pixel")
        self.pairs = list(pairs)
        self.crop = int(crop)
        self.size = padded_size(self.crop, pad_multiple)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.seed = int(seed)
        self.augment = augment
        self.augmentation = augmentation if augment else None

    def __len__(self) -> int:
        return len(self.pairs)

    def _window(self, index: int, height: int, width: int, visit: int = 0) -> tuple[int, int, bool]:
        """(top, left, flip) of the crop window in an image of height x width (padded up to the crop)."""
        if not self.augment:
            return 0, 0, False
        gen = keyed_generator(self.seed, index, "crop", visit)
        top = int(torch.randint(0, max(height - self.crop, 0) + 1, (1,), generator=gen))
        left = int(torch.randint(0, max(width - self.crop, 0) + 1, (1,), generator=gen))
        flip = bool(torch.rand(1, generator=gen) < 0.5)
        return top, left, flip

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Item ``i``, or ``(i, visit)``: the visit-th time image i is drawn (training epochs crop afresh)."""
        i, visit = item if isinstance(item, tuple) else (item, 0)
        image, label = load_pair(self.pairs[i])
        if self.augmentation is not None:
            from .augment import augment_rng

            image, label = self.augmentation(image, label, self.crop, augment_rng(self.seed, i, visit))
            top, left, flip = 0, 0, False
        else:
            top, left, flip = self._window(i, *label.shape, visit=visit)
        image = image[top : top + self.crop, left : left + self.crop]
        label = label[top : top + self.crop, left : left + self.crop]
        h, w = label.shape

        window_image = np.zeros((self.crop, self.crop, 3), dtype=np.float32)
        window_image[:h, :w] = (image.astype(np.float32) / 255.0 - self.mean) / self.std
        window_label = np.full((self.crop, self.crop), IGNORE_INDEX, dtype=np.int64)
        window_label[:h, :w] = label
        if flip:
            window_image, window_label = window_image[:, ::-1], window_label[:, ::-1]

        out_image = np.zeros((self.size, self.size, 3), dtype=np.float32)
        out_image[: self.crop, : self.crop] = window_image
        out_label = np.full((self.size, self.size), IGNORE_INDEX, dtype=np.int64)
        out_label[: self.crop, : self.crop] = window_label
        return torch.from_numpy(out_image.transpose(2, 0, 1).copy()), torch.from_numpy(out_label), i


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader in dataset order (no shuffle, last partial batch kept, no persistent workers or pinning)."""
    if batch_size < 1:
        raise FisherscanError(f"batch size {batch_size} is invalid; pass a batch size of at least 1")
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=max(int(workers), 0),
        drop_last=False,
        persistent_workers=False,
        pin_memory=False,
    )


class EpochSampler(torch.utils.data.Sampler):
    """Training order: a seeded permutation per epoch, yielding (index, epoch) so crops differ between epochs.

    It starts at draw ``start`` (= steps done x global batch size) so a resumed run sees exactly the remaining
    draws. With ``shard=(rank, world)`` a rank takes the draws rank, rank + world, ... of that one sequence.
    """

    def __init__(self, size: int, seed: int, start: int = 0, total: int | None = None,
                 shard: tuple[int, int] = (0, 1)):
        self.size, self.seed, self.start = size, seed, start
        self.total = total
        self.rank, self.world = shard

    def order(self, epoch: int) -> list[int]:
        return torch.randperm(self.size, generator=keyed_generator(self.seed, epoch, "crop", 1)).tolist()

    def __iter__(self):
        draw, epoch, order = self.start, -1, []
        while self.total is None or draw < self.total:
            if draw // self.size != epoch:
                epoch = draw // self.size
                order = self.order(epoch)
            if draw % self.world == self.rank:
                yield (order[draw % self.size], epoch)
            draw += 1

    def __len__(self) -> int:
        return len(range(self.start + (self.rank - self.start) % self.world, self.total or 0, self.world))
