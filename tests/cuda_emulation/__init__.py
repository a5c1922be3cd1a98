"""The CUDA backend's kernels on the CPU, through an emulation of the CUDA execution model
(cuda_emulation.h says what it checks and what it cannot).

``EmulatedCudaBackend()`` compiles ``emulated_kernels.cpp`` -- the kernel source of the GPU build,
csrc/cuda/*_kernels.cuh, with the CUDA headers replaced by the emulation -- with
the host C++ compiler (once per torch version; later runs reuse the build) and returns a
CudaBackend whose ops are the emulated kernels, on CPU tensors. Passing tests here say the
kernels' logic is right; they say nothing about speed, and do not replace a run on a GPU.

The build lives under torch's extension root (``TORCH_EXTENSIONS_DIR``, by default
~/.cache/torch_extensions). A build that was killed can leave a ``lock`` file there that makes
the next one wait forever: delete it.
"""

from __future__ import annotations

import os
import re
import shutil
from types import ModuleType

import pytest
import torch
from torch.utils import cpp_extension

from cossim_fast.backends.base import OPERATIONS
from cossim_fast.backends.cuda import CudaBackend

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")
NAME = "cossim_fast_cuda_emulation"
FLAGS = ["-O2", "-ffp-contract=off", "-DCOSSIM_FAST_CUDA_EMULATION"]
#: Set to 1 to build with AddressSanitizer, which reports the kernels' out-of-bounds reads and
#: writes of global and shared memory, and UBSan's alignment check (a misaligned 16-byte vector
#: access faults on a GPU). The process must preload the ASan runtime (LD_PRELOAD);
#: test_cuda_emulation.py runs the kernel tests that way in a subprocess.
ASAN_ENV = "COSSIM_FAST_EMULATION_ASAN"
ASAN_FLAGS = ["-fsanitize=address,alignment", "-fno-sanitize-recover=alignment", "-fno-omit-frame-pointer"]

_built: ModuleType | None = None


def module() -> ModuleType:
    """The compiled emulation; skips the calling test where there is no C++ compiler or ninja
    (a build that fails is an error, not a skip)."""
    global _built
    if _built is None:
        for tool in (os.environ.get("CXX", "c++"), "ninja"):
            if shutil.which(tool) is None:
                pytest.skip(f"the CUDA emulation is built with {tool}, which is not on PATH")
        asan = os.environ.get(ASAN_ENV) == "1"
        name = NAME + ("_asan" if asan else "")
        version = re.sub(r"[^0-9A-Za-z.]", "_", torch.__version__)
        build = os.path.join(cpp_extension.get_default_build_root(), f"{name}-torch{version}")
        os.makedirs(build, exist_ok=True)
        _built = cpp_extension.load(
            name=name,
            sources=[os.path.join(HERE, "emulated_kernels.cpp")],
            extra_include_paths=[CSRC, HERE],
            extra_cflags=FLAGS + (ASAN_FLAGS if asan else []),
            extra_ldflags=ASAN_FLAGS if asan else [],
            build_directory=build,
        )
    return _built


class EmulatedCudaBackend(CudaBackend):
    """The CUDA backend with its ops (forward, backward, update) replaced by the emulated kernels."""

    def __init__(self) -> None:
        self.ops = module()

    def unsupported_reasons(self, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
        if device.type != "cpu":
            return [f"the CUDA emulation runs on cpu tensors, got {device.type}"]
        return [] if op in OPERATIONS else [f"unknown operation {op!r}"]
