"""Target-side pieces of the UDA objective: pseudo-labels, their class cap, entropy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255


def pseudo_labels(logits: Tensor, confidence: float, class_cap: float | None) -> Tensor:
    """Argmax labels (``B x h x w``) kept where the softmax confidence exceeds ``confidence``.

    ``class_cap`` limits each class to that share of the kept rows, keeping its most confident
    ones: the toy experiment saw pseudo-labels collapse onto a frequent class (road), and a
    cap keeps that class from owning the loss. All on the device, no host sync.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be B x K x h x w, got shape {tuple(logits.shape)}")
    if not 0 <= confidence < 1:
        raise ValueError(f"confidence must be a softmax probability in [0, 1), got {confidence}")
    if class_cap is not None and not 0 < class_cap <= 1:
        raise ValueError(f"class_cap must be a share of the kept pixels in (0, 1], or None for no cap, got {class_cap}")
    probabilities = logits.detach().float().softmax(dim=1)
    score, labels = probabilities.max(dim=1)
    kept = score > confidence
    if class_cap is not None:
        num_classes = logits.shape[1]
        flat_labels, flat_score, flat_kept = labels.reshape(-1), score.reshape(-1), kept.reshape(-1)
        key = torch.where(flat_kept, flat_labels, num_classes).double() + (1.0 - flat_score.double()) * 0.5
        order = torch.argsort(key, stable=True)  # by class, most confident first
        per_class = torch.zeros(num_classes + 1, dtype=torch.int64, device=logits.device)
        per_class.scatter_add_(0, torch.where(flat_kept, flat_labels, num_classes), torch.ones_like(flat_labels))
        first = torch.cumsum(per_class, 0) - per_class
        rank = torch.empty_like(order)
        sorted_class = torch.where(flat_kept, flat_labels, num_classes)[order]
        rank[order] = torch.arange(order.numel(), device=logits.device) - first[sorted_class]
        allowed = torch.floor(class_cap * per_class[:num_classes].sum()).clamp(min=1).long()
        kept = (flat_kept & (rank < allowed)).view_as(kept)
    return torch.where(kept, labels, IGNORE_INDEX)


def entropy_loss(logits: Tensor) -> Tensor:
    """ADVENT's MinEnt: mean over pixels of the prediction entropy, normalized by log K."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean() / math.log(logits.shape[1])


def class_shares(labels: Tensor, num_classes: int) -> Tensor:
    """Each class's share of the non-ignored labels (the early sign of collapse)."""
    flat = labels.reshape(-1)
    kept = flat != IGNORE_INDEX
    counts = torch.zeros(num_classes + 1, device=labels.device).scatter_add_(
        0, torch.where(kept, flat, num_classes), torch.ones_like(flat, dtype=torch.float32)
    )[:num_classes]
    return counts / counts.sum().clamp(min=1)


def downsample_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Ground-truth labels ``B x H x W`` at feature resolution ``size = (h, w)``, by nearest
    neighbour (METHOD.md 5)."""
    if labels.dim() == 4 and labels.shape[1] == 1:
        raise ValueError(f"labels must be B x H x W, got shape {tuple(labels.shape)}: pass labels.squeeze(1)")
    if labels.dim() != 3:
        raise ValueError(f"labels must be B x H x W, got shape {tuple(labels.shape)}")
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
