"""Segmentation evaluation: confusion matrix, per-class IoU, mIoU19/16/13, IoU tables."""

from cossim_fast.evaluation.metrics import (
    ConfusionMatrix,
    format_iou_table,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
)

__all__ = ["ConfusionMatrix", "format_iou_table", "iou_per_class", "mean_iou", "pixel_accuracy"]
