"""The dictionary update kernel: the ring-buffer write of ``Backend.update``, bitwise.

As in ``ring_buffer_update_torch``, every slot looks up the visited row (if any) that lands on it
instead of rows scattering into slots: each slot is written by at most one program, so the
result is deterministic, and all shapes are static, so nothing waits for the device. The value
written is ``(features[row].float() / denom[row]).to(bank.dtype)``: an IEEE fp32 division
(``div_rn``, not Triton's approximate ``/``) and a round-to-nearest-even cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cossim_fast.backends.ring_buffer import advance, plan_visits
from cossim_fast.backends.triton.offsets import needs_int64
from cossim_fast.backends.triton.tiles import next_power_of_2

ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr):
    """fp32 -> ``DTYPE`` rounding to nearest even, exactly as torch's ``.to()``.

    bf16 is rounded with integer arithmetic (torch's own formula), because Triton's interpreter
    truncates fp32 -> bf16; on the GPU it equals the native conversion.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = tl.where(is_nan, 0x7FC0, rounded)  # NaN stays a quiet NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _ring_buffer_kernel(
    bank_ptr, stride_bk, stride_bm, stride_bc, num_classes, slots_per_class, dim,
    f_ptr, stride_fb, stride_fp, stride_fc, points,
    denom_ptr, head_ptr, taken_ptr, first_ptr, rows_by_class_ptr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
):
    if WIDE:  # offsets past 2**31 elements (offsets.py)
        stride_fc, stride_bc = tl.cast(stride_fc, tl.int64), tl.cast(stride_bc, tl.int64)
    flat = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    in_bank = flat < num_classes * slots_per_class
    cls = flat // slots_per_class
    slot = flat % slots_per_class
    head = tl.load(head_ptr + cls, mask=in_bank, other=0)
    taken = tl.load(taken_ptr + cls, mask=in_bank, other=0)
    # Rank r goes to (head + r) mod M, so this slot receives ranks offset, offset + M, ...
    offset = slot - head
    offset = tl.where(offset < 0, offset + slots_per_class, offset)
    written = in_bank & (offset < taken)
    # ... of which only the last one below n_k survives.
    rank = offset + slots_per_class * (tl.maximum(taken - 1 - offset, 0) // slots_per_class)
    first = tl.load(first_ptr + cls, mask=written, other=0)
    row = tl.load(rows_by_class_ptr + first + rank, mask=written, other=0)
    denom = tl.load(denom_ptr + row, mask=written, other=1.0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = written[:, None] & (offs_c < dim)[None, :]
    f_rows = f_ptr + (row // points) * stride_fb + (row % points) * stride_fp
    x = tl.load(f_rows[:, None] + offs_c[None, :] * stride_fc, mask=mask, other=0.0).to(tl.float32)
    value = cast_rne(tl.div_rn(x, denom[:, None]), bank_ptr.dtype.element_ty)
    out = bank_ptr + cls * stride_bk + slot * stride_bm
    tl.store(out[:, None] + offs_c[None, :] * stride_bc, value, mask=mask)


def ring_buffer_update(
    bank: Tensor,
    counts: Tensor,
    ptr: Tensor,
    features: Tensor,
    labels: Tensor,
    order: Tensor | None,
    denom: Tensor,
    max_per_class: int,
) -> None:
    """In-place update; semantics in ``Backend.update`` (cossim_fast/backends/base.py)."""
    num_classes, slots, dim = bank.shape
    num_rows = labels.numel()
    if num_rows == 0:
        return
    plan = plan_visits(labels, order, num_classes, max_per_class)

    block_c = min(max(16, next_power_of_2(dim)), 256)
    block_s = max(16, ELEMENTS_PER_PROGRAM // block_c)
    grid = (triton.cdiv(num_classes * slots, block_s), triton.cdiv(dim, block_c))
    _ring_buffer_kernel[grid](
        bank, *bank.stride(), num_classes, slots, dim,
        features, *features.stride(), features.shape[1],
        # The head wrapped as the torch path does: with the value checks off, a ptr outside
        # [0, M) must not send a class's rows into another class's slots.
        denom, torch.remainder(ptr, slots), plan.taken, plan.first, plan.rows_by_class,
        BLOCK_S=block_s, BLOCK_C=block_c, WIDE=needs_int64(features, [2]) or needs_int64(bank, [2]),
    )
    # Stream order: the kernel has read the old heads before they move.
    advance(counts, ptr, plan.taken, slots)
