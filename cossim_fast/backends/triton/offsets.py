"""When the kernels' element offsets need 64 bits.

Triton types an integer argument below 2**31 as int32, so ``offs_c * stride_fc`` or
``cls * stride_bk`` is computed in int32 and wraps once the product reaches 2**31 (the class
offset of a dictionary of K = 19, M = 65536, C = 2048; the channel offset of an N x C view of
a C x N matrix past a million rows). The kernels take ``WIDE``: with it they cast those strides
to int64 first, so the products are int64. Only such launches compile that variant; the usual
one keeps its int32 arithmetic. Offsets along rows are int64 in every variant (row ids are).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

INT32_LIMIT = 2**31


def needs_int64(tensor: Tensor, dims: Sequence[int] | None = None) -> bool:
    """Whether an index times its stride along one of ``dims`` (default: all) may reach 2**31."""
    dims = range(tensor.dim()) if dims is None else dims
    return any((tensor.shape[d] - 1) * abs(tensor.stride(d)) >= INT32_LIMIT for d in dims)
