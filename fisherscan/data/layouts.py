"""Image/label pairs in the folder layouts users already have (Rein / DAFormer / mmsegmentation conversions).

``find_pairs`` recognises gta5, cityscapes, bdd100k, mapillary, acdc and generic folders (``--layout auto``) and
returns every pair with the label map it needs; ``select_images`` draws a seeded subset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import FisherscanError

LAYOUTS = ("gta5", "cityscapes", "bdd100k", "mapillary", "acdc", "generic")
_MAPILLARY_SPLITS = {"train": "training", "val": "validation"}
_GTA5_FRAME = re.compile(r"^\d{5}\.png$")
_GENERIC_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Pair:
    """One image and its label file.

    label_map: None when the label already holds trainIds, "cityscapes" for raw Cityscapes/GTA5 labelIds,
    "mapillary" for the 66 Mapillary Vistas v1.2 ids. ``label`` None: an unlabelled image (``score --shift-data``).
    """

    image: Path
    label: Path | None
    label_map: str | None


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


