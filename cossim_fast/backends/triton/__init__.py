"""The "triton" backend: fused Triton kernels (GPU, or CPU through Triton's interpreter).

Importing this package raises ImportError when triton is not installed; the dispatcher records
that as the reason the backend is unavailable.
"""

from cossim_fast.backends.triton.backend import (
    TritonBackend,
    fp32_precision,
    set_fp32_precision,
)
from cossim_fast.backends.triton.tiles import autotune_choices, set_autotune

__all__ = ["TritonBackend", "autotune_choices", "fp32_precision", "set_autotune", "set_fp32_precision"]
