"""The ring-buffer dictionary write of METHOD.md 5 in plain PyTorch.

On a GPU it must not wait for the device, so the shapes stay static: instead of scattering
the new rows (which would need their number on the host, or a scratch slot for dropped rows),
every slot looks up which visited row, if any, lands on it. On the CPU, where reading a size
is free, only the surviving rows are written. Both are deterministic and write the same bits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from cossim_fast.backends.numerics import EPS, accumulation_dtype
from cossim_fast.backends.rows import chunk_length, gather_rows, image_chunks, row_slice
from cossim_fast.backends.schedule import group_by_class


def row_norms(source: Tensor) -> Tensor:
    """``max(||f_i||, eps)`` per row of a ``(B, P, C)`` view (METHOD.md 5's denominator), in fp32
    (fp64 for fp64 rows, which are for testing).

    On the CPU a norm taken in fp32 of other dtypes casts the whole input first, so those rows
    go a workspace-sized chunk at a time; CUDA reductions upcast as they read.
    """
    acc = accumulation_dtype(source.dtype)
    if source.dtype == acc or source.is_cuda:
        return torch.linalg.vector_norm(source, dim=2, dtype=acc).clamp_min(EPS).reshape(-1)
    num_images, points, dim = source.shape
    norms = torch.empty(num_images * points, dtype=torch.float32, device=source.device)
    for start, stop in image_chunks(num_images, points, chunk_length(dim * 4)):
        norms[start:stop] = torch.linalg.vector_norm(row_slice(source, start, stop), dim=1, dtype=torch.float32)
    return norms.clamp_min_(EPS)


def written_rows(counts_per_class: Tensor, first: Tensor, ptr: Tensor, slots: int) -> tuple[Tensor, Tensor]:
    """For each slot ``(k, s)``: the rank ``r`` of the row written there and whether one is.

    The row of rank ``r`` goes to ``(ptr[k] + r) % M``; only the last ``M`` of ``n_k`` survive, so
    slot ``s`` holds the largest ``r < n_k`` with ``r = (s - ptr[k]) mod M`` (mod ``M``).
    """
    offset = torch.remainder(torch.arange(slots, device=ptr.device)[None, :] - ptr[:, None], slots)
    n = counts_per_class[:, None]
    written = offset < n
    rank = offset + slots * torch.div((n - 1 - offset).clamp(min=0), slots, rounding_mode="floor")
    return first[:, None] + rank, written


class VisitPlan(NamedTuple):
    """The visited rows grouped by class (visiting order kept within a class), where each
    class's rows start, and how many of them each class takes (``n_k``, after the cap)."""

    rows_by_class: Tensor
    first: Tensor
    taken: Tensor


def plan_visits(labels: Tensor, order: Tensor | None, num_classes: int, max_per_class: int) -> VisitPlan:
    """Group the visit sequence by class with device ops only (shared by every backend)."""
    groups = group_by_class(labels if order is None else labels[order], num_classes)
    rows = groups.rows if order is None else order[groups.rows]
    taken = groups.per_class if max_per_class < 0 else groups.per_class.clamp(max=max_per_class)
    return VisitPlan(rows.contiguous(), groups.first, taken.contiguous())


def advance(counts: Tensor, ptr: Tensor, taken: Tensor, slots: int) -> None:
    """Move each class's head past its new rows and grow its valid count (after the writes)."""
    ptr.copy_(torch.remainder(ptr + taken, slots))
    counts.copy_((counts + taken).clamp(max=slots))


def ring_buffer_update_torch(
    bank: Tensor,
    counts: Tensor,
    ptr: Tensor,
    features: Tensor,
    labels: Tensor,
    order: Tensor | None,
    denom: Tensor,
    max_per_class: int,
    ignore_index: int,
) -> None:
    """In-place update; semantics in ``Backend.update`` (cossim_fast/backends/base.py)."""
    num_classes, slots, dim = bank.shape
    num_rows = labels.numel()
    if num_rows == 0:
        return
    plan = plan_visits(labels, order, num_classes, max_per_class)
    if bank.device.type == "cpu":
        _write_surviving_rows(bank, ptr, features, denom, plan)
    else:
        _write_every_slot(bank, ptr, features, denom, plan)
    advance(counts, ptr, plan.taken, slots)


def _fresh(bank: Tensor, features: Tensor, denom: Tensor, rows: Tensor) -> Tensor:
    """The normalized rows as stored: a division in ``denom``'s dtype (fp32; fp64 for fp64
    features), then a cast to the bank's dtype."""
    return (gather_rows(features, rows).to(denom.dtype) / denom[rows, None]).to(bank.dtype)


def _write_every_slot(bank: Tensor, ptr: Tensor, features: Tensor, denom: Tensor, plan: VisitPlan) -> None:
    """Static shapes for devices where reading sizes back would stall: every slot is rewritten,
    with its new row or its old contents."""
    num_classes, slots, dim = bank.shape
    position, written = written_rows(plan.taken, plan.first, ptr, slots)
    source = plan.rows_by_class[torch.where(written, position, 0).clamp(max=plan.rows_by_class.numel() - 1)].reshape(-1)
    written = written.reshape(-1)
    flat_bank = bank.view(num_classes * slots, dim)
    chunk = chunk_length(dim * 8)
    for start in range(0, num_classes * slots, chunk):
        stop = min(num_classes * slots, start + chunk)
        fresh = _fresh(bank, features, denom, source[start:stop])
        flat_bank[start:stop] = torch.where(written[start:stop, None], fresh, flat_bank[start:stop])


def _write_surviving_rows(bank: Tensor, ptr: Tensor, features: Tensor, denom: Tensor, plan: VisitPlan) -> None:
    """On the CPU reading sizes costs nothing, so only the rows that survive are written
    (the whole-bank rewrite above cost 50x a hand-written per-class update at M = 2048)."""
    num_classes, slots, dim = bank.shape
    rows, destinations = [], []
    for k, (taken, first, head) in enumerate(zip(plan.taken.tolist(), plan.first.tolist(), ptr.tolist())):
        lowest = max(0, taken - slots)  # only the last M of n_k rows survive
        if taken > lowest:
            rows.append(plan.rows_by_class[first + lowest : first + taken])
            destinations.append(k * slots + (head + torch.arange(lowest, taken)) % slots)
    if not rows:
        return
    rows, destinations = torch.cat(rows), torch.cat(destinations)
    flat_bank = bank.view(num_classes * slots, dim)
    chunk = chunk_length(dim * 8)
    for start in range(0, rows.numel(), chunk):
        flat_bank[destinations[start : start + chunk]] = _fresh(bank, features, denom, rows[start : start + chunk])
