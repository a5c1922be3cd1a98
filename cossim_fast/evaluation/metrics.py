"""Confusion-matrix segmentation metrics: per-class IoU, mIoU over 19 / 16 / 13 classes.

Conventions (ADVENT / ProDA / mmseg): rows are ground truth, columns predictions;
``IoU_c = M[c, c] / (sum_j M[c, j] + sum_i M[i, c] - M[c, c])``; a class absent from both
ground truth and predictions has IoU NaN and is left out of the mean (nanmean). mIoU of a
protocol is the nanmean over its classes, computed directly from the full matrix (not
rescaled from the 19-class mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from cossim_fast.data.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, protocol_classes

Protocol = int | Sequence[int]


def iou_per_class(matrix: Tensor) -> Tensor:
    """Per-class IoU (float64, NaN where the class is absent from ground truth and predictions)."""
    m = matrix.double()
    tp = m.diagonal()
    union = m.sum(dim=1) + m.sum(dim=0) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))


def mean_iou(matrix: Tensor, classes: Protocol | None = None) -> float:
    """Mean IoU over ``classes`` (a protocol 19 / 16 / 13 or a list of train ids; None: all)."""
    iou = iou_per_class(matrix)
    if classes is not None:
        iou = iou[list(protocol_classes(classes))]
    return float(torch.nanmean(iou))


def pixel_accuracy(matrix: Tensor) -> float:
    """Fraction of labelled pixels predicted correctly (NaN if no labelled pixel)."""
    total = matrix.sum()
    return float(matrix.diagonal().sum().double() / total) if int(total) > 0 else math.nan


def format_iou_table(
    matrix: Tensor,
    protocols: Sequence[int] = (19,),
    class_names: Sequence[str] = CLASS_NAMES,
    title: str | None = None,
) -> str:
    """A markdown table of per-class IoU (%) followed by the mIoU of each protocol.

    Rows are the classes of the protocols given; with several protocols, one column per
    protocol marks the classes it averages.
    """
    iou = iou_per_class(matrix).tolist()
    members = {p: set(protocol_classes(p)) for p in protocols}
    rows = sorted(set().union(*members.values()))
    marks = len(protocols) > 1
    header = "| id | class | IoU |" + "".join(f" in {p} |" for p in protocols if marks)
    align = "|---:|:---|---:|" + ":---:|" * (len(protocols) if marks else 0)
    lines = ([f"**{title}**", ""] if title else []) + [header, align]
    for c in rows:
        marks_cells = "".join(" x |" if c in members[p] else "  |" for p in protocols) if marks else ""
        lines.append(f"| {c} | {class_names[c]} | {_pct(iou[c])} |{marks_cells}")
    pad = "  |" * len(protocols) if marks else ""
    for p in protocols:
        lines.append(f"|  | **mIoU{len(members[p])}** | **{_pct(mean_iou(matrix, p))}** |{pad}")
    lines.append(f"|  | pixel accuracy | {_pct(pixel_accuracy(matrix))} |{pad}")
    return "\n".join(lines)


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100.0 * value:.2f}"


class ConfusionMatrix:
    """Accumulates a ``K x K`` int64 confusion matrix on any device.

    Usage: ``update(pred, target)`` per batch (class indices, same shape; ``ignore_index`` in
    ``target`` is skipped), then ``all_reduce()`` once under ``torch.distributed``, then read
    ``miou(16)``, ``iou()``, ``table((16, 13))`` or ``summary((16, 13))``.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        *,
        ignore_index: int = IGNORE_INDEX,
        device: torch.device | str | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Zero the counts."""
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` integer class maps of the same shape.

        Raises ``ValueError`` for labels outside ``[0, K)`` other than ``ignore_index`` (raw
        dataset ids that were never mapped to train ids) and for out-of-range predictions.
        """
        if pred.shape != target.shape:
            raise ValueError(
                f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ: pass class "
                "indices (argmax over classes) upsampled to the label's size"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("pred and target must be integer class indices, not scores")
        k = self.num_classes
        device = self.matrix.device
        pred = pred.reshape(-1).to(device=device, dtype=torch.int64)
        target = target.reshape(-1).to(device=device, dtype=torch.int64)
        keep = target != self.ignore_index
        bad_target = keep & ((target < 0) | (target >= k))
        bad_pred = keep & ((pred < 0) | (pred >= k))  # predictions on ignored pixels are not scored
        if bool((bad_target | bad_pred).any()):  # one host sync per batch; evaluation only
            bad = target[bad_target] if bool(bad_target.any()) else pred[bad_pred]
            what = "target" if bool(bad_target.any()) else "pred"
            raise ValueError(
                f"{what} holds values outside [0, {k}) (e.g. {bad.unique()[:5].tolist()}); "
                f"labels must be train ids with {self.ignore_index} as ignore"
            )
        # Ignored pixels go to an extra bin that is dropped, avoiding a data-dependent mask.
        index = torch.where(keep, target * k + pred, torch.full_like(target, k * k))
        self.matrix += torch.bincount(index, minlength=k * k + 1)[: k * k].view(k, k)

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over all ranks (no-op outside ``torch.distributed``); call once.

        With the NCCL backend the matrix must live on this rank's CUDA device.
        """
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        return self

    def iou(self) -> Tensor:
        """Per-class IoU (float64, NaN for absent classes)."""
        return iou_per_class(self.matrix)

    def miou(self, classes: Protocol | None = None) -> float:
        """Mean IoU over a protocol (19 / 16 / 13), a list of train ids, or all classes."""
        return mean_iou(self.matrix, classes)

    def pixel_accuracy(self) -> float:
        """Fraction of labelled pixels predicted correctly."""
        return pixel_accuracy(self.matrix)

    def summary(self, protocols: Sequence[int] = (19,)) -> dict[str, float]:
        """Scalars for logging: ``mIoU<n>`` per protocol, ``aAcc`` and ``IoU.<class>``."""
        out = {f"mIoU{len(protocol_classes(p))}": self.miou(p) for p in protocols}
        out["aAcc"] = self.pixel_accuracy()
        iou = self.iou().tolist()
        for c in sorted(set().union(*(protocol_classes(p) for p in protocols))):
            out[f"IoU.{CLASS_NAMES[c]}"] = iou[c]
        return out

    def table(self, protocols: Sequence[int] = (19,), title: str | None = None) -> str:
        """Markdown per-class IoU table (see ``format_iou_table``)."""
        return format_iou_table(self.matrix, protocols, title=title)
