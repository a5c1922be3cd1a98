"""Forward "all": per row, the slots whose similarity exceeds the threshold, summed.

Same schedule as ``max_similarity`` (one program per (class, row tile), found by ``tile_rows``).
For every slot tile the program computes the similarities ``S``, selects ``S > threshold`` and
accumulates the count, the sum of the selected ``S`` and, like attention's ``P @ V``, the sum of
the selected dictionary vectors ``dsum`` (``N x C``): a second dot of the 0/1 selection with the
same bank tile. Each row belongs to one program, so there are no atomics, and nothing ``N x M``
is ever stored.

With ``C`` resident the ``BLOCK_M x C`` ``dsum`` tile stays in registers. Otherwise it lives in
the output and is updated chunk by chunk, only for slot tiles that selected something.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from cossim_fast.backends.schedule import ClassGroups, max_row_tiles
from cossim_fast.backends.triton.max_similarity import (
    class_block,
    load_features,
    load_slots,
    row_inverse_norms,
    streamed_dots,
    tile_rows,
    valid_slots,
)
from cossim_fast.backends.triton.offsets import needs_int64
from cossim_fast.backends.triton.tiles import TileConfig


@triton.jit
def _add_chunk(
    dsum_rows, row_mask, selected, bank_cls, slots, slot_mask, stride_bm, stride_bc, dim, first,
    BLOCK_C: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dsum[rows, chunk] += selected @ bank[slots, chunk]`` for the chunk at ``first``."""
    offs_c = first + tl.arange(0, BLOCK_C)
    c_mask = offs_c < dim
    b = load_slots(bank_cls, slots, slot_mask, stride_bm, stride_bc, offs_c, dim, UPCAST)
    out = dsum_rows[:, None] + offs_c[None, :]
    mask = row_mask[:, None] & c_mask[None, :]
    acc = tl.load(out, mask=mask, other=0.0)
    acc = tl.dot(selected.to(b.dtype), tl.trans(b), acc, input_precision=PRECISION)
    tl.store(out, acc, mask=mask)


@triton.jit
def _add_selected_slots(
    dsum_rows, row_mask, selected, bank_cls, slots, slot_mask, stride_bm, stride_bc, dim,
    BLOCK_C: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, DSUM_STAGES: tl.constexpr,
):
    """``dsum[rows] += selected @ bank[slots]``, one ``BLOCK_C`` chunk of the output at a time.

    The kernel's ``num_stages`` pipelines only the bank loads that feed the dot; with
    ``DSUM_STAGES`` the loop is pipelined as a whole, so the next chunk's dsum read is in flight
    during this chunk's dot instead of stalling each chunk (same ops in the same order).
    """
    if DSUM_STAGES > 1:
        for first in tl.range(0, dim, BLOCK_C, num_stages=DSUM_STAGES):
            _add_chunk(dsum_rows, row_mask, selected, bank_cls, slots, slot_mask, stride_bm, stride_bc, dim, first,
                       BLOCK_C, UPCAST, PRECISION)
    else:
        for first in range(0, dim, BLOCK_C):
            _add_chunk(dsum_rows, row_mask, selected, bank_cls, slots, slot_mask, stride_bm, stride_bc, dim, first,
                       BLOCK_C, UPCAST, PRECISION)


@triton.jit
def _thresholded_sum_kernel(
    f_ptr, stride_fb, stride_fp, stride_fc, points, dim,
    bank_ptr, stride_bk, stride_bm, stride_bc, slots_per_class, counts_ptr, threshold,
    bounds_ptr, num_classes, sorted_rows_ptr, count_ptr, ssum_ptr, dsum_ptr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, CLASS_BLOCK: tl.constexpr,
    C_RESIDENT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, DSUM_STAGES: tl.constexpr,
    WIDE: tl.constexpr,
):
    if WIDE:  # offsets past 2**31 elements (offsets.py)
        stride_fc, stride_bk = tl.cast(stride_fc, tl.int64), tl.cast(stride_bk, tl.int64)
        stride_bm, stride_bc = tl.cast(stride_bm, tl.int64), tl.cast(stride_bc, tl.int64)
    cls, rows, row_mask = tile_rows(bounds_ptr, num_classes, sorted_rows_ptr, tl.program_id(0), BLOCK_M, CLASS_BLOCK)
    if cls < 0:
        return
    dsum_rows = dsum_ptr + rows * dim  # dsum is (N, C) contiguous
    if cls == num_classes:  # rows of no class select nothing (streamed: dsum is already zero)
        tl.store(count_ptr + rows, tl.zeros([BLOCK_M], dtype=tl.int64), mask=row_mask)
        tl.store(ssum_ptr + rows, tl.zeros([BLOCK_M], dtype=tl.float32), mask=row_mask)
        if C_RESIDENT:
            offs_c = tl.arange(0, BLOCK_C)
            mask = row_mask[:, None] & (offs_c < dim)[None, :]
            tl.store(dsum_rows[:, None] + offs_c[None, :], tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32), mask=mask)
        return
    f_rows = f_ptr + (rows // points) * stride_fb + (rows % points) * stride_fp
    inv_norm = row_inverse_norms(f_rows, row_mask, stride_fc, dim, BLOCK_M, BLOCK_C)
    n_valid = valid_slots(counts_ptr, cls, slots_per_class)
    bank_cls = bank_ptr + cls * stride_bk
    if C_RESIDENT:
        offs_c = tl.arange(0, BLOCK_C)
        a = load_features(f_rows, row_mask, stride_fc, offs_c, dim, UPCAST)
        pulled = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    count = tl.zeros([BLOCK_M], dtype=tl.int32)
    ssum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for first in range(0, n_valid, BLOCK_N):
        slots = first + tl.arange(0, BLOCK_N)
        slot_mask = slots < n_valid
        if C_RESIDENT:
            b = load_slots(bank_cls, slots, slot_mask, stride_bm, stride_bc, offs_c, dim, UPCAST)
            dots = tl.dot(a, b, input_precision=PRECISION)
        else:
            dots = streamed_dots(
                f_rows, row_mask, stride_fc, bank_cls, slots, slot_mask, stride_bm, stride_bc, dim,
                BLOCK_M, BLOCK_N, BLOCK_C, UPCAST, PRECISION,
            )
        sims = dots * inv_norm[:, None]
        selected = (sims > threshold) & slot_mask[None, :] & row_mask[:, None]
        hits = tl.sum(selected.to(tl.int32), axis=1)
        count += hits
        ssum += tl.sum(tl.where(selected, sims, 0.0), axis=1)
        if C_RESIDENT:
            pulled = tl.dot(selected.to(b.dtype), tl.trans(b), pulled, input_precision=PRECISION)
        elif tl.sum(hits, axis=0) > 0:  # a high threshold selects little: skip the dsum traffic
            _add_selected_slots(
                dsum_rows, row_mask, selected, bank_cls, slots, slot_mask, stride_bm, stride_bc, dim,
                BLOCK_C, UPCAST, PRECISION, DSUM_STAGES,
            )
    tl.store(count_ptr + rows, count.to(tl.int64), mask=row_mask)
    tl.store(ssum_ptr + rows, ssum, mask=row_mask)
    if C_RESIDENT:
        mask = row_mask[:, None] & (offs_c < dim)[None, :]
        tl.store(dsum_rows[:, None] + offs_c[None, :], pulled, mask=mask)


def launch_all_forward(
    features: Tensor,
    bank: Tensor,
    counts: Tensor,
    threshold: float,
    groups: ClassGroups,
    count: Tensor,
    ssum: Tensor,
    dsum: Tensor,
    config: TileConfig,
    precision: str | None,
) -> None:
    """Fill ``count``, ``ssum`` and ``dsum`` for every row (``dsum`` pre-set to zero where
    ``C`` is streamed, as the kernel accumulates into it; otherwise all three may be ``empty``)."""
    _, points, dim = features.shape
    num_classes = bank.shape[0]
    _thresholded_sum_kernel[(max_row_tiles(count.shape[0], num_classes + 1, config.block_m),)](
        features, *features.stride(), points, dim,
        bank, *bank.stride(), bank.shape[1], counts, float(threshold),
        groups.bounds, num_classes, groups.rows, count, ssum, dsum,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_C=config.block_c, CLASS_BLOCK=class_block(num_classes),
        C_RESIDENT=config.c_resident, UPCAST=precision is not None, PRECISION=precision, DSUM_STAGES=config.dsum_stages,
        WIDE=needs_int64(features, [2]) or needs_int64(bank), num_warps=config.num_warps, num_stages=config.num_stages,
    )
