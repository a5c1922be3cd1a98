"""The numeric conventions every backend shares (METHOD.md 3 and 5)."""

from __future__ import annotations

import torch

#: The norm floor: a row is divided by ``max(||f||, EPS)``.
EPS = 1e-12


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 features; fp64 stays fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
