"""Forward "max": per row, the max cosine similarity over its class bucket, and its slot.

One program per (class, row tile) of the schedule (``cossim_fast.backends.schedule.class_tiles``) streams that class's
``counts[k]`` valid slots, ``BLOCK_N`` at a time, and keeps a running max/argmax per row of the
raw dot products (bank rows are unit-norm); only the winner is scaled by the row's inverse norm,
so no normalized copy of the features exists. Two regimes, by ``C``:

- ``C_RESIDENT``: the whole ``BLOCK_M x C`` row tile is loaded once and stays in registers;
- otherwise each slot tile is a small GEMM with a loop over ``C`` in ``BLOCK_C`` chunks.

Only tile sizes are compile-time constants: sizes, strides and ``counts`` are runtime values,
so a new class histogram never recompiles. Tile sizes: ``tiles.py``. The helpers here are shared
with ``thresholded_sum``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from cossim_fast.backends.triton.tiles import TileConfig

EPS = tl.constexpr(1e-12)  # as torch.nn.functional.normalize


@triton.jit
def tile_rows(tiles_ptr, sorted_rows_ptr, BLOCK_M: tl.constexpr):
    """This program's class (-1: past the schedule), row ids and row mask."""
    pid = tl.program_id(0)
    cls = tl.load(tiles_ptr + pid * 3)
    start = tl.load(tiles_ptr + pid * 3 + 1)
    end = tl.load(tiles_ptr + pid * 3 + 2)
    offs = start + tl.arange(0, BLOCK_M)
    row_mask = offs < end
    rows = tl.load(sorted_rows_ptr + offs, mask=row_mask, other=0)
    return cls, rows, row_mask


@triton.jit
def valid_slots(counts_ptr, cls, slots):
    """``counts[cls]`` clamped to ``[0, slots]``: with value checks off a bad count must not send
    the kernel outside its bucket (the other backends clamp by slicing)."""
    return tl.minimum(tl.maximum(tl.load(counts_ptr + cls), 0), slots)


@triton.jit
def row_inverse_norms(f_rows, row_mask, stride_fc, dim, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """``1 / max(||f||, eps)`` per row, in fp32 (IEEE sqrt and division, as torch)."""
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for first in range(0, dim, BLOCK_C):
        offs_c = first + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (offs_c < dim)[None, :]
        x = tl.load(f_rows[:, None] + offs_c[None, :] * stride_fc, mask=mask, other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    return tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(sumsq), EPS))


@triton.jit
def load_features(f_rows, row_mask, stride_fc, offs_c, dim, UPCAST: tl.constexpr):
    """A ``(BLOCK_M, BLOCK_C)`` dot operand of feature rows (zeros outside)."""
    mask = row_mask[:, None] & (offs_c < dim)[None, :]
    x = tl.load(f_rows[:, None] + offs_c[None, :] * stride_fc, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def load_slots(bank_cls, slots, slot_mask, stride_bm, stride_bc, offs_c, dim, UPCAST: tl.constexpr):
    """A ``(BLOCK_C, BLOCK_N)`` dot operand: bank slots as columns (zeros outside)."""
    mask = slot_mask[None, :] & (offs_c < dim)[:, None]
    b = tl.load(bank_cls + slots[None, :] * stride_bm + offs_c[:, None] * stride_bc, mask=mask, other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    return b


@triton.jit
def streamed_dots(
    f_rows, row_mask, stride_fc, bank_cls, slots, slot_mask, stride_bm, stride_bc, dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Raw dot products ``(BLOCK_M, BLOCK_N)`` with a loop over ``C`` (the large-C regime)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for first in range(0, dim, BLOCK_C):
        offs_c = first + tl.arange(0, BLOCK_C)
        a = load_features(f_rows, row_mask, stride_fc, offs_c, dim, UPCAST)
        b = load_slots(bank_cls, slots, slot_mask, stride_bm, stride_bc, offs_c, dim, UPCAST)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _max_forward_kernel(
    f_ptr, stride_fb, stride_fp, stride_fc, points, dim,
    bank_ptr, stride_bk, stride_bm, stride_bc, slots_per_class, counts_ptr,
    tiles_ptr, sorted_rows_ptr, values_ptr, indices_ptr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    C_RESIDENT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    cls, rows, row_mask = tile_rows(tiles_ptr, sorted_rows_ptr, BLOCK_M)
    if cls < 0:
        return
    f_rows = f_ptr + (rows // points) * stride_fb + (rows % points) * stride_fp
    inv_norm = row_inverse_norms(f_rows, row_mask, stride_fc, dim, BLOCK_M, BLOCK_C)
    n_valid = valid_slots(counts_ptr, cls, slots_per_class)
    bank_cls = bank_ptr + cls * stride_bk
    if C_RESIDENT:
        offs_c = tl.arange(0, BLOCK_C)
        a = load_features(f_rows, row_mask, stride_fc, offs_c, dim, UPCAST)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_slot = tl.full([BLOCK_M], -1, dtype=tl.int64)
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
        # Padding is -inf, never 0: a row whose similarities are all negative must not pick it.
        dots = tl.where(slot_mask[None, :], dots, float("-inf"))
        tile_best, tile_slot = tl.max(dots, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best  # strict: on a tie the earlier tile (lower slot) stays
        best = tl.where(better, tile_best, best)
        best_slot = tl.where(better, first + tile_slot, best_slot)
    # No winner (empty bucket): -inf, even where inv_norm is 0 (a norm overflowing fp32).
    tl.store(values_ptr + rows, tl.where(best_slot >= 0, best * inv_norm, float("-inf")), mask=row_mask)
    tl.store(indices_ptr + rows, best_slot, mask=row_mask)


def launch_max_forward(
    features: Tensor,
    bank: Tensor,
    counts: Tensor,
    sorted_rows: Tensor,
    tiles: Tensor,
    values: Tensor,
    indices: Tensor,
    config: TileConfig,
    precision: str | None,
) -> None:
    """Fill ``values``/``indices`` (pre-set to ``-inf``/``-1``) for the scheduled rows."""
    _, points, dim = features.shape
    _max_forward_kernel[(tiles.shape[0],)](
        features, *features.stride(), points, dim,
        bank, *bank.stride(), bank.shape[1], counts,
        tiles, sorted_rows, values, indices,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_C=config.block_c,
        C_RESIDENT=config.c_resident, UPCAST=precision is not None, PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
