"""The data layer: labelled image folders in the layouts users have, crops and augmentation, generated scenes.

``labels`` (the 19 trainIds, 255 = ignore, label maps), ``layouts`` (finding image/label pairs), ``datasets``
(decoding, checking, cropping, loading), ``augment`` (Rein's training augmentation), ``scenes`` and ``synthetic``
(procedural street scenes in several visual styles, for the demo, the benchmark and the tests).
"""

from .datasets import (
                       EpochSampler,
                       SegmentationDataset,
                       check_pairs,
                       load_pair,
                       make_loader,
                       padded_size,
                       skipped_note,
                       validate_pairs,
)
from .labels import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES, label_lut
from .layouts import LAYOUTS, Pair, detect_layout, find_pairs, select_images

__all__ = ["EpochSampler", "SegmentationDataset", "check_pairs", "load_pair", "make_loader", "padded_size",
           "skipped_note", "validate_pairs", "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "NUM_CLASSES",
           "label_lut", "LAYOUTS", "Pair", "detect_layout", "find_pairs", "select_images"]
