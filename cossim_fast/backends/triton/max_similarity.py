"""Forward "max": per row, the max cosine similarity over its class bucket, and its slot.

One program per (class, row tile) streams that class's ``counts[k]`` valid slots, ``BLOCK_N`` at
a time, and keeps a running max/argmax per row of the raw dot products (bank rows are
unit-norm); only the winner is scaled by the row's inverse norm, so no normalized copy of the
features exists. Each program finds its row tile itself (``tile_rows``) from the class bounds
of the rows sorted by class (``cossim_fast.backends.schedule.group_by_class``): building the
schedule takes a sort and a search, not a chain of small device ops that each cost a launch. Two regimes, by ``C``:

- ``C_RESIDENT``: the whole ``BLOCK_M x C`` row tile is loaded once and stays in registers;
- otherwise each slot tile is a small GEMM with a loop over ``C`` in ``BLOCK_C`` chunks.

With ``slot_splits = S > 1`` each row tile gets S consecutive programs, each over a contiguous
share of the slots. Autotune candidates for two cases: small N, where the (class, row tile) grid
alone cannot fill the GPU; and large C, where each program re-reads its row tile (512 KiB at
C = 2048) for every slot tile, and a wave of one-split programs holds more distinct row tiles
than L2 does (132 x 512 KiB), while S splits side by side share theirs. Each split writes its
row maxima packed as int64 keys (value bits made orderable, then the slot inverted, so a larger
key is a larger value or, on a tie, a lower slot) and a second kernel takes the max of the S
keys per row: no atomics, the same winner and value bit for bit as one program, 8 bytes per row
and split plus 4 for the row norms.

With ``flatten`` (streamed regime only) the slot-tile loop and its loop over ``C`` become one
loop for Triton's software pipeliner, so the next slot tile's first chunks load while this one's
last chunks and its max/argmax run, instead of the pipeline draining and refilling at every slot
tile (32 chunks at C = 2048). The same dots in the same order: the same results.

Only tile sizes are compile-time constants: sizes, strides and ``counts`` are runtime values,
so a new class histogram never recompiles. ``CLASS_BLOCK``, the ``K + 1`` row segments padded
to a power of two, is one too (a new K recompiles only past a power of two); ``tile_rows``
holds that many bounds per program, about 26 more registers at K = 150 than at 19 and spills
from K of about 4000 on (triton 3.8, sm_90). Tile sizes: ``tiles.py``. The helpers here are shared
with ``thresholded_sum``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cossim_fast.backends.schedule import ClassGroups, max_row_tiles
from cossim_fast.backends.triton.offsets import needs_int64
from cossim_fast.backends.triton.tiles import TileConfig, next_power_of_2

EPS = tl.constexpr(1e-12)  # as torch.nn.functional.normalize
NO_WINNER = tl.constexpr(-(2**63))  # the packed key of a split without a slot: below every other


@triton.jit
def tile_rows(bounds_ptr, num_classes, sorted_rows_ptr, tile, BLOCK_M: tl.constexpr, CLASS_BLOCK: tl.constexpr):
    """Row tile ``tile``'s class, row ids and row mask.

    Segment ``k < K`` holds class ``k``'s rows, ``sorted_rows[bounds[k]:bounds[k + 1]]``, and
    segment ``K`` the rows of no class; each is cut into tiles of ``BLOCK_M`` rows, in segment
    order. The class is ``K`` for a tile of rows of no class and -1 past the last tile.
    ``CLASS_BLOCK`` is the (power of two) vector width of the ``K + 1`` segments.
    """
    segment = tl.arange(0, CLASS_BLOCK)
    in_table = segment <= num_classes
    lo = tl.load(bounds_ptr + segment, mask=in_table, other=0)
    hi = tl.load(bounds_ptr + segment + 1, mask=in_table, other=0)
    tiles_of = tl.cdiv(hi - lo, BLOCK_M)
    tiles_end = tl.cumsum(tiles_of, 0)
    mine = (tile < tiles_end) & (tile >= tiles_end - tiles_of)  # one segment, or none past the end
    cls = tl.max(tl.where(mine, segment, -1), 0)
    start = tl.sum(tl.where(mine, lo + (tile - (tiles_end - tiles_of)) * BLOCK_M, 0), 0)
    end = tl.sum(tl.where(mine, hi, 0), 0)
    offs = start + tl.arange(0, BLOCK_M)
    row_mask = offs < end  # a tile ends at start + BLOCK_M or at its segment's end
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
    bounds_ptr, num_classes, sorted_rows_ptr, values_ptr, indices_ptr, keys_ptr, norms_ptr, num_rows,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, CLASS_BLOCK: tl.constexpr,
    C_RESIDENT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, SPLITS: tl.constexpr,
    FLATTEN: tl.constexpr, WIDE: tl.constexpr,
):
    if WIDE:  # offsets past 2**31 elements (offsets.py)
        stride_fc, stride_bk = tl.cast(stride_fc, tl.int64), tl.cast(stride_bk, tl.int64)
        stride_bm, stride_bc = tl.cast(stride_bm, tl.int64), tl.cast(stride_bc, tl.int64)
    # A row tile's splits are consecutive programs: they run side by side, sharing its rows in L2.
    tile = tl.program_id(0) // SPLITS
    split = tl.program_id(0) % SPLITS
    cls, rows, row_mask = tile_rows(bounds_ptr, num_classes, sorted_rows_ptr, tile, BLOCK_M, CLASS_BLOCK)
    if cls < 0:
        return
    if cls == num_classes:  # rows of no class: no winner (with splits, the merge writes it)
        if SPLITS == 1:
            store_no_winner(values_ptr, indices_ptr, rows, row_mask)
        return
    f_rows = f_ptr + (rows // points) * stride_fb + (rows % points) * stride_fp
    inv_norm = row_inverse_norms(f_rows, row_mask, stride_fc, dim, BLOCK_M, BLOCK_C)
    n_valid = valid_slots(counts_ptr, cls, slots_per_class)
    bank_cls = bank_ptr + cls * stride_bk
    if C_RESIDENT:
        offs_c = tl.arange(0, BLOCK_C)
        a = load_features(f_rows, row_mask, stride_fc, offs_c, dim, UPCAST)
    # This program's slots [lo, hi): all of them (a literal 0 start keeps the slot tiles'
    # alignment visible to the compiler), or a share of whole slot tiles (empty past the last slot).
    if SPLITS == 1:
        lo = 0
        hi = n_valid
    else:
        share = tl.cdiv(tl.cdiv(n_valid, SPLITS), BLOCK_N) * BLOCK_N
        lo = split * share
        hi = tl.minimum(lo + share, n_valid)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_slot = tl.full([BLOCK_M], -1, dtype=tl.int64)
    for first in tl.range(lo, hi, BLOCK_N, flatten=FLATTEN):
        slots = first + tl.arange(0, BLOCK_N)
        slot_mask = slots < hi
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
    if SPLITS == 1:
        store_winner(values_ptr, indices_ptr, rows, row_mask, best, best_slot, inv_norm)
    else:
        tl.store(keys_ptr + split.to(tl.int64) * num_rows + rows, _pack(best, best_slot), mask=row_mask)
        if split == 0:
            tl.store(norms_ptr + rows, inv_norm, mask=row_mask)


@triton.jit
def store_winner(values_ptr, indices_ptr, rows, row_mask, best, best_slot, inv_norm):
    # No winner (empty bucket): -inf, even where inv_norm is 0 (a norm overflowing fp32).
    tl.store(values_ptr + rows, tl.where(best_slot >= 0, best * inv_norm, float("-inf")), mask=row_mask)
    tl.store(indices_ptr + rows, best_slot, mask=row_mask)


@triton.jit
def store_no_winner(values_ptr, indices_ptr, rows, row_mask):
    tl.store(values_ptr + rows, tl.full(rows.shape, float("-inf"), tl.float32), mask=row_mask)
    tl.store(indices_ptr + rows, tl.full(rows.shape, -1, tl.int64), mask=row_mask)


@triton.jit
def _pack(best, best_slot):
    """(raw max, slot) as one int64 key ordered by value, then by lower slot."""
    bits = best.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # float order as signed integer order
    key = (ordered.to(tl.int64) << 32) | ((~best_slot) & 0xFFFFFFFF)
    return tl.where(best_slot >= 0, key, NO_WINNER)


@triton.jit
def _merge_splits_kernel(
    keys_ptr, norms_ptr, num_rows, bounds_ptr, num_classes, sorted_rows_ptr, values_ptr, indices_ptr,
    BLOCK_M: tl.constexpr, CLASS_BLOCK: tl.constexpr, SPLITS: tl.constexpr,
):
    cls, rows, row_mask = tile_rows(bounds_ptr, num_classes, sorted_rows_ptr, tl.program_id(0), BLOCK_M, CLASS_BLOCK)
    if cls < 0:
        return
    if cls == num_classes:
        store_no_winner(values_ptr, indices_ptr, rows, row_mask)
        return
    split_keys = keys_ptr + rows
    key = tl.load(split_keys, mask=row_mask, other=NO_WINNER)
    for _ in tl.static_range(1, SPLITS):
        split_keys += num_rows  # a step at a time: split * num_rows may not fit in int32
        key = tl.maximum(key, tl.load(split_keys, mask=row_mask, other=NO_WINNER))
    ordered = (key >> 32).to(tl.int32)
    best = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    best_slot = tl.where(key != NO_WINNER, 0xFFFFFFFF - (key & 0xFFFFFFFF), -1)
    inv_norm = tl.load(norms_ptr + rows, mask=row_mask, other=0.0)
    store_winner(values_ptr, indices_ptr, rows, row_mask, best, best_slot, inv_norm)


def class_block(num_classes: int) -> int:
    """``tile_rows``'s vector width over the ``K + 1`` row segments (a power of two)."""
    return next_power_of_2(num_classes + 1)


def launch_max_forward(
    features: Tensor,
    bank: Tensor,
    counts: Tensor,
    groups: ClassGroups,
    values: Tensor,
    indices: Tensor,
    config: TileConfig,
    precision: str | None,
) -> None:
    """Fill ``values``/``indices`` (``empty``) for every row, ``(-inf, -1)`` for rows of no class."""
    _, points, dim = features.shape
    num_classes = bank.shape[0]
    splits, num_rows = config.slot_splits, values.shape[0]
    if splits > 1:  # every row of a class gets a key from every split: no initialization needed
        keys = torch.empty(splits, num_rows, dtype=torch.int64, device=values.device)
        norms = torch.empty(num_rows, dtype=torch.float32, device=values.device)
    else:
        keys, norms = indices, values  # not read or written
    num_tiles, segments = max_row_tiles(num_rows, num_classes + 1, config.block_m), class_block(num_classes)
    _max_forward_kernel[(num_tiles * splits,)](
        features, *features.stride(), points, dim,
        bank, *bank.stride(), bank.shape[1], counts,
        groups.bounds, num_classes, groups.rows, values, indices, keys, norms, num_rows,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_C=config.block_c, CLASS_BLOCK=segments,
        C_RESIDENT=config.c_resident, UPCAST=precision is not None, PRECISION=precision, SPLITS=splits,
        FLATTEN=config.flatten, WIDE=needs_int64(features, [2]) or needs_int64(bank),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(num_tiles,)](
            keys, norms, num_rows, groups.bounds, num_classes, groups.rows, values, indices,
            BLOCK_M=config.block_m, CLASS_BLOCK=segments, SPLITS=splits,
        )
