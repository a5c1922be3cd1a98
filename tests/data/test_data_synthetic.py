"""The embedded synthetic UDA generator: layout, determinism, classes, regeneration rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cossim_fast.data import (
    CLASS_NAMES,
    NUM_CLASSES,
    SYNTHETIC_CLASSES,
    CityscapesDataset,
    DatasetError,
    GTA5Dataset,
    draw_sample,
    generate_synthetic_uda,
)

SMALL = dict(num_source=5, num_source_val=2, num_target_train=4, num_target_val=3, size=(64, 32))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_read_by_the_real_loaders(tmp_path: Path) -> None:
    paths = generate_synthetic_uda(tmp_path / "syn", seed=0, **SMALL)
    source = GTA5Dataset(paths["source"])
    assert source.preflight(deep=True).image_sizes == {(64, 32): 5}
    assert len(GTA5Dataset(paths["source_val"])) == 2
    train = CityscapesDataset(paths["target"], "train")
    val = CityscapesDataset(paths["target"], "val")
    assert len(train) == 4 and len(val) == 3
    train.preflight(deep=True)
    assert {n.split("/")[0] for n in val.names}.isdisjoint({n.split("/")[0] for n in train.names})
    image, label, _ = val[0]
    assert image.shape == (3, 32, 64) and label.shape == (32, 64)
    assert set(label.unique().tolist()) <= set(SYNTHETIC_CLASSES)  # every pixel labelled
    info = json.loads(paths["info"].read_text())
    assert info["params"]["num_target_val"] == 3
    assert "road" in (paths["root"] / "README.txt").read_text()


def test_at_least_eight_classes(tmp_path: Path) -> None:
    paths = generate_synthetic_uda(tmp_path, seed=1, **SMALL)
    for ds in (GTA5Dataset(paths["source"]), CityscapesDataset(paths["target"], "train")):
        present = torch.zeros(NUM_CLASSES, dtype=torch.bool)
        for i in range(len(ds)):
            present[ds[i][1].unique()] = True
        assert int(present.sum()) >= 8
    assert len(SYNTHETIC_CLASSES) >= 8


def test_every_split_holds_every_promised_class_and_the_shares_count_both_splits(tmp_path: Path) -> None:
    # Each of the four splits (source train/val, target train/val) is drawn on its own stream:
    # each must show all the classes the generator promises, and no other. The shares in the
    # info file are the pixel counts of a domain's two splits, as the loaders read them back.
    paths = generate_synthetic_uda(tmp_path, seed=0, **{**SMALL, "num_source": 8, "num_source_val": 8,
                                                        "num_target_train": 8, "num_target_val": 8})
    splits = {
        "source": [GTA5Dataset(paths["source"]), GTA5Dataset(paths["source_val"])],
        "target": [CityscapesDataset(paths["target"], "train"), CityscapesDataset(paths["target"], "val")],
    }
    info = json.loads(paths["info"].read_text())
    assert info["classes"] == {CLASS_NAMES[c]: c for c in SYNTHETIC_CLASSES}
    for domain, datasets in splits.items():
        counts = torch.zeros(NUM_CLASSES, dtype=torch.int64)
        for ds in datasets:
            labels = torch.stack([ds[i][1] for i in range(len(ds))])
            assert set(labels.unique().tolist()) == set(SYNTHETIC_CLASSES), (domain, ds.root)
            counts += torch.bincount(labels.flatten(), minlength=NUM_CLASSES)
        shares = info["class_pixel_share"][domain]
        assert set(shares) == {CLASS_NAMES[c] for c in SYNTHETIC_CLASSES}
        for c in SYNTHETIC_CLASSES:
            assert shares[CLASS_NAMES[c]] == pytest.approx(counts[c].item() / counts.sum().item(), abs=1e-5)


def test_held_out_splits_are_other_images(tmp_path: Path) -> None:
    # gta5_val must not repeat gta5's images (nor target val the target train ones): the
    # held-out mIoU would score images the model trained (or adapted) on.
    paths = generate_synthetic_uda(tmp_path, seed=0, **SMALL)
    source = [p.read_bytes() for p in sorted((paths["source"] / "images").glob("*.png"))]
    held_out = [p.read_bytes() for p in sorted((paths["source_val"] / "images").glob("*.png"))]
    assert len(held_out) == 2 and not set(held_out) & set(source)
    target = {p.read_bytes() for p in (paths["target"] / "leftImg8bit").rglob("*.png")}
    assert len(target) == 4 + 3


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = _files(generate_synthetic_uda(tmp_path / "a", seed=3, **SMALL)["root"])
    b = _files(generate_synthetic_uda(tmp_path / "b", seed=3, **SMALL)["root"])
    c = _files(generate_synthetic_uda(tmp_path / "c", seed=4, **SMALL)["root"])
    assert a == b
    assert a.keys() == c.keys()
    pngs = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in pngs if "leftImg8bit" in k or "images" in k)


def test_sample_depends_only_on_its_own_stream() -> None:
    img1, lab1 = draw_sample(0, 2, 7, (64, 32), 0.3)
    img2, lab2 = draw_sample(0, 2, 7, (64, 32), 0.3)
    assert (img1 == img2).all() and (lab1 == lab2).all()
    # Same scene grammar, other style: the source stream differs.
    assert not (draw_sample(0, 0, 7, (64, 32), 0.3)[0] == img1).all()
    assert img1.shape == (32, 64, 3) and img1.dtype == np.uint8 and lab1.dtype == np.uint8


def test_style_strength_moves_target_away(tmp_path: Path) -> None:
    def mean_abs_diff(strength: float) -> float:
        diffs = []
        for i in range(4):  # same index and seed: compare the target and source style of scenes
            src, _ = draw_sample(0, 0, i, (64, 32), strength)
            tgt, _ = draw_sample(0, 2, i, (64, 32), strength)
            diffs.append(np.abs(src.astype(float).mean((0, 1)) - tgt.astype(float).mean((0, 1))).mean())
        return float(np.mean(diffs))

    assert mean_abs_diff(1.0) > mean_abs_diff(0.0)


def test_skips_when_complete_and_regenerates_on_change(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    paths = generate_synthetic_uda(root, seed=0, **SMALL)
    probe = paths["source"] / "images" / "00000.png"
    stamp = probe.stat().st_mtime_ns
    generate_synthetic_uda(root, seed=0, **SMALL)
    assert probe.stat().st_mtime_ns == stamp
    generate_synthetic_uda(root, seed=0, **{**SMALL, "num_source": 2})
    assert len(GTA5Dataset(paths["source"])) == 2  # stale images were removed
    # An interrupted run (marker never written) is redone.
    paths["info"].unlink()
    (root / ".synthetic_uda.incomplete").write_text("")
    generate_synthetic_uda(root, seed=0, **SMALL)
    assert paths["info"].is_file() and not (root / ".synthetic_uda.incomplete").exists()
    # Killed while rewriting, before the old marker was removed: the in-progress marker alone
    # says the files are half-written, and they are redone too.
    probe.unlink()
    (root / ".synthetic_uda.incomplete").write_text("")
    generate_synthetic_uda(root, seed=0, **SMALL)
    assert probe.is_file() and not (root / ".synthetic_uda.incomplete").exists()


def test_refuses_to_overwrite_foreign_data(tmp_path: Path) -> None:
    precious = tmp_path / "gta5" / "images" / "mine.png"
    precious.parent.mkdir(parents=True)
    precious.write_bytes(b"user data")
    with pytest.raises(DatasetError, match="refusing to overwrite"):
        generate_synthetic_uda(tmp_path, **SMALL)
    assert precious.read_bytes() == b"user data"


def test_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="style_strength"):
        generate_synthetic_uda(tmp_path, **{**SMALL, "style_strength": 1.5})
    with pytest.raises(ValueError, match="at least one image"):
        generate_synthetic_uda(tmp_path, **{**SMALL, "num_target_val": 0})
    with pytest.raises(ValueError, match="16x16"):
        generate_synthetic_uda(tmp_path, **{**SMALL, "size": (8, 8)})
