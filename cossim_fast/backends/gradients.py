"""The O(N*C) backward of METHOD.md 3 and 4, shared by the PyTorch backends.

Both modes reduce to ``g_i * (v_i - s_i * f^_i) / r_i`` per row, where ``v_i`` is the winning
dictionary vector ("max") or the sum of the selected ones ("all"), so no ``N x M`` is needed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cossim_fast.backends.numerics import EPS
from cossim_fast.backends.rows import chunk_length, image_chunks, row_slice


def _row_gradient(grad, rows: Tensor, pulled: Tensor, sims: Tensor, acc: torch.dtype) -> Tensor:
    rows = rows.to(acc)
    inv_norm = 1.0 / torch.linalg.vector_norm(rows, dim=1).clamp_min(EPS)
    return (grad * inv_norm)[:, None] * (pulled - (sims * inv_norm)[:, None] * rows)


def _backward(features: Tensor, per_row) -> Tensor:
    num_images, points, dim = features.shape
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    out = torch.empty(num_images * points, dim, dtype=features.dtype, device=features.device)
    chunk = chunk_length(dim * 4 * 4)
    for start, stop in image_chunks(num_images, points, chunk):
        out[start:stop] = per_row(start, stop, row_slice(features, start, stop), acc).to(features.dtype)
    return out


def max_backward(grad_values: Tensor, features: Tensor, labels: Tensor, bank: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """``(N, C)`` gradient of ``values`` from the saved argmax (a gather of one slot per row)."""

    def per_row(start, stop, rows, acc):
        found = indices[start:stop] >= 0
        winner = bank[labels[start:stop].clamp(min=0, max=bank.shape[0] - 1), indices[start:stop].clamp(min=0)]
        grad = torch.where(found, grad_values[start:stop].to(acc), 0)
        sims = torch.where(found, values[start:stop].to(acc), 0)
        return _row_gradient(grad, rows, winner.to(acc), sims, acc)

    return _backward(features, per_row)


def all_backward(grad_ssum: Tensor, features: Tensor, ssum: Tensor, dsum: Tensor) -> Tensor:
    """``(N, C)`` gradient of the per-row selected-similarity sums ("all" mode), elementwise."""

    def per_row(start, stop, rows, acc):
        return _row_gradient(grad_ssum[start:stop].to(acc), rows, dsum[start:stop].to(acc), ssum[start:stop].to(acc), acc)

    return _backward(features, per_row)
