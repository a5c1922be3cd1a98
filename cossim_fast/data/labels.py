"""Label-id tables for GTA5 / SYNTHIA -> Cityscapes (19 train ids, ignore 255).

Raw ids are what the datasets store on disk; train ids are what the network predicts.
Every table is a read-only 256-entry ``uint8`` array indexed by raw id, so mapping a label
map is one fancy-indexing step (``table[raw]``); unknown ids map to ``IGNORE_INDEX``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

NUM_CLASSES = 19
IGNORE_INDEX = 255

#: Class names in train-id order (Cityscapes 19-class benchmark).
CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
    "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

#: Cityscapes colours in train-id order, for visualising label maps.
PALETTE: np.ndarray = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
        (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)  # fmt: skip

# Raw Cityscapes id -> train id (cityscapesScripts labels.py; GTA5 uses the same ids).
_CITYSCAPES_PAIRS: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

# Raw SYNTHIA-RAND-CITYSCAPES id -> Cityscapes train id (no terrain, truck, train).
_SYNTHIA_PAIRS: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10,
    10: 11, 17: 12, 8: 13, 19: 15, 12: 17, 11: 18,
}  # fmt: skip


def _make_lut(pairs: Mapping[int, int], default: int = IGNORE_INDEX) -> np.ndarray:
    lut = np.full(256, default, dtype=np.uint8)
    for raw_id, train_id in pairs.items():
        lut[raw_id] = train_id
    lut.flags.writeable = False  # shared module-level tables must not be mutated by callers
    return lut


CITYSCAPES_ID_TO_TRAINID: np.ndarray = _make_lut(_CITYSCAPES_PAIRS)
GTA5_ID_TO_TRAINID: np.ndarray = _make_lut(_CITYSCAPES_PAIRS)
SYNTHIA_ID_TO_TRAINID: np.ndarray = _make_lut(_SYNTHIA_PAIRS)

#: Train id -> raw Cityscapes id (256 entries; 255 and unused ids -> 0 "unlabeled").
TRAINID_TO_CITYSCAPES_ID: np.ndarray = _make_lut({t: r for r, t in _CITYSCAPES_PAIRS.items()}, default=0)

#: Evaluation protocols: the train ids averaged in mIoU19 / mIoU16 / mIoU13.
PROTOCOLS: dict[int, tuple[int, ...]] = {19: tuple(range(NUM_CLASSES))}
PROTOCOLS[16] = tuple(c for c in PROTOCOLS[19] if c not in (9, 14, 16))  # no terrain, truck, train
PROTOCOLS[13] = tuple(c for c in PROTOCOLS[16] if c not in (3, 4, 5))  # no wall, fence, pole


def protocol_classes(protocol: int | Sequence[int]) -> tuple[int, ...]:
    """Train ids of a protocol given as 19 / 16 / 13, or an explicit list of train ids."""
    if isinstance(protocol, int):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol}; expected one of {sorted(PROTOCOLS)}")
        return PROTOCOLS[protocol]
    classes = tuple(int(c) for c in protocol)
    if not classes or any(not 0 <= c < NUM_CLASSES for c in classes):
        raise ValueError(f"class list must be non-empty train ids in [0, {NUM_CLASSES}), got {classes}")
    return classes


def map_ids(raw: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map a raw-id label map of any integer dtype to train ids (``uint8``; unknown -> 255)."""
    if not np.issubdtype(raw.dtype, np.integer):
        raise TypeError(f"label map must have an integer dtype, got {raw.dtype}")
    if raw.dtype == np.uint8:
        return lut[raw]
    # Ids outside [0, 255] (16-bit SYNTHIA files, int32 'I' PNGs) are unknown: ignore.
    inside = (raw >= 0) & (raw < lut.shape[0])
    return np.where(inside, lut[np.clip(raw, 0, lut.shape[0] - 1)], IGNORE_INDEX).astype(np.uint8)


def colorize(train_ids: np.ndarray, ignore_color: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """Colour an ``H x W`` train-id map with the Cityscapes palette (``H x W x 3`` uint8)."""
    table = np.tile(np.asarray(ignore_color, dtype=np.uint8), (256, 1))
    table[:NUM_CLASSES] = PALETTE
    return table[np.clip(train_ids, 0, 255)]
