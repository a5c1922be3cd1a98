"""The compiled CUDA backend (``cossim_fast._C``): hand-written kernels for every operation.

- forward ("max" and "all"): ``torch.ops.cossim_fast.cuda_max_forward`` / ``cuda_all_forward``.
  The rows are grouped by class on the device (``group_by_class``: six torch ops, no host
  synchronization); a small kernel writes each thread block's (class, row tile) from the class
  bounds, and one thread block per tile streams that class's valid slots through shared memory.
  bf16/fp16 run on tensor cores (WMMA, fp32 accumulation); fp32 runs as
  exact fp32 FMAs ("ieee", default) or on TF32 tensor cores ("tf32"), chosen by
  ``COSSIM_FAST_CUDA_FP32_PRECISION=ieee|tf32`` or ``set_fp32_precision``; a bank whose dtype
  differs from the features' is always dotted in exact fp32.
- backward: ``cuda_max_backward`` / ``cuda_all_backward``, elementwise per row.
- dictionary update: ``ring_buffer_update``.

The kernels are in ``csrc/cuda/cosine_similarity_kernels.cuh`` and
``csrc/cuda/dictionary_update_kernels.cuh``, launched by the ``.cu`` files beside them.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from cossim_fast import _extension
from cossim_fast.backends import auto_rule
from cossim_fast.backends.base import OPERATIONS, Backend
from cossim_fast.backends.schedule import group_by_class

#: Operations the CUDA extension implements.
IMPLEMENTED = ("max_forward", "max_backward", "all_forward", "all_backward", "update")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: How fp32 x fp32 dot products run in the forward kernels.
FP32_PRECISIONS = ("ieee", "tf32")
PRECISION_ENV = "COSSIM_FAST_CUDA_FP32_PRECISION"
#: Rows per thread block of the forward kernels (kBlockM in csrc/cuda/cosine_similarity_kernels.cuh).
#: Longer tiles would still be correct (a block loops over its tile in groups of 64), only coarser.
TILE_ROWS = 64
#: The tensor-core paths (bf16/fp16, tf32) need compute capability 8.0 (WMMA bf16/tf32).
MIN_TENSOR_CORE_CAPABILITY = (8, 0)

_OPS_USING_COSINE_KERNELS = ("max_forward", "max_backward", "all_forward", "all_backward")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_precision() -> tuple[str, str | None]:
    """The precision from the environment and, if it is not valid, why (reported, not raised)."""
    value = os.environ.get(PRECISION_ENV, "ieee").strip().lower() or "ieee"
    if value not in FP32_PRECISIONS:
        return "ieee", f"environment variable {PRECISION_ENV} must be one of {FP32_PRECISIONS}, got {value!r}"
    return value, None


_fp32_precision, _precision_error = _read_precision()


def set_fp32_precision(precision: str) -> None:
    """How fp32 dots run: "ieee" (exact fp32 FMAs, default) or "tf32" (tensor cores, ~1e-3)."""
    global _fp32_precision, _precision_error
    if precision not in FP32_PRECISIONS:
        raise ValueError(f"CUDA fp32 precision must be one of {FP32_PRECISIONS}, got {precision!r}")
    _fp32_precision, _precision_error = precision, None


def fp32_precision() -> str:
    return _fp32_precision


def _tensor_core_reason(op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Compute capability below 8.0 for an input that takes a tensor-core path, or None."""
    if op not in ("max_forward", "all_forward") or device.type != "cuda" or not torch.cuda.is_available():
        return None
    uses_tensor_cores = dtype in (torch.bfloat16, torch.float16) or _fp32_precision == "tf32"
    if not uses_tensor_cores:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_TENSOR_CORE_CAPABILITY:
        return (
            f"{_dtype_name(dtype)} forward needs compute capability >= 8.0 (tensor cores), "
            f"device has {capability[0]}.{capability[1]}"
        )
    return None


def _architecture_reason(device: torch.device) -> str | None:
    """The extension holds no code this GPU can run (e.g. a T4, sm_75, with the default
    8.0;9.0+PTX build), or None."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if _extension.runs_on((major, minor)) is not False:
        return None
    return (
        f"the extension's CUDA kernels were built for {_extension.architectures()}, "
        f"not for this GPU (sm_{major}{minor}): rebuild with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" "
        "pip install -e . --no-build-isolation"
    )


class CudaBackend(Backend):
    """Hand-written CUDA kernels of the compiled extension."""

    name = "cuda"
    #: Where the ops are looked up: the tests substitute the CPU emulation of the same kernels
    #: (tests/cuda_emulation), which has functions of the same names.
    ops = torch.ops.cossim_fast

    def unsupported_reasons(self, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
        reasons = []
        if op not in OPERATIONS:
            reasons.append(f"unknown operation {op!r} (one of {', '.join(OPERATIONS)})")
        if not _extension.is_loaded():
            reasons.append(f"the CUDA extension is not loaded: {_extension.load_error}")
        elif not _extension.has_cuda_kernels():
            reasons.append("the extension was built without CUDA kernels (CPU-only build)")
        elif op in _OPS_USING_COSINE_KERNELS and not _extension.has_cosine_ops():
            reasons.append(
                f"the loaded extension predates the {op} kernel; rebuild it: pip install -e . --no-build-isolation"
            )
        device = torch.device(device)
        if device.type != "cuda":
            reasons.append(f"tensors are on {device.type}, the CUDA kernels need cuda")
        elif _extension.has_cuda_kernels() and torch.cuda.is_available():
            why = _architecture_reason(device)
            if why:
                reasons.append(why)
        if op in OPERATIONS and op not in IMPLEMENTED:
            reasons.append(f"{op} is not implemented in the CUDA extension yet")
        if dtype not in DTYPES:
            reasons.append(
                f"dtype {_dtype_name(dtype)} is not supported ({', '.join(_dtype_name(d) for d in DTYPES)})"
            )
        if op in ("max_forward", "all_forward") and _precision_error:
            reasons.append(_precision_error)
        if not reasons:
            why = _tensor_core_reason(op, device, dtype)
            if why:
                reasons.append(why)
        return reasons

    def auto_skip_reasons(self, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
        # The forward/backward kernels are chosen by "auto" only on a GPU architecture where
        # they were measured (so ran and passed there: ``auto_rule``); backend="cuda" reaches
        # them anywhere.
        if op in _OPS_USING_COSINE_KERNELS and not auto_rule.measured(op, auto_rule.capability(device), dtype):
            return [f"the CUDA {op} kernel has not been measured on this GPU architecture yet"]
        return []

    def max_forward(self, features, labels, bank, counts, ignore_index):
        # ignore_index is never a class (the contract checks it), so "no class" = outside [0, K).
        groups = group_by_class(labels, bank.shape[0])
        return self.ops.cuda_max_forward(
            features, labels, bank, counts.contiguous(), groups.rows, groups.bounds, TILE_ROWS, _fp32_precision
        )

    def max_backward(self, grad_values, features, labels, bank, values, indices):
        return self.ops.cuda_max_backward(
            grad_values.to(torch.float32).contiguous(),  # e.g. an expanded (stride 0) gradient
            features,
            labels.contiguous(),
            bank,
            values.to(torch.float32).contiguous(),
            indices.contiguous(),
        )

    def all_forward(self, features, labels, bank, counts, threshold, ignore_index):
        groups = group_by_class(labels, bank.shape[0])
        return self.ops.cuda_all_forward(
            features, labels, bank, counts.contiguous(), groups.rows, groups.bounds, TILE_ROWS, float(threshold),
            _fp32_precision,
        )

    def all_backward(self, grad_ssum, features, ssum, dsum):
        return self.ops.cuda_all_backward(
            grad_ssum.to(torch.float32).contiguous(),
            features,
            ssum.to(torch.float32).contiguous(),
            dsum.to(torch.float32).contiguous(),
        )

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
        self.ops.ring_buffer_update(
            bank, counts, ptr, features, labels, order, denom, int(max_per_class), int(ignore_index)
        )
