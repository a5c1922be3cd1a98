"""The "triton" backend: fused Triton kernels, rows grouped by class on the device.

Rows are sorted by class and cut into tiles of one class each (MoE-style routing: each class's
rows are padded to the row tile), so every program meets exactly one bucket and nothing outside
it. The sort and the class bounds are device ops; each program finds its tile from the bounds,
the grid is an upper bound computed from static sizes, and programs past the last tile exit at
once, so no call waits for the device. The kernels also write the rows of no class, so the
outputs need no fill.

On CPU tensors the kernels run through Triton's interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before triton is first imported.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from cossim_fast.backends.base import Backend
from cossim_fast.backends.schedule import group_by_class
from cossim_fast.backends.triton import (
    backward,
    max_similarity,
    ring_buffer,
    thresholded_sum,
    tiles,
)

#: Whether Triton's interpreter was on when the kernels were decorated: read from a kernel, not
#: the environment, whose spellings Triton parses its own way ("1 " is off to Triton).
INTERPRET = isinstance(ring_buffer._ring_buffer_kernel, InterpretedFunction)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
#: Shared memory per block that the 16-bit forwards' default tiles take at most (bench.resources;
#: bench/test_resources.py keeps it so): every GPU from sm_80 on has it, a T4 (64 KiB) has not.
SIXTEEN_BIT_FORWARD_SHARED_BYTES = 96 * 1024


def _check_precision(precision: str) -> str:
    if precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32 dot precision must be one of {FP32_PRECISIONS}, got {precision!r}")
    return precision


_fp32_precision = _check_precision(os.environ.get("COSSIM_FAST_TRITON_FP32_PRECISION", "ieee"))


def set_fp32_precision(precision: str) -> None:
    """How fp32 dots run: "ieee" (exact fp32, default), "tf32" (fast, ~1e-3) or "tf32x3"."""
    global _fp32_precision
    _fp32_precision = _check_precision(precision)


def fp32_precision() -> str:
    return _fp32_precision


def dot_precision(features_dtype: torch.dtype, bank_dtype: torch.dtype) -> str | None:
    """``None``: dot the native 16-bit tiles; otherwise upcast both to fp32 and dot at this precision.

    Mixed dtypes are dotted in fp32 so neither side is rounded. The interpreter computes bf16
    dots wrongly, so it gets fp32 tiles (bf16 products are exact in fp32: same result).
    """
    same_16bit = features_dtype == bank_dtype and features_dtype in (torch.bfloat16, torch.float16)
    if same_16bit and not (INTERPRET and features_dtype == torch.bfloat16):
        return None
    if features_dtype == torch.float32 or bank_dtype == torch.float32:
        return _fp32_precision
    return "ieee"


@functools.cache
def _shared_memory_per_block(index: int) -> int | None:
    """What Triton's launcher lets one block of CUDA device ``index`` have, or None if unknown."""
    try:
        from triton.compiler.compiler import max_shared_mem  # the limit Triton checks launches against

        return int(max_shared_mem(index))
    except Exception:  # noqa: BLE001 - an internal helper of Triton's: without it, no refusal
        return None


def forward_config(
    mode: str, features: Tensor, bank: Tensor, precision: str | None, run: Callable[[tiles.TileConfig], None]
) -> tiles.TileConfig:
    """Tile sizes of a forward call: the interpreter's, the space's default, or the autotuned one."""
    dim = bank.shape[2]
    if INTERPRET:
        return tiles.interpreter_config(dim)
    candidates = tiles.space(mode, dim, sixteen_bit=precision is None)
    return tiles.choose(tiles.shape_class(mode, features, bank, precision), candidates, run)


def _on_device(tensor: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


class TritonBackend(Backend):
    name = "triton"

    def unsupported_reasons(self, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
        reasons = []
        if device.type == "cpu":
            if not INTERPRET:
                reasons.append(
                    "tensors are on cpu and Triton's interpreter is off (set TRITON_INTERPRET=1 before importing triton)"
                )
        elif device.type == "cuda":
            if not torch.cuda.is_available():
                reasons.append("no CUDA device")
            elif op in ("max_forward", "all_forward") and dtype in (torch.bfloat16, torch.float16):
                index = device.index if device.index is not None else torch.cuda.current_device()
                available = _shared_memory_per_block(index)
                if available is not None and available < SIXTEEN_BIT_FORWARD_SHARED_BYTES:
                    reasons.append(
                        f"the 16-bit forward's tiles need {SIXTEEN_BIT_FORWARD_SHARED_BYTES // 1024} KiB of shared "
                        f"memory per block, this GPU has {available // 1024} KiB"
                    )
        else:
            reasons.append(f"device type {device.type} is not supported (cuda, or cpu through Triton's interpreter)")
        if dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {str(dtype).removeprefix('torch.')} is not supported (float32, bfloat16, float16)")
        return reasons

    def auto_skip_reasons(self, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
        # Measured on an H200 (N=32768, K=19, M=4096, C=256): exact fp32 dots ran at 9.6 ms
        # against 5.4 ms for the torch backend's cuBLAS GEMMs; 16-bit and tf32 dots won.
        if op in ("max_forward", "all_forward") and dtype == torch.float32 and _fp32_precision == "ieee":
            return ["fp32 forward with ieee dots is slower than the torch backend's cuBLAS"]
        return []

    def max_forward(self, features, labels, bank, counts, ignore_index):
        values = torch.empty(labels.shape, dtype=torch.float32, device=labels.device)
        indices = torch.empty(labels.shape, dtype=torch.int64, device=labels.device)
        if labels.numel() == 0:
            return values, indices
        precision = dot_precision(features.dtype, bank.dtype)
        groups = group_by_class(labels, bank.shape[0])

        def run(config: tiles.TileConfig) -> None:
            max_similarity.launch_max_forward(features, bank, counts, groups, values, indices, config, precision)

        with _on_device(features):
            run(forward_config("max", features, bank, precision, run))
        return values, indices

    def max_backward(self, grad_values, features, labels, bank, values, indices):
        with _on_device(features):
            return backward.max_backward(grad_values, features, labels, bank, values, indices)

    def all_forward(self, features, labels, bank, counts, threshold, ignore_index):
        num_rows, dim = labels.numel(), bank.shape[2]
        count = torch.empty(num_rows, dtype=torch.int64, device=labels.device)
        ssum = torch.empty(num_rows, dtype=torch.float32, device=labels.device)
        dsum = torch.empty(num_rows, dim, dtype=torch.float32, device=labels.device)
        if num_rows == 0:
            return count, ssum, dsum
        precision = dot_precision(features.dtype, bank.dtype)
        groups = group_by_class(labels, bank.shape[0])

        def run(config: tiles.TileConfig) -> None:
            if not config.c_resident:
                dsum.zero_()  # the streamed regime accumulates into it (and autotuning repeats runs)
            thresholded_sum.launch_all_forward(
                features, bank, counts, threshold, groups, count, ssum, dsum, config, precision
            )

        with _on_device(features):
            run(forward_config("all", features, bank, precision, run))
        return count, ssum, dsum

    def all_backward(self, grad_ssum, features, ssum, dsum):
        with _on_device(features):
            return backward.all_backward(grad_ssum, features, ssum, dsum)

    def update(self, bank, counts, ptr, features, labels, order, denom, max_per_class, ignore_index):
        with _on_device(bank):
            ring_buffer.ring_buffer_update(bank, counts, ptr, features, labels, order, denom, max_per_class)
