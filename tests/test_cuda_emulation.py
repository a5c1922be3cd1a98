"""The CPU emulation of the CUDA execution model (tests/cuda_emulation) that runs the CUDA
backend's kernels in tests/test_cuda_backend.py without a GPU: what it computes for the
primitives the kernels use, and that it reports each kind of misuse instead of running it."""

from __future__ import annotations

import pytest
import torch

from cuda_emulation import module


def test_warp_shuffle_butterfly_sums_each_warp():
    values = torch.randn(96)
    got = module().warp_sum(values)
    want = values.reshape(3, 32).sum(dim=1).repeat_interleave(32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got[:32], got[32:64])  # each warp its own sum


def test_syncthreads_or_reduces_over_the_block():
    flags = torch.zeros(64, dtype=torch.int64)
    assert module().sync_or(flags).tolist() == [0, 1] * 64
    flags[37] = 1  # one thread of the second warp
    assert module().sync_or(flags).tolist() == [1, 1] * 64
    assert module().sync_or(torch.ones(64, dtype=torch.int64)).tolist() == [1, 0] * 64


def test_wmma_row_and_col_major_operands():
    a = torch.randn(16, 16).half()
    b = torch.randn(16, 16).half()
    got = module().wmma_matmul(a, b.t().contiguous())  # col-major b: element (k, n) at bt[n, k]
    torch.testing.assert_close(got, a.float() @ b.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "which, message",
    [
        (0, r"threads wait at different __syncthreads \(lines \d+ and \d+\)"),
        (1, r"warp 0: a warp-wide operation \(line \d+\) reached by 16 live lanes of 32"),
        (2, r"__syncthreads at line \d+ after 1 threads of the block exited"),
        (3, r"load_matrix_sync: pointer not 32-byte aligned"),
        (4, r"load_matrix_sync: lanes passed different pointers or ldm"),
        (5, r"__trap\(\) at line \d+"),
        (6, r"deadlock: 48 of 64 live threads wait at __syncthreads"),
    ],
    ids=["divergent-syncthreads", "partial-warp-shuffle", "barrier-after-exit", "misaligned-wmma",
         "non-uniform-wmma", "trap", "deadlock"],
)
def test_misuse_is_reported(which, message):
    with pytest.raises(RuntimeError, match="CUDA emulation: " + message):
        module().misuse(which)
    module().warp_sum(torch.ones(32))  # the emulation is usable after a failed launch
