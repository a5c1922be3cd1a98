"""Small unit checks of the training pieces: pseudo-label edges, label downsampling, the lr and
loss-weight schedules, flipped batches, the checkpoint's fsync, negative label ids, the logged
step statistics."""

import os

import numpy as np
import pytest
import torch

from cossim_fast.data import labels as L
from cossim_fast.training import checkpoint, load_config
from cossim_fast.training.streams import batch_stream, flips
from cossim_fast.training.target_losses import class_shares, downsample_labels, pseudo_labels
from cossim_fast.training.trainer import StepStats, loss_weight, poly_factor


def test_a_score_exactly_at_the_confidence_is_not_kept():
    # Two equal logits give a softmax score of exactly 0.5: "above" the confidence is strict.
    logits = torch.zeros(1, 2, 2, 3)
    assert (pseudo_labels(logits, 0.5, None) == 255).all()
    assert (pseudo_labels(logits, 0.5, 0.3) == 255).all()
    assert (pseudo_labels(logits, 0.49, None) == 0).all()  # just below it: kept (argmax: first class)


def test_a_small_class_cap_still_keeps_one_row_per_class():
    logits = torch.full((1, 3, 2, 5), -10.0)
    logits[0, 0, :, :4] = torch.tensor([5.0, 4.0, 3.0, 2.0])  # 8 confident class-0 pixels
    logits[0, 1, :, 4] = 5.0  # 2 class-1 pixels
    capped = pseudo_labels(logits, 0.5, 0.05)  # floor(0.05 * 10) = 0, but at least 1 per class
    assert (capped == 0).sum() == 1 and (capped == 1).sum() == 1 and (capped == 2).sum() == 0
    assert (capped[0, :, 0] == 0).any()  # the kept class-0 pixel is one of the most confident


def test_class_shares_of_all_ignored_labels_are_zero():
    # Every pseudo-label dropped (early training): shares are 0, not 0/0 = NaN in the logs.
    shares = class_shares(torch.full((1, 2, 2), 255), 3)
    assert torch.equal(shares, torch.zeros(3))


def test_downsample_labels_is_plain_nearest_neighbour():
    labels = torch.arange(2 * 8 * 6).reshape(2, 8, 6)
    labels[0, 0, 0] = 255
    half = downsample_labels(labels, (4, 3))
    assert half.dtype == torch.int64
    assert torch.equal(half, labels[:, ::2, ::2])  # an exact 2x downsample takes every other pixel
    assert half[0, 0, 0] == 255  # 255 stays 255
    # Odd sizes: torch's "nearest" rule, source index floor(i * in / out).
    odd = torch.arange(5 * 7).reshape(1, 5, 7)
    rows = [int(i * 5 / 2) for i in range(2)]  # [0, 2]
    cols = [int(j * 7 / 3) for j in range(3)]  # [0, 2, 4]
    assert torch.equal(downsample_labels(odd, (2, 3)), odd[:, rows][:, :, cols])


def test_poly_factor_uses_the_configured_power():
    config = load_config(None, ["train.iterations=10", "optim.poly_power=2.0"])
    assert poly_factor(config, 0) == 1.0  # the first iteration runs at the full lr
    assert poly_factor(config, 5) == pytest.approx(0.25)
    assert poly_factor(config, 9) == pytest.approx(0.01)  # the last one: (1 - 9/10) ** 2
    default = load_config(None, ["train.iterations=10"])
    assert poly_factor(default, 5) == pytest.approx(0.5**0.9)


def test_loss_weight_without_a_ramp_is_the_configured_weight():
    # ramp_iters=0 (the default): the full weight from the end of the warm-up on, not 1.0.
    assert loss_weight(load_config(None, ["cosine.weight=0.5"]), 0) == 0.5
    config = load_config(None, ["cosine.weight=0.5", "cosine.warmup_iters=3"])
    assert [loss_weight(config, i) for i in (0, 2, 3, 50)] == [0.0, 0.0, 0.5, 0.5]
    ramped = load_config(None, ["cosine.weight=0.5", "cosine.warmup_iters=2", "cosine.ramp_iters=4"])
    assert [loss_weight(ramped, i) for i in (1, 2, 3, 5, 9)] == [0.0, 0.125, 0.25, 0.5, 0.5]


class _ColumnDataset(torch.utils.data.Dataset):
    """Sample i: image channel 0 and the label both hold 100 * i + W * row + column."""

    def __init__(self, count=4, height=3, width=4):
        self.count, self.height, self.width = count, height, width

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        label = 100 * index + torch.arange(self.height * self.width).reshape(self.height, self.width)
        image = torch.stack([label.float(), -label.float()])
        return image, label, f"s{index}"


def test_flipped_batches_flip_images_and_labels_horizontally():
    dataset, batch, seed = _ColumnDataset(), 3, 4
    grid = torch.arange(dataset.height * dataset.width).reshape(dataset.height, dataset.width)
    stream = batch_stream(dataset, batch, seed, flip=True)
    seen = []
    for iteration in range(6):
        images, labels = next(stream)
        drawn = flips(seed, iteration, batch, 0, 1)
        seen += drawn.tolist()
        for b in range(batch):
            sample = int(labels[b].min()) // 100
            expected = 100 * sample + (grid.flip(-1) if drawn[b] else grid)  # columns reversed, rows kept
            assert torch.equal(labels[b], expected)
            assert torch.equal(images[b, 0], expected.float())  # the image went the same way
            assert torch.equal(images[b, 1], -expected.float())
    assert any(seen) and not all(seen)  # both cases were checked


def test_save_atomic_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
    # Durability: the data reaches the disk before the rename, which is then made durable too.
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", os.stat(source).st_ino))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save_atomic({"model": {}, "config": "{}", "iteration": 7, "x": torch.arange(1000)}, path)
    monkeypatch.undo()
    file_inode, folder_inode = path.stat().st_ino, path.parent.stat().st_ino
    assert events == [("fsync", file_inode), ("replace", file_inode), ("fsync", folder_inode)]
    state = checkpoint.load(path)  # complete
    assert state["iteration"] == 7 and torch.equal(state["x"], torch.arange(1000))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # the temporary file is gone


def test_negative_ids_map_to_ignore_through_every_table():
    # -1 is outside [0, 255]: unknown, so 255, even where the table's entry 0 is not 255.
    raw = np.array([-1, -300, 0, 13, 256], dtype=np.int32)
    assert L.TRAINID_TO_CITYSCAPES_ID[0] != 255
    assert L.map_ids(raw, L.TRAINID_TO_CITYSCAPES_ID).tolist() == [255, 255, 7, 26, 255]
    assert L.map_ids(raw.astype(np.int16), L.TRAINID_TO_CITYSCAPES_ID).tolist() == [255, 255, 7, 26, 255]
    for table in (L.CITYSCAPES_ID_TO_TRAINID, L.GTA5_ID_TO_TRAINID, L.SYNTHIA_ID_TO_TRAINID):
        assert L.map_ids(raw, table)[[0, 1, 4]].tolist() == [255, 255, 255]


def test_step_stats_average_each_quantity_over_its_own_passes():
    stats = StepStats()
    scale = torch.tensor(1.0, requires_grad=True)
    share = torch.tensor([0.25, 0.75])
    stats.add({"loss": scale * 1.0, "share": share})
    share += 1.0  # a caller's later in-place change does not reach the sums
    stats.add({"loss": scale * 3.0, "share": torch.tensor([0.75, 0.25])})
    stats.add({"loss": scale * 5.0})  # a quantity some passes do not log
    # Summed detached: a logged loss keeps no graph (and no activations) alive until the row.
    assert all(not value.requires_grad and value.grad_fn is None for value in stats.sums.values())
    assert stats.means() == {"loss": (1.0 + 3.0 + 5.0) / 3, "share": [0.5, 0.5]}
    assert stats.means() == {}  # each row averages the passes since the previous one
    stats.add({"loss": torch.tensor(4.0)})
    assert stats.means() == {"loss": 4.0}
