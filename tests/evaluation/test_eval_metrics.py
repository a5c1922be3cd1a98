"""Confusion matrix, IoU, protocol mIoU, table formatting, all_reduce."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cossim_fast.data import CLASS_NAMES, PROTOCOLS
from cossim_fast.evaluation import ConfusionMatrix, format_iou_table, iou_per_class, mean_iou, pixel_accuracy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_hand_computed_example(device: str) -> None:
    cm = ConfusionMatrix(3, device=device)
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    cm.update(pred.to(device), target.to(device))
    # rows = ground truth, columns = prediction; the ignored pixel is not counted
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert cm.matrix.dtype == torch.int64 and cm.matrix.device.type == device
    # IoU_0 = 1 / (2 + 2 - 1), IoU_1 = 2 / (2 + 3 - 2), IoU_2 = 0 / (1 + 0 - 0)
    assert cm.iou().tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert cm.miou() == pytest.approx(1 / 3)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)
    cm.update(pred.to(device), target.to(device))  # accumulates
    assert int(cm.matrix.sum()) == 10
    cm.reset()
    assert int(cm.matrix.sum()) == 0 and math.isnan(cm.pixel_accuracy())


def test_absent_classes_are_nan_and_excluded() -> None:
    m = torch.tensor([[3, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]])
    iou = iou_per_class(m)
    # class 2: never in ground truth but predicted once -> IoU 0, not NaN; class 3: gt only -> 0
    assert iou[:3].tolist() == pytest.approx([3 / 4, 2 / 3, 0.0])
    assert iou[3].item() == 0.0
    m2 = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    iou2 = iou_per_class(m2)
    assert math.isnan(iou2[2].item())
    assert mean_iou(m2) == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert pixel_accuracy(m2) == pytest.approx(5 / 6)


def test_protocol_miou_is_computed_directly() -> None:
    # 19-class matrix: 10 correct pixels per class, except road, where 5 pixels are predicted as
    # terrain (absent from SYNTHIA), and wall, which appears in neither gt nor predictions.
    m = torch.diag(torch.full((19,), 10, dtype=torch.int64))
    m[3, 3] = 0
    m[0, 0], m[0, 9] = 5, 5
    iou = iou_per_class(m)
    assert iou[0].item() == pytest.approx(5 / 10)  # 5 / (10 + 5 - 5)
    assert iou[9].item() == pytest.approx(10 / 15)  # 10 / (10 + 15 - 10)
    assert math.isnan(iou[3].item())
    cm = ConfusionMatrix()
    cm.matrix += m
    assert cm.miou(19) == pytest.approx((0.5 + 10 / 15 + 16) / 18)  # wall excluded
    assert cm.miou(16) == pytest.approx((0.5 + 14) / 15)  # 16 classes minus NaN wall
    assert cm.miou(13) == pytest.approx((0.5 + 12) / 13)
    assert cm.miou(16) != pytest.approx(cm.miou(19) * 19 / 16)
    assert cm.miou([0, 9]) == pytest.approx((0.5 + 10 / 15) / 2)


def test_update_validates_inputs() -> None:
    cm = ConfusionMatrix()
    with pytest.raises(ValueError, match=r"target holds values outside \[0, 19\) \(e.g. \[26\]\)"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[26, 0], [255, 1]]))
    with pytest.raises(ValueError, match="pred holds values"):
        cm.update(torch.tensor([[19, 0]]), torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="differ"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="class indices"):
        cm.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    assert int(cm.matrix.sum()) == 0


def test_batched_uint8_labels() -> None:
    target = torch.randint(0, 19, (2, 5, 7), dtype=torch.uint8)
    target[0, 0, :3] = 255
    cm = ConfusionMatrix()
    cm.update(target.long(), target)
    assert int(cm.matrix.sum()) == 2 * 5 * 7 - 3
    assert cm.pixel_accuracy() == 1.0


def test_table_and_summary() -> None:
    cm = ConfusionMatrix()
    cm.matrix += torch.diag(torch.arange(19) % 5)  # classes 0, 5, 10, 15 absent -> NaN
    text = cm.table((16, 13), title="target val")
    lines = text.splitlines()
    assert lines[0] == "**target val**"
    assert lines[2] == "| id | class | IoU | in 16 | in 13 |"
    assert sum(1 for line in lines if line.startswith("| ") and line.split("|")[1].strip().isdigit()) == 16
    assert "| 1 | sidewalk | 100.00 | x | x |" in lines
    assert "| 3 | wall | 100.00 | x |  |" in lines
    assert "| 0 | road | n/a | x | x |" in lines
    assert any("**mIoU16**" in line for line in lines) and any("**mIoU13**" in line for line in lines)
    assert "terrain" not in text
    plain = format_iou_table(cm.matrix)
    assert all(name in plain for name in CLASS_NAMES) and "**mIoU19**" in plain and "in 19" not in plain
    summary = cm.summary((19, 16))
    assert summary["mIoU19"] == pytest.approx(1.0) and summary["aAcc"] == 1.0
    assert math.isnan(summary["IoU.road"]) and summary["IoU.sidewalk"] == 1.0
    assert len([k for k in summary if k.startswith("IoU.")]) == len(PROTOCOLS[19])


def test_all_reduce_without_distributed_is_noop() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    assert cm.all_reduce() is cm and cm.matrix.tolist() == [[1, 1], [0, 0]]


def _reduce_worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cm = ConfusionMatrix(3)
        cm.update(torch.tensor([rank]), torch.tensor([rank]))  # rank r adds one pixel of class r
        cm.all_reduce()
        assert cm.matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_all_reduce_sums_over_ranks(tmp_path: Path) -> None:
    mp.spawn(_reduce_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def _iou_by_hand(m: torch.Tensor) -> list[float]:
    """IoU_c = M[c, c] / (row sum + column sum - M[c, c]), NaN for an empty union, class by class."""
    rows, cols = m.tolist(), m.T.tolist()
    ious = []
    for c in range(len(rows)):
        union = sum(rows[c]) + sum(cols[c]) - rows[c][c]
        ious.append(rows[c][c] / union if union else math.nan)
    return ious


def _nanmean(values: list[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present)


@pytest.mark.parametrize("protocols", [(16, 13), (13, 16), (19, 13), (13, 19, 16)])
def test_several_protocols_each_get_their_own_miou_and_every_class_is_listed(protocols) -> None:
    # IoUs differ from class to class (class c loses c pixels to class c + 1) and wall (3, in 16
    # but not 13) is absent, so every protocol has another mIoU; the classes listed are the union
    # of the protocols', whichever comes first.
    m = torch.diag(torch.full((19,), 20, dtype=torch.int64))
    for c in range(18):
        m[c, c + 1] = c
    m[3], m[:, 3] = 0, 0
    iou = _iou_by_hand(m)
    expected_miou = {p: _nanmean([iou[c] for c in PROTOCOLS[p]]) for p in protocols}
    assert len({round(v, 9) for v in expected_miou.values()}) == len(protocols)  # the case tells them apart
    listed = sorted(set().union(*(PROTOCOLS[p] for p in protocols)))
    cm = ConfusionMatrix()
    cm.matrix += m

    summary = cm.summary(protocols)
    for p in protocols:
        assert summary[f"mIoU{len(PROTOCOLS[p])}"] == pytest.approx(expected_miou[p], rel=1e-12)
    per_class = {k[len("IoU."):]: v for k, v in summary.items() if k.startswith("IoU.")}
    assert list(per_class) == [CLASS_NAMES[c] for c in listed]
    for c in listed:
        assert per_class[CLASS_NAMES[c]] == pytest.approx(iou[c], rel=1e-12, nan_ok=True)

    cells = [line.split("|")[1:-1] for line in cm.table(protocols).splitlines()[2:]]
    class_rows = [row for row in cells if row[0].strip()]
    assert [int(row[0]) for row in class_rows] == listed
    for row in class_rows:
        c = int(row[0])
        assert row[1].strip() == CLASS_NAMES[c]
        assert row[2].strip() == ("n/a" if math.isnan(iou[c]) else f"{100 * iou[c]:.2f}")
        assert [cell.strip() == "x" for cell in row[3:]] == [c in PROTOCOLS[p] for p in protocols]
    means = {row[1].strip(): row[2].strip() for row in cells if row[1].strip().startswith("**mIoU")}
    assert means == {f"**mIoU{len(PROTOCOLS[p])}**": f"**{100 * expected_miou[p]:.2f}**" for p in protocols}


class _LogitsAreTheImage(torch.nn.Module):
    """A stand-in segmentation model whose logits are its input (19 x h x w 'images')."""

    def forward(self, image: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=image)


def test_evaluation_upsamples_logits_bilinearly_to_the_label_size() -> None:
    # Low-resolution logits scored against labels at a non-integer multiple of their size: the
    # argmax after bilinear upsampling (align_corners=False, as the source loss upsamples)
    # differs from nearest and from align_corners=True, so each would count other pixels.
    from cossim_fast.training.trainer import evaluate

    gen = torch.Generator().manual_seed(0)
    dataset = []
    for low, full in (((3, 4), (7, 11)), ((5, 2), (9, 5))):
        logits = torch.randn(19, *low, generator=gen)
        label = torch.randint(0, 19, full, generator=gen)
        label[0, :2] = 255
        dataset.append((logits, label, "name"))
    expected = torch.zeros(19, 19, dtype=torch.int64)
    changed = {"nearest": False, "align_corners": False}
    for logits, label, _ in dataset:
        def argmax(**how):
            return F.interpolate(logits[None], size=label.shape, **how).argmax(dim=1)[0]

        pred = argmax(mode="bilinear", align_corners=False)
        changed["nearest"] |= not torch.equal(pred, argmax(mode="nearest"))
        changed["align_corners"] |= not torch.equal(pred, argmax(mode="bilinear", align_corners=True))
        kept = label != 255
        expected.index_put_((label[kept], pred[kept]), torch.ones(int(kept.sum()), dtype=torch.int64), accumulate=True)
    assert all(changed.values())  # the case tells the upsamplings apart
    matrix = evaluate(_LogitsAreTheImage(), dataset, torch.device("cpu"))
    assert torch.equal(matrix.matrix, expected)
