"""Rows grouped by class on the device: the work decomposition every backend shares.

A stable sort by class keeps each class's rows in their original order (the lowest row first),
and the per-class counts come from a scatter-add, so nothing here waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ClassGroups:
    """``rows``: row ids sorted by class (rows of no class, e.g. ``ignore_index``, last);
    ``per_class`` (K,): how many rows each class has; ``first`` (K,): where it starts in ``rows``."""

    rows: Tensor
    per_class: Tensor
    first: Tensor


def group_by_class(labels: Tensor, num_classes: int) -> ClassGroups:
    """Group rows by their label; labels outside ``[0, K)`` belong to no class."""
    key = torch.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    rows = torch.argsort(key, stable=True)
    per_class = torch.zeros(num_classes + 1, dtype=torch.int64, device=labels.device)
    per_class.scatter_add_(0, key, torch.ones_like(key))
    per_class = per_class[:num_classes]
    return ClassGroups(rows, per_class.contiguous(), (torch.cumsum(per_class, 0) - per_class).contiguous())


@dataclass(frozen=True)
class ClassTiles:
    """``rows`` sorted by class, and per program its class (-1 past the schedule) and the range
    ``[start, end)`` of ``rows`` it owns, at most ``block_m`` long and inside one class."""

    rows: Tensor
    tiles: Tensor


def class_tiles(labels: Tensor, num_classes: int, block_m: int) -> ClassTiles:
    """The (class, row tile) schedule of the fused kernels (MoE-style routing).

    Each class's rows are padded to whole tiles; ``ceil(N / block_m) + min(K, N)`` programs
    bound the schedule from static sizes (each class wastes less than one tile), so the grid
    is known without reading the histogram back; programs past the schedule exit at once.
    """
    num_rows, device = labels.numel(), labels.device
    if num_rows == 0 or num_classes == 0:
        return ClassTiles(torch.arange(num_rows, device=device), torch.empty(0, 3, dtype=torch.int64, device=device))
    groups = group_by_class(labels, num_classes)
    tiles_of = torch.div(groups.per_class + block_m - 1, block_m, rounding_mode="floor")
    tiles_end = torch.cumsum(tiles_of, 0)
    num_programs = -(-num_rows // block_m) + min(num_classes, num_rows)
    program = torch.arange(num_programs, device=device)
    owner = torch.searchsorted(tiles_end, program, right=True)
    scheduled = owner < num_classes
    cls = owner.clamp(max=num_classes - 1)
    start = groups.first[cls] + (program - (tiles_end[cls] - tiles_of[cls])) * block_m
    end = torch.minimum(start + block_m, groups.first[cls] + groups.per_class[cls])
    tiles = torch.stack([torch.where(scheduled, cls, -1), start, end], dim=1).contiguous()
    return ClassTiles(groups.rows, tiles)
