"""The compiled CUDA backend (``cossim_fast._C``): for now only the dictionary update.

The forward and backward kernels are not written yet: ``unsupported_reasons`` says so, and the
chooser falls back to the ``triton`` or ``torch`` backend for them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cossim_fast import _extension
from cossim_fast.backends.base import OPERATIONS, Backend

#: Operations the CUDA extension implements so far.
IMPLEMENTED = ("update",)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class CudaBackend(Backend):
    """Hand-written CUDA kernels of the compiled extension."""

    name = "cuda"

    def unsupported_reasons(self, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
        reasons = []
        if op not in OPERATIONS:
            reasons.append(f"unknown operation {op!r} (one of {', '.join(OPERATIONS)})")
        if not _extension.is_loaded():
            reasons.append(f"the CUDA extension is not loaded: {_extension.load_error}")
        elif not _extension.has_cuda_kernels():
            reasons.append("the extension was built without CUDA kernels (CPU-only build)")
        device = torch.device(device)
        if device.type != "cuda":
            reasons.append(f"tensors are on {device.type}, the CUDA kernels need cuda")
        if op in OPERATIONS and op not in IMPLEMENTED:
            reasons.append(f"{op} is not implemented in the CUDA extension yet")
        if dtype not in DTYPES:
            reasons.append(
                f"dtype {_dtype_name(dtype)} is not supported ({', '.join(_dtype_name(d) for d in DTYPES)})"
            )
        return reasons

    def max_forward(self, features, labels, bank, counts, ignore_index):
        raise NotImplementedError("max_forward is not implemented in the CUDA extension yet")

    def max_backward(self, grad_values, features, labels, bank, values, indices):
        raise NotImplementedError("max_backward is not implemented in the CUDA extension yet")

    def all_forward(self, features, labels, bank, counts, threshold, ignore_index):
        raise NotImplementedError("all_forward is not implemented in the CUDA extension yet")

    def all_backward(self, grad_ssum, features, ssum, dsum):
        raise NotImplementedError("all_backward is not implemented in the CUDA extension yet")

    def update(
        self,
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
        torch.ops.cossim_fast.ring_buffer_update(
            bank, counts, ptr, features, labels, order, denom, int(max_per_class), int(ignore_index)
        )
