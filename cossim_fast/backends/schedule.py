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
    ``bounds`` (K + 2,): class ``k``'s rows are ``rows[bounds[k]:bounds[k + 1]]``, and the rows of
    no class ``rows[bounds[K]:bounds[K + 1]]`` (``bounds[K + 1] = N``)."""

    rows: Tensor
    bounds: Tensor

    @property
    def per_class(self) -> Tensor:
        """(K,): how many rows each class has."""
        return self.bounds[1:-1] - self.bounds[:-2]

    @property
    def first(self) -> Tensor:
        """(K,): where each class starts in ``rows``."""
        return self.bounds[:-2]


def _key_dtype(num_classes: int) -> torch.dtype:
    """The narrowest integer type holding ``0..K + 1`` (``K`` = no class, ``K + 1`` the bounds'
    search end): 1 byte per row for K <= 254."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if num_classes + 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def group_by_class(labels: Tensor, num_classes: int) -> ClassGroups:
    """Group rows by their ``(N,)`` int64 labels (the contract's form; signed: below 0 is no
    class); labels outside ``[0, K)`` belong to no class.

    The sort key is one byte per row (for K <= 254), which keeps the sort's scratch small and
    its radix passes few; class boundaries come from a search in the sorted keys. Six device
    ops in all: every op here is a launch and host time on the GPU.
    """
    # Labels below 0 clamp to -1, which the remainder sends to K; those above K clamp to K.
    # In place: one int64 temporary, not two.
    key = labels.clamp(-1, num_classes).remainder_(num_classes + 1).to(_key_dtype(num_classes))
    sorted_key, rows = torch.sort(key, stable=True)
    del key
    segments = torch.arange(num_classes + 2, device=labels.device, dtype=sorted_key.dtype)
    return ClassGroups(rows, torch.searchsorted(sorted_key, segments))


def max_row_tiles(num_rows: int, num_segments: int, block_m: int) -> int:
    """An upper bound, from static sizes, on the row tiles of ``num_segments`` groups of rows cut
    into tiles of ``block_m`` (each group wastes less than one tile): a grid size that needs no
    histogram read back. Programs past the last tile exit at once."""
    return -(-num_rows // block_m) + min(num_segments, num_rows)
