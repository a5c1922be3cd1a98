"""Shared test setup.

Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before triton is first imported: hence here, at the top of the first conftest.
"""

import os
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cossim_fast.backends import dispatch  # noqa: E402
from cossim_fast.backends.cuda import CudaBackend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclass(frozen=True)
class CudaTarget:
    """Where the CUDA backend's kernels run in a test: the compiled ops on a GPU, or the same
    kernel source compiled for the CPU emulation of tests/cuda_emulation (their logic only)."""

    backend: CudaBackend
    device: str


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def cuda_target(request) -> CudaTarget:
    if request.param == "cuda":
        return CudaTarget(CudaBackend(), "cuda")
    from cuda_emulation import EmulatedCudaBackend

    return CudaTarget(EmulatedCudaBackend(), "cpu")


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch):
    """Seed, and undo any backend pin or strict mode a test sets (order-independent tests)."""
    torch.manual_seed(0)
    monkeypatch.delenv("COSSIM_FAST_BACKEND", raising=False)
    strict = dispatch.is_strict()
    yield
    dispatch.set_strict(strict)
    dispatch._warned.clear()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
