"""The CPU emulation of the CUDA execution model (tests/cuda_emulation) that runs the CUDA
backend's kernels in tests/test_cuda_backend.py without a GPU: what it computes for the
primitives the kernels use, that it reports each kind of misuse instead of running it, and the
kernels' tests once more under AddressSanitizer (out-of-bounds global and shared memory)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cuda_emulation import ASAN_ENV, module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_thread_order_exposes_a_race():
    """A read of a neighbour's shared slot without the barrier after its write: in index order
    each thread reads the slot before the neighbour writes it, reversed after."""
    try:
        module().set_schedule(0)
        in_order = module().racy().tolist()
        module().set_schedule(1)
        reversed_order = module().racy().tolist()
    finally:
        module().set_schedule(0)
    assert in_order == [-1] * 63 + [0]
    assert reversed_order == list(range(1, 64)) + [-1]


def test_random_schedules_let_a_warp_run_ahead():
    """A flag the first warp sets after two shuffles, read by the second warp with no barrier
    between: rounds in index order never show it set, random schedules do (in some seeds)."""
    seen = set()
    try:
        for seed in range(8):
            module().set_schedule(seed)
            seen.update(module().overtaking_race()[32:].tolist())
            if seed == 1:
                assert seen == {0}  # rounds: every thread stops at its first shuffle or read
    finally:
        module().set_schedule(0)
    assert seen == {0, 1}


def test_async_copies_land_when_their_group_is_retired():
    """cp.async: a read before the wait that retires the copy's group sees the old bytes (the
    poison, -1) in index order; in schedule 1 every copy lands at once; zfill writes zeros."""
    values = torch.arange(1, 129, dtype=torch.int32)
    first, last = values[0::4], values[3::4]
    zero_filled = torch.arange(32) % 2 == 1
    try:
        module().set_schedule(0)
        deferred = module().async_copy(values)
        module().set_schedule(1)
        at_once = module().async_copy(values)
    finally:
        module().set_schedule(0)
    assert (deferred[:, 0] == -1).all() and (deferred[:, 1] == -1).all()  # committed, not retired
    for out in (deferred, at_once):
        assert torch.equal(out[:, 2], first)
        assert torch.equal(out[:, 3], torch.where(zero_filled, 0, last))
    assert torch.equal(at_once[:, 0], first)


SITE = r"self_checks\.h:\d+"


@pytest.mark.parametrize(
    "which, message",
    [
        (0, rf"threads wait at different __syncthreads or block collectives \({SITE} and {SITE}\)"),
        (1, rf"warp 0: a warp-wide operation \({SITE}\) reached by 16 live lanes of 32"),
        (2, rf"__syncthreads at {SITE} after 1 threads of the block exited"),
        (3, r"load_matrix_sync: pointer not 32-byte aligned"),
        (4, r"load_matrix_sync: lanes passed different pointers or ldm"),
        (5, rf"__trap\(\) at {SITE}"),
        (6, r"deadlock: 48 of 64 live threads wait at __syncthreads"),
        (7, rf"cub TempStorage reused at {SITE} without a __syncthreads since its last collective"),
        (8, r"BlockReduce for 128 threads in a block of 64"),
        (9, r"mma_sync: a tf32 operand was not converted with __float_to_tf32"),
        (10, r"__pipeline_memcpy_async: pointer not aligned to the copy size"),
        (11, r"__pipeline_memcpy_async: the destination is not shared memory"),
        (12, r"a thread exited with cp.async copies that no __pipeline_wait_prior retired"),
    ],
    ids=["divergent-syncthreads", "partial-warp-shuffle", "barrier-after-exit", "misaligned-wmma",
         "non-uniform-wmma", "trap", "deadlock", "cub-storage-reuse", "cub-block-size", "tf32-unconverted",
         "misaligned-cp-async", "cp-async-to-global", "cp-async-never-waited"],
)
def test_misuse_is_reported(which, message):
    with pytest.raises(RuntimeError, match="CUDA emulation: " + message):
        module().misuse(which)
    module().warp_sum(torch.ones(32))  # the emulation is usable after a failed launch


def test_launch_limits_are_checked():
    module().launch_threads(1024)
    for threads in (0, 1025):
        with pytest.raises(ValueError, match=f"invalid launch configuration: grid \\(1, 1, 1\\), {threads} threads"):
            module().launch_threads(threads)


def test_shared_memory_starts_as_garbage():
    """Poisoned before each block (NaN for floats), as a GPU leaves it undefined."""
    assert torch.isnan(torch.tensor(module().read_unwritten_shared()))


def _asan_runtime() -> str | None:
    """The AddressSanitizer runtime of the C++ compiler that builds the emulation, if it has one."""
    try:
        found = subprocess.run(
            [os.environ.get("CXX", "c++"), "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return found if os.path.isabs(found) and os.path.exists(found) else None


def _run_under_asan(runtime: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LD_PRELOAD": runtime, "ASAN_OPTIONS": "detect_leaks=0", ASAN_ENV: "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def _probe(call: str) -> str:
    return f"import sys, torch; sys.path.insert(0, 'tests'); from cuda_emulation import module; module().{call}"


@pytest.mark.slow
def test_kernels_under_address_sanitizer():
    runtime = _asan_runtime()
    if runtime is None:
        pytest.skip("the C++ compiler has no AddressSanitizer runtime (libasan.so)")
    # It sees an out-of-bounds read of a tensor and of a kernel's __shared__ array, and a
    # misaligned vector load...
    for call, report in [("read_past_end(torch.zeros(10))", "AddressSanitizer: heap-buffer-overflow"),
                         ("read_shared_past_end(48)", "AddressSanitizer: global-buffer-overflow"),
                         ("read_misaligned_vector()", "runtime error: member access within misaligned address")]:
        probe = _run_under_asan(runtime, "-c", _probe(call))
        assert probe.returncode != 0 and report in probe.stderr, probe.stderr[-3000:]
    # ... and none in the kernels' tests (-s: its report goes to stderr before it aborts). Triton
    # does not load with the ASan runtime preloaded: the tests that import it are left out. So
    # are the reruns in other thread orders and the repeat runs: they touch the same addresses,
    # and were half of this test's 8 minutes.
    run = _run_under_asan(runtime, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_cuda_backend.py",
                          "tests/test_extension.py", "-k",
                          "emulated and not triton and not public_api and not any_thread_order and not two_runs")
    tail = run.stdout[-3000:] + run.stderr[-5000:]
    assert run.returncode == 0 and "AddressSanitizer" not in run.stderr and "runtime error" not in run.stderr, tail
    assert " passed" in run.stdout and " failed" not in run.stdout, tail
