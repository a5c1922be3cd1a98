"""Backward kernels: ``grad_i = g_i * (v_i - s_i * f^_i) / r_i``, elementwise per row.

``v_i`` is the winning dictionary vector ``bank[y_i, idx_i]`` ("max", gathered only for rows that
carry gradient; zero gradient where ``idx_i == -1``) or the sum of the selected ones ``dsum_i``
("all"). One kernel serves both: a first pass over ``C`` takes the row norm, a second writes the
gradient (with ``BLOCK_C`` the next power of two of ``C`` up to 4096, both passes are one chunk
and the second load hits the cache), rounded to the features' dtype to nearest even.
Deterministic: no reduction crosses rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cossim_fast.backends.triton.offsets import needs_int64
from cossim_fast.backends.triton.ring_buffer import cast_rne
from cossim_fast.backends.triton.tiles import next_power_of_2

EPS = tl.constexpr(1e-12)  # as torch.nn.functional.normalize
MAX_BLOCK_C = 4096
ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _row_gradient_kernel(
    out_ptr, f_ptr, stride_fb, stride_fp, stride_fc, points, dim, num_rows,
    grad_ptr, sims_ptr, pulled_ptr, stride_pk, stride_pm, stride_pc,
    labels_ptr, indices_ptr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GATHER: tl.constexpr, WIDE: tl.constexpr,
):
    if WIDE:  # offsets past 2**31 elements (offsets.py)
        stride_fc, stride_pc = tl.cast(stride_fc, tl.int64), tl.cast(stride_pc, tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < num_rows
    grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    sims = tl.load(sims_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if GATHER:  # "max": v = bank[y, idx]; rows without a winner get zero gradient
        slot = tl.load(indices_ptr + rows, mask=row_mask, other=-1)
        found = slot >= 0
        grad = tl.where(found, grad, 0.0)
        sims = tl.where(found, sims, 0.0)
        label = tl.load(labels_ptr + rows, mask=row_mask & found, other=0)
        pulled_rows = pulled_ptr + label * stride_pk + tl.where(found, slot, 0) * stride_pm
        pull = row_mask & found & (grad != 0.0)  # gather only rows that carry gradient
    else:  # "all": v = dsum[row]
        pulled_rows = pulled_ptr + rows * stride_pk
        pull = row_mask
    f_rows = f_ptr + (rows // points) * stride_fb + (rows % points) * stride_fp
    sumsq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for first in range(0, dim, BLOCK_C):
        offs_c = first + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (offs_c < dim)[None, :]
        x = tl.load(f_rows[:, None] + offs_c[None, :] * stride_fc, mask=mask, other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    inv_norm = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(sumsq), EPS))
    scale = grad * inv_norm
    shrink = sims * inv_norm
    for first in range(0, dim, BLOCK_C):
        offs_c = first + tl.arange(0, BLOCK_C)
        c_mask = (offs_c < dim)[None, :]
        x = tl.load(f_rows[:, None] + offs_c[None, :] * stride_fc, mask=row_mask[:, None] & c_mask, other=0.0)
        v = tl.load(pulled_rows[:, None] + offs_c[None, :] * stride_pc, mask=pull[:, None] & c_mask, other=0.0)
        out = scale[:, None] * (v.to(tl.float32) - shrink[:, None] * x.to(tl.float32))
        tl.store(out_ptr + rows[:, None] * dim + offs_c[None, :], cast_rne(out, out_ptr.dtype.element_ty), mask=row_mask[:, None] & c_mask)


def _launch(features: Tensor, grad: Tensor, sims: Tensor, pulled: Tensor, labels: Tensor | None, indices: Tensor | None) -> Tensor:
    num_images, points, dim = features.shape
    num_rows = num_images * points
    out = torch.empty(num_rows, dim, dtype=features.dtype, device=features.device)
    if num_rows == 0:
        return out
    block_c = min(max(16, next_power_of_2(dim)), MAX_BLOCK_C)
    block_r = max(1, min(64, ELEMENTS_PER_PROGRAM // block_c))
    gather = labels is not None
    wide = needs_int64(features, [2]) or needs_int64(pulled, [pulled.dim() - 1])
    # "max" gathers from the (K, M, C) bank; "all" reads row i of the (N, C) dsum (no slot stride).
    strides = pulled.stride() if gather else (pulled.stride(0), 0, pulled.stride(1))
    _row_gradient_kernel[(triton.cdiv(num_rows, block_r),)](
        out, features, *features.stride(), points, dim, num_rows,
        grad.contiguous(), sims.contiguous(), pulled, *strides,
        labels, indices,
        BLOCK_R=block_r, BLOCK_C=block_c, GATHER=gather, WIDE=wide,
        num_warps=4 if block_r * block_c <= 2048 else 8,
    )
    return out


def max_backward(grad_values: Tensor, features: Tensor, labels: Tensor, bank: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """``(N, C)`` gradient in the features' dtype from the saved argmax (one bank row per row)."""
    return _launch(features, grad_values, values, bank, labels, indices)


def all_backward(grad_ssum: Tensor, features: Tensor, ssum: Tensor, dsum: Tensor) -> Tensor:
    """``(N, C)`` gradient in the features' dtype of the per-row selected-similarity sums."""
    return _launch(features, grad_ssum, ssum, dsum, None, None)
