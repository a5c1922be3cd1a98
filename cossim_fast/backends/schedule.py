"""Rows grouped by class on the device: the work decomposition every backend shares.

A stable sort by class keeps each class's rows in their original order (the lowest row first),
and the class boundaries come from a search in the sorted keys, so nothing here waits for the
device.
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


def _key_dtype(num_classes: int) -> torch.dtype:
    """The narrowest integer type holding ``0..K`` (``K`` = no class): 1 byte per row for K <= 255."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if num_classes <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def group_by_class(labels: Tensor, num_classes: int) -> ClassGroups:
    """Group rows by their label; labels outside ``[0, K)`` belong to no class.

    The sort key is one byte per row (for K <= 255), which keeps the sort's scratch small and
    its radix passes few; class boundaries come from a search in the sorted keys.
    """
    dtype = _key_dtype(num_classes)
    # The cast wraps labels outside the key's range, but exactly those are replaced by K.
    key = torch.where((labels >= 0) & (labels < num_classes), labels.to(dtype), num_classes)
    sorted_key, rows = torch.sort(key, stable=True)
    del key
    classes = torch.arange(num_classes + 1, device=labels.device, dtype=sorted_key.dtype)
    bounds = torch.searchsorted(sorted_key, classes)
    return ClassGroups(rows, (bounds[1:] - bounds[:-1]).contiguous(), bounds[:-1].contiguous())


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
