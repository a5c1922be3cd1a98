"""GTA5 / SYNTHIA / Cityscapes loaders and the pre-flight scan, on tiny (8 x 6) files in tmp_path."""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import png
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cossim_fast.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CityscapesDataset,
    DatasetError,
    GTA5Dataset,
    SynthiaDataset,
    read_synthia_label,
)
from cossim_fast.data import datasets

W, H = 8, 6


def position_image(w: int = W, h: int = H) -> np.ndarray:
    """RGB image whose R channel encodes the column (20 * x) and G the row (20 * y)."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:, :, 0] = 20 * np.arange(w)[None, :]
    img[:, :, 1] = 20 * np.arange(h)[:, None]
    img[:, :, 2] = 77
    return img


def split_label(left_id: int, right_id: int, w: int = W, h: int = H) -> np.ndarray:
    """Raw-id label: ``left_id`` in columns < w/2, ``right_id`` elsewhere."""
    lab = np.full((h, w), right_id, dtype=np.uint8)
    lab[:, : w // 2] = left_id
    return lab


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":  # ids as palette indices, like the GTA5 label files
        im = Image.frombytes("P", (array.shape[1], array.shape[0]), array.tobytes())
        im.putpalette([v % 256 for v in range(768)])
    else:
        im = Image.fromarray(array)
    im.save(path, format="PNG")
    return path


def save_synthia_label(path: Path, class_ids: np.ndarray, instance: int = 1234) -> Path:
    """16-bit 3-channel PNG: class in R, an instance id in G (> 255, so a 16-bit value)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = class_ids.shape
    rgb = np.zeros((h, w, 3), dtype=np.uint16)
    rgb[:, :, 0] = class_ids
    rgb[:, :, 1] = instance
    writer = png.Writer(w, h, greyscale=False, bitdepth=16)
    with open(path, "wb") as f:
        writer.write(f, rgb.reshape(h, w * 3).tolist())
    return path


@pytest.fixture
def gta5_root(tmp_path: Path) -> Callable[..., Path]:
    def make(n: int = 3, left_id: int = 7, right_id: int = 26) -> Path:
        root = tmp_path / "gta5"
        for i in range(n):
            save(root / "images" / f"{i:05d}.png", position_image())
            save(root / "labels" / f"{i:05d}.png", split_label(left_id, right_id), mode="P")
        return root

    return make


@pytest.fixture
def synthia_root(tmp_path: Path) -> Callable[..., Path]:
    def make(n: int = 2) -> Path:
        root = tmp_path / "synthia"
        ids = np.zeros((H, W), dtype=np.uint16)
        ids[:, :2], ids[:, 2:4], ids[:, 4:6], ids[:, 6:] = 3, 10, 8, 22  # road, person, car, unknown
        ids[0, 0] = 300  # out of the 8-bit range: ignore
        for i in range(n):
            save(root / "RGB" / f"{i:07d}.png", position_image())
            save_synthia_label(root / "GT" / "LABELS" / f"{i:07d}.png", ids)
        return root

    return make


@pytest.fixture
def cityscapes_root(tmp_path: Path) -> Callable[..., Path]:
    def make(
        splits: tuple[str, ...] = ("train", "val"), cities: tuple[str, ...] = ("aachen", "bonn")
    ) -> Path:
        root = tmp_path / "cityscapes"
        for split in splits:
            for city in cities:
                for k in range(2):
                    base = f"{city}_{k:06d}_000019"
                    save(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", position_image())
                    save(root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png", split_label(11, 23))
        return root

    return make


# --- loading ----------------------------------------------------------------------------------


def _pixels(image: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: ``H x W x 3`` uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean).mul(255).round().permute(1, 2, 0).numpy().astype(np.uint8)


def test_gta5_sample(gta5_root: Callable[..., Path]) -> None:
    ds = GTA5Dataset(gta5_root(n=3, left_id=7, right_id=34))
    assert len(ds) == 3 and ds.names == ["00000", "00001", "00002"]
    image, label, name = ds[1]
    assert name == "00001"
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert label.shape == (H, W) and label.dtype == torch.int64
    assert (_pixels(image) == position_image()).all()
    expected_r = (20 * 3 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert image[0, 0, 3].item() == pytest.approx(expected_r, abs=1e-6)
    assert label[:, : W // 2].eq(0).all() and label[:, W // 2 :].eq(255).all()  # 7 -> road, 34 -> ignore


@pytest.fixture(params=["opencv", "pypng"])
def synthia_decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each SYNTHIA label decoder in turn: OpenCV where installed, and the pypng fallback."""
    if request.param == "opencv" and datasets._opencv() is None:
        pytest.skip("OpenCV is not installed")
    if request.param == "pypng":
        monkeypatch.setattr(datasets, "_opencv", lambda: None)
    return request.param


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_synthia_reads_16bit_first_channel(synthia_root: Callable[..., Path], synthia_decoder: str) -> None:
    root = synthia_root()
    raw = read_synthia_label(root / "GT" / "LABELS" / "0000000.png")
    assert raw.dtype == np.uint16 and raw.shape == (H, W) and raw[0, 0] == 300
    with Image.open(root / "GT" / "LABELS" / "0000000.png") as im:  # why pypng: Pillow loses the ids
        assert not (np.asarray(im)[:, :, 0] == raw.astype(np.uint8)).all()
    image, label, name = SynthiaDataset(root)[0]
    assert name == "0000000" and image.shape == (3, H, W)
    assert label[1].tolist() == [0, 0, 11, 11, 13, 13, 255, 255]  # road, person, car, unknown 22
    assert label[0, 0] == 255  # id 300


def test_cityscapes_names_splits_and_unlabelled(cityscapes_root: Callable[..., Path]) -> None:
    root = cityscapes_root()
    ds = CityscapesDataset(root, "val")
    assert ds.names == [
        "aachen/aachen_000000_000019", "aachen/aachen_000001_000019",
        "bonn/bonn_000000_000019", "bonn/bonn_000001_000019",
    ]  # fmt: skip
    _, label, _ = ds[0]
    assert label[:, 0].eq(2).all() and label[:, -1].eq(10).all()  # building | sky
    # The unlabelled target split needs no gtFine at all.
    for p in sorted((root / "gtFine").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    unlabelled = CityscapesDataset(root, "train", load_labels=False)
    image, label, _ = unlabelled[3]
    assert image.shape == (3, H, W) and label.numel() == 0 and label.dtype == torch.int64
    assert unlabelled.preflight().labels_checked is False


def test_resize_and_full_resolution_label(gta5_root: Callable[..., Path]) -> None:
    root = gta5_root()
    image, label, _ = GTA5Dataset(root, resize=(4, 3))[0]
    assert image.shape == (3, 3, 4) and label.shape == (3, 4)
    assert label[:, :2].eq(0).all() and label[:, 2:].eq(13).all()  # nearest keeps ids intact
    image, label, _ = GTA5Dataset(root, resize=(4, 3), resize_label=False)[0]
    assert image.shape == (3, 3, 4) and label.shape == (H, W)


def test_images_resize_bilinear_and_labels_nearest(gta5_root: Callable[..., Path]) -> None:
    # Doubling the size: bilinear (half-pixel centres, edges clamped) samples the column x at
    # (j + 0.5) / 2 - 0.5, and the position image's R = 20 * x is linear in x, so its value is
    # exact; nearest would repeat each column twice. Labels take the nearest id, no blends.
    image, label, _ = GTA5Dataset(gta5_root(n=1), resize=(2 * W, 2 * H))[0]
    pixels = _pixels(image).astype(int)
    x = np.clip((np.arange(2 * W) + 0.5) / 2 - 0.5, 0, W - 1)
    y = np.clip((np.arange(2 * H) + 0.5) / 2 - 0.5, 0, H - 1)
    assert (pixels[:, :, 0] == (20 * x)[None, :]).all()
    assert (pixels[:, :, 1] == (20 * y)[:, None]).all()
    assert (label[:, :W] == 0).all() and (label[:, W:] == 13).all()


def test_random_crops_reach_every_offset(gta5_root: Callable[..., Path]) -> None:
    # A 5 x 4 crop of the 8 x 6 image starts at x in 0..3 and y in 0..2, the last ones included;
    # the position image's top-left pixel of a crop says where it starts.
    ds = GTA5Dataset(gta5_root(n=1), crop_size=(5, 4), seed=0)
    starts = {tuple(_pixels(ds[0][0])[0, 0, :2].astype(int) // 20) for _ in range(100)}
    assert starts == {(x, y) for x in range(W - 5 + 1) for y in range(H - 4 + 1)}


def test_crop_and_flip_keep_image_and_label_aligned(gta5_root: Callable[..., Path]) -> None:
    ds = GTA5Dataset(gta5_root(n=1), crop_size=(5, 4), flip=True, seed=3)
    seen_flip = set()
    for _ in range(20):
        image, label, _ = ds[0]
        assert image.shape == (3, 4, 5) and label.shape == (4, 5)
        columns = _pixels(image)[0, :, 0].astype(int) // 20  # original column of each pixel
        expected = np.where(columns < W // 2, 0, 13)  # left id 7 -> 0, right id 26 -> 13
        assert (label.numpy() == expected[None, :]).all()
        seen_flip.add(bool(columns[0] > columns[-1]))
    assert seen_flip == {True, False}


def test_augmentation_is_reproducible_from_seed(gta5_root: Callable[..., Path]) -> None:
    root = gta5_root(n=1)

    def draws(seed: int) -> list[np.ndarray]:
        ds = GTA5Dataset(root, crop_size=(5, 4), flip=True, seed=seed)
        return [ds[0][0].numpy() for _ in range(8)]

    a, b, c = draws(1), draws(1), draws(2)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not all((x == y).all() for x, y in zip(a, c, strict=True))


def test_dataloader_workers_reproducible(gta5_root: Callable[..., Path]) -> None:
    ds = GTA5Dataset(gta5_root(n=4), flip=True, crop_size=(5, 4))

    def epoch() -> torch.Tensor:
        loader = DataLoader(ds, batch_size=2, num_workers=2, generator=torch.Generator().manual_seed(0))
        return torch.cat([images for images, _, _ in loader])

    assert torch.equal(epoch(), epoch())


def test_names_subset(gta5_root: Callable[..., Path]) -> None:
    root = gta5_root(n=3)
    assert GTA5Dataset(root, names=["00002", "00000"]).names == ["00002", "00000"]
    with pytest.raises(DatasetError, match="no image for name '00009'"):
        GTA5Dataset(root, names=["00009"])


def test_bad_options(gta5_root: Callable[..., Path]) -> None:
    root = gta5_root(n=1)
    with pytest.raises(ValueError, match="larger than resize"):
        GTA5Dataset(root, resize=(4, 4), crop_size=(5, 4))
    with pytest.raises(ValueError, match="resize_label"):
        GTA5Dataset(root, crop_size=(2, 2), resize_label=False)
    with pytest.raises(ValueError, match="positive"):
        GTA5Dataset(root, resize=(0, 4))


# --- pre-flight -------------------------------------------------------------------------------


def test_preflight_passes_and_reports(
    gta5_root: Callable[..., Path], synthia_root: Callable[..., Path]
) -> None:
    report = GTA5Dataset(gta5_root(n=3)).preflight(deep=True)
    assert report.num_samples == 3 and report.image_sizes == {(W, H): 3} and report.labels_checked
    assert "GTA5" in str(report) and f"{W}x{H} (3)" in str(report)
    assert SynthiaDataset(synthia_root()).preflight(deep=True).num_samples == 2


def test_missing_folder(
    gta5_root: Callable[..., Path], cityscapes_root: Callable[..., Path], tmp_path: Path
) -> None:
    with pytest.raises(DatasetError, match=r"missing folder .*nowhere[/\\]images \(expected GTA5 layout"):
        GTA5Dataset(tmp_path / "nowhere")
    root = cityscapes_root(splits=("train",))
    with pytest.raises(DatasetError) as info:
        CityscapesDataset(root, "val")
    message = str(info.value)
    assert f"missing folder {root / 'leftImg8bit' / 'val'}" in message
    assert "root/gtFine/val/<city>/*_gtFine_labelIds.png" in message
    (root / "leftImg8bit" / "val").mkdir()
    with pytest.raises(DatasetError, match=r"missing folder .*gtFine[/\\]val"):
        CityscapesDataset(root, "val")
    assert isinstance(info.value, ValueError)


def test_image_without_label(gta5_root: Callable[..., Path], synthia_root: Callable[..., Path]) -> None:
    root = gta5_root(n=3)
    (root / "labels" / "00001.png").unlink()
    with pytest.raises(DatasetError, match=r"00001\.png has no label: expected .*labels[/\\]00001\.png"):
        GTA5Dataset(root)
    assert len(GTA5Dataset(root, load_labels=False)) == 3
    root = synthia_root()
    (root / "GT" / "LABELS" / "0000000.png").unlink()
    with pytest.raises(DatasetError, match="1 problem"):
        SynthiaDataset(root)


def test_unreadable_files(gta5_root: Callable[..., Path], synthia_root: Callable[..., Path]) -> None:
    root = gta5_root(n=3)
    (root / "labels" / "00000.png").write_bytes(b"not a png at all")
    Image.fromarray(position_image()).save(root / "images" / "00001.png", format="JPEG")
    with pytest.raises(DatasetError) as info:
        GTA5Dataset(root).preflight()
    message = str(info.value)
    assert "2 problem(s)" in message
    assert f"cannot read {root / 'labels' / '00000.png'} as PNG" in message
    assert "00001.png is JPEG, expected PNG" in message
    with pytest.raises(DatasetError, match="cannot read label"):
        GTA5Dataset(root)[0]
    # A truncated file has a valid header: only the deep scan decodes it (the plain scan decodes
    # the first, middle and last labels only: 0, 2 and 4 of 5).
    root = synthia_root(n=5)
    label = root / "GT" / "LABELS" / "0000001.png"
    label.write_bytes(label.read_bytes()[:60])
    SynthiaDataset(root).preflight()
    with pytest.raises(DatasetError, match=r"cannot read .*0000001\.png"):
        SynthiaDataset(root).preflight(deep=True)
    label = root / "GT" / "LABELS" / "0000002.png"
    label.write_bytes(label.read_bytes()[:60])
    with pytest.raises(DatasetError, match=r"cannot read .*0000002\.png"):
        SynthiaDataset(root).preflight()


def test_labels_of_the_wrong_ids_are_found_by_the_scan(gta5_root: Callable[..., Path]) -> None:
    root = gta5_root(n=3)
    labels = sorted((root / "labels").glob("*.png"))
    for path in labels:  # raw ids that map to no class (0 = unlabelled, 1 = ego vehicle)
        save(path, split_label(0, 1))
    with pytest.raises(DatasetError, match=r"no pixel of the labels .* maps to a class \(ids seen: 0, 1\); expected raw GTA5 ids \(7 = road"):
        GTA5Dataset(root).preflight()
    for path in labels:  # train ids, as a converted set holds them: 0 road, 255 ignore
        save(path, split_label(0, 255))
    with pytest.raises(DatasetError, match=r"\(ids seen: 0, 255; they look like train ids"):
        GTA5Dataset(root).preflight()
    for path in labels:  # 11 person (raw 11: building) and 255 ignore
        save(path, split_label(11, 255))
    report = GTA5Dataset(root).preflight()
    assert len(report.warnings) == 1 and "look like train ids" in report.warnings[0]
    save(labels[1], split_label(7, 26))  # raw ids: road, car
    assert GTA5Dataset(root).preflight().warnings == ()


def test_synthia_palette_labels_are_their_indices_with_either_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = split_label(3, 8)  # road, car
    path = save(tmp_path / "label.png", ids, mode="P")

    class ColourDecoder:  # as OpenCV: a palette PNG decodes to its colours
        IMREAD_UNCHANGED = -1

        @staticmethod
        def imread(name: str, flags: int) -> np.ndarray:
            with Image.open(name) as opened:
                return np.asarray(opened.convert("RGB"))[:, :, ::-1]

    for decoder in (lambda: None, ColourDecoder):
        monkeypatch.setattr(datasets, "_opencv", decoder)
        assert np.array_equal(read_synthia_label(path), ids)


def test_synthia_label_with_a_corrupt_stream_names_the_file(synthia_root: Callable[..., Path], synthia_decoder: str) -> None:
    # Intact chunk checksums around a stream that is not zlib: the decoder's own error is not
    # enough, the message must say which of thousands of files is broken.
    root = synthia_root()
    label = root / "GT" / "LABELS" / "0000001.png"
    header = struct.pack(">IIBBBBB", W, H, 16, 2, 0, 0, 0)
    label.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", b"not zlib") + png_chunk(b"IEND", b""))
    with pytest.raises(DatasetError, match=r"cannot read .*0000001\.png"):
        SynthiaDataset(root)[1]
    with pytest.raises(DatasetError, match=r"cannot read .*0000001\.png"):
        SynthiaDataset(root).preflight(deep=True)


def test_colour_label_rejected(cityscapes_root: Callable[..., Path]) -> None:
    root = cityscapes_root(splits=("val",))
    bad = root / "gtFine" / "val" / "bonn" / "bonn_000001_000019_gtFine_labelIds.png"
    save(bad, np.zeros((H, W, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match="has mode RGB; expected a single-channel id map"):
        CityscapesDataset(root, "val").preflight()
    # Read directly (no pre-flight scan): the same reason, not a size mismatch.
    dataset = CityscapesDataset(root, "val")
    index = dataset.names.index("bonn/bonn_000001_000019")
    with pytest.raises(DatasetError, match="has mode RGB; expected a single-channel id map"):
        dataset[index]


def test_size_mismatch(gta5_root: Callable[..., Path], synthia_root: Callable[..., Path]) -> None:
    root = gta5_root(n=2)
    save(root / "labels" / "00001.png", split_label(7, 26, w=W - 1), mode="P")
    image, label = root / "images" / "00001.png", root / "labels" / "00001.png"
    expected = f"image {image} is {W}x{H} but its label {label} is {W - 1}x{H}"
    with pytest.raises(DatasetError) as info:
        GTA5Dataset(root).preflight()
    assert expected in str(info.value)
    with pytest.raises(DatasetError, match="but its label"):
        GTA5Dataset(root)[1]
    root = synthia_root()
    save_synthia_label(root / "GT" / "LABELS" / "0000001.png", np.zeros((H + 1, W), dtype=np.uint16))
    with pytest.raises(DatasetError, match="but its label"):
        SynthiaDataset(root).preflight()


def test_a_label_of_the_transposed_shape_is_refused(gta5_root: Callable[..., Path]) -> None:
    # H x W instead of W x H: the same pixel count, but the ids would be laid on the wrong pixels.
    root = gta5_root(n=2)
    save(root / "labels" / "00001.png", split_label(7, 26, w=H, h=W), mode="P")
    image, label = root / "images" / "00001.png", root / "labels" / "00001.png"
    expected = re.escape(f"image {image} is {W}x{H} but its label {label} is {H}x{W}")
    with pytest.raises(DatasetError, match=expected):
        GTA5Dataset(root)[1]
    with pytest.raises(DatasetError, match=expected):
        GTA5Dataset(root).preflight()


def test_crop_larger_than_images(gta5_root: Callable[..., Path]) -> None:
    with pytest.raises(DatasetError, match="smaller than crop_size"):
        GTA5Dataset(gta5_root(n=1), crop_size=(W + 1, H)).preflight()


def test_empty_dataset(tmp_path: Path, cityscapes_root: Callable[..., Path]) -> None:
    (tmp_path / "g" / "images").mkdir(parents=True)
    (tmp_path / "g" / "labels").mkdir()
    with pytest.raises(DatasetError, match=r"no images found under .*g \(expected GTA5 layout"):
        GTA5Dataset(tmp_path / "g")
    root = cityscapes_root(splits=("train",))
    (root / "leftImg8bit" / "val" / "aachen").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        CityscapesDataset(root, "val", load_labels=False)
