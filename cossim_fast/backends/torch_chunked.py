"""The "torch" backend: the contract in plain PyTorch, on any device, in a fixed workspace.

Rows are grouped by class (one sort on the device), and each class's rows meet only that
class's valid slots, a bounded ``rows x slots`` block at a time. The running max/argmax keeps
the earlier block on ties, so the lowest slot wins as in the reference. Its one host sync per
call reads the class histogram and the bucket sizes to size the blocks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from cossim_fast.backends import gradients
from cossim_fast.backends.base import Backend
from cossim_fast.backends.numerics import EPS, accumulation_dtype
from cossim_fast.backends.ring_buffer import ring_buffer_update_torch
from cossim_fast.backends import rows as row_access
from cossim_fast.backends.rows import chunk_length, gather_rows
from cossim_fast.backends.schedule import group_by_class


def class_blocks(
    labels: Tensor, counts: Tensor, bank: Tensor, acc: torch.dtype, per_pair: int = 8, per_channel: int = 4
) -> Iterator[tuple[Tensor, Tensor, int]]:
    """Yield ``(rows, bucket, slot_offset)``: rows of one class against a chunk of its valid slots.

    The row and slot chunks are sized so that ``per_pair`` bytes per (row, slot) and
    ``per_channel`` bytes per (row, channel), what the caller keeps alive at once, fit the
    workspace, beside the bucket chunk's copy in ``acc`` where the bank is in another dtype.
    """
    num_classes, slots, dim = bank.shape
    groups = group_by_class(labels, num_classes)
    by_class = groups.rows
    host = torch.cat([groups.per_class, counts]).tolist()  # the one host sync
    rows_of, valid_of = host[:num_classes], host[num_classes:]
    slot_chunk = chunk_length(dim * 4 * 4)
    start = 0
    for k in range(num_classes):
        n_rows, n_valid = rows_of[k], min(max(valid_of[k], 0), slots)  # counts unchecked: clamp
        if n_valid > 0:
            for first_slot in range(0, n_valid, slot_chunk):
                bucket = bank[k, first_slot : min(n_valid, first_slot + slot_chunk)]
                bucket_copy = bucket.numel() * acc.itemsize if bank.dtype != acc else 0
                row_chunk = chunk_length(
                    bucket.shape[0] * per_pair + dim * per_channel, max(1, row_access.WORKSPACE_BYTES - bucket_copy)
                )
                for first_row in range(start, start + n_rows, row_chunk):
                    yield by_class[first_row : min(start + n_rows, first_row + row_chunk)], bucket, first_slot
        start += n_rows


def _row_copy_bytes(features: Tensor, acc: torch.dtype) -> int:
    """Bytes per channel of a gathered row in ``acc``: the gather, then the cast if one is needed."""
    return acc.itemsize + (features.element_size() if features.dtype != acc else 0)


def _normalized_dots(features: Tensor, rows: Tensor, bucket: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Raw dot products of the rows with a bucket chunk, and the rows' inverse norms."""
    x = gather_rows(features, rows).to(acc)
    inv_norm = 1.0 / torch.linalg.vector_norm(x, dim=1).clamp_min(EPS)
    return x @ bucket.to(acc).T, inv_norm


class TorchBackend(Backend):
    name = "torch"

    def unsupported_reasons(self, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
        return []

    def max_forward(self, features, labels, bank, counts, ignore_index):
        acc = accumulation_dtype(features.dtype)
        values = torch.full(labels.shape, float("-inf"), dtype=acc, device=labels.device)
        indices = torch.full(labels.shape, -1, dtype=torch.int64, device=labels.device)
        for rows, bucket, first_slot in class_blocks(labels, counts, bank, acc, per_channel=_row_copy_bytes(features, acc)):
            dots, inv_norm = _normalized_dots(features, rows, bucket, acc)
            best = dots.argmax(dim=1)  # first maximal value: lowest slot in this chunk
            sims = dots.gather(1, best[:, None]).squeeze(1) * inv_norm
            better = sims > values[rows]  # strict: an earlier chunk keeps its tie
            values[rows] = torch.where(better, sims, values[rows])
            indices[rows] = torch.where(better, best + first_slot, indices[rows])
            del dots  # before the next chunk's block exists, not after
        return values, indices

    def max_backward(self, grad_values, features, labels, bank, values, indices):
        return gradients.max_backward(grad_values, features, labels, bank, values, indices)

    def all_forward(self, features, labels, bank, counts, threshold, ignore_index):
        acc = accumulation_dtype(features.dtype)
        num_rows, dim = labels.numel(), bank.shape[2]
        count = torch.zeros(num_rows, dtype=torch.int64, device=labels.device)
        ssum = torch.zeros(num_rows, dtype=acc, device=labels.device)
        dsum = torch.zeros(num_rows, dim, dtype=acc, device=labels.device)
        # In place, one float block per chunk: similarities, then the selected ones, then the
        # selection as weights (6 bytes per pair at the peak, with the two boolean masks).
        # Per row: its copy in acc and its share of dsum (the rows of a chunk are distinct).
        row_bytes = _row_copy_bytes(features, acc) + acc.itemsize
        for rows, bucket, _ in class_blocks(labels, counts, bank, acc, per_pair=6, per_channel=row_bytes):
            block, inv_norm = _normalized_dots(features, rows, bucket, acc)
            block.mul_(inv_norm[:, None])
            selected = block > threshold
            count.index_add_(0, rows, selected.sum(dim=1))
            ssum.index_add_(0, rows, block.masked_fill_(selected.logical_not(), 0).sum(dim=1))
            dsum.index_add_(0, rows, block.copy_(selected) @ bucket.to(acc))
            del block, selected  # before the next chunk's block exists, not after
        return count, ssum, dsum

    def all_backward(self, grad_ssum, features, ssum, dsum):
        return gradients.all_backward(grad_ssum, features, ssum, dsum)

    def update(self, bank, counts, ptr, features, labels, order, denom, max_per_class, ignore_index):
        ring_buffer_update_torch(bank, counts, ptr, features, labels, order, denom, max_per_class, ignore_index)
