"""Label-id tables, protocols, palette (ecosystem.md B2)."""

from __future__ import annotations

import numpy as np
import pytest

from cossim_fast.data import labels as L

CITYSCAPES_TABLE = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
SYNTHIA_TABLE = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10,
    10: 11, 17: 12, 8: 13, 19: 15, 12: 17, 11: 18,
}  # fmt: skip


@pytest.mark.parametrize(
    ("lut", "table"),
    [
        (L.CITYSCAPES_ID_TO_TRAINID, CITYSCAPES_TABLE),
        (L.GTA5_ID_TO_TRAINID, CITYSCAPES_TABLE),
        (L.SYNTHIA_ID_TO_TRAINID, SYNTHIA_TABLE),
    ],
)
def test_lut_matches_table_and_unknown_ids_are_ignored(lut: np.ndarray, table: dict[int, int]) -> None:
    assert lut.shape == (256,) and lut.dtype == np.uint8
    for raw in range(256):
        assert lut[raw] == table.get(raw, 255), raw
    assert not lut.flags.writeable


def test_spot_checks() -> None:
    assert L.CITYSCAPES_ID_TO_TRAINID[7] == 0  # road
    assert L.CITYSCAPES_ID_TO_TRAINID[26] == 13  # car
    assert L.CITYSCAPES_ID_TO_TRAINID[0] == 255  # unlabeled
    assert L.CITYSCAPES_ID_TO_TRAINID[34] == 255  # license plate (-1 in cityscapesScripts)
    assert L.SYNTHIA_ID_TO_TRAINID[1] == 10  # sky
    assert L.SYNTHIA_ID_TO_TRAINID[21] == 3  # wall
    assert L.SYNTHIA_ID_TO_TRAINID[0] == 255
    # SYNTHIA has no terrain, truck or train.
    assert not {9, 14, 16} & set(L.SYNTHIA_ID_TO_TRAINID.tolist())
    assert len(set(L.SYNTHIA_ID_TO_TRAINID.tolist()) - {255}) == 16


def test_inverse_table_round_trips() -> None:
    ids = L.TRAINID_TO_CITYSCAPES_ID[np.arange(19)]
    assert (L.CITYSCAPES_ID_TO_TRAINID[ids] == np.arange(19)).all()
    assert L.TRAINID_TO_CITYSCAPES_ID[255] == 0


def test_protocols() -> None:
    assert [len(L.PROTOCOLS[n]) for n in (19, 16, 13)] == [19, 16, 13]
    assert set(L.PROTOCOLS[19]) - set(L.PROTOCOLS[16]) == {9, 14, 16}
    assert set(L.PROTOCOLS[16]) - set(L.PROTOCOLS[13]) == {3, 4, 5}
    assert [L.CLASS_NAMES[c] for c in L.PROTOCOLS[13]] == [
        "road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation", "sky",
        "person", "rider", "car", "bus", "motorcycle", "bicycle",
    ]  # fmt: skip
    assert L.protocol_classes([0, 13]) == (0, 13)
    with pytest.raises(ValueError, match="unknown protocol"):
        L.protocol_classes(7)
    with pytest.raises(ValueError):
        L.protocol_classes([19])


def test_names_and_palette() -> None:
    assert len(L.CLASS_NAMES) == L.NUM_CLASSES == 19
    assert L.CLASS_NAMES[0] == "road" and L.CLASS_NAMES[18] == "bicycle"
    assert L.PALETTE.shape == (19, 3) and L.PALETTE.dtype == np.uint8
    assert tuple(L.PALETTE[0]) == (128, 64, 128)
    assert len({tuple(c) for c in L.PALETTE}) == 19


def test_map_ids_any_integer_dtype() -> None:
    raw16 = np.array([[7, 26, 300], [65535, 0, 33]], dtype=np.uint16)
    assert L.map_ids(raw16, L.CITYSCAPES_ID_TO_TRAINID).tolist() == [[0, 13, 255], [255, 255, 18]]
    raw32 = np.array([-1, 8], dtype=np.int32)
    assert L.map_ids(raw32, L.CITYSCAPES_ID_TO_TRAINID).tolist() == [255, 1]
    assert L.map_ids(np.array([3], dtype=np.uint8), L.SYNTHIA_ID_TO_TRAINID).dtype == np.uint8
    with pytest.raises(TypeError):
        L.map_ids(np.zeros(2, dtype=np.float32), L.CITYSCAPES_ID_TO_TRAINID)


def test_colorize() -> None:
    out = L.colorize(np.array([[0, 255], [13, 18]]))
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (128, 64, 128) and tuple(out[0, 1]) == (0, 0, 0)
    assert tuple(out[1, 0]) == (0, 0, 142)
