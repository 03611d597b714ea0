"""The label space every data set ends in: the 19 Cityscapes trainIds, 255 = ignore, and the maps to it.

The maps follow ``docs/method.md`` ("Data"): Cityscapes/GTA5 raw
labelIds and Mapillary Vistas v1.2's 66 ids, as the Rein / DAFormer / mmsegmentation converters map them.
"""

from __future__ import annotations

import numpy as np

from ..errors import FisherscanError

NUM_CLASSES = 19
IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


