"""Memory is the product: the chunked backend's extra memory must not grow with N x M.

Each case runs in a fresh subprocess and reads its peak resident memory during one forward +
backward beyond the resident memory before it (``bench.memprobe.PeakMeter``), so earlier tests
cannot hide or inflate the peak.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, sys
import torch
import cossim_fast
from bench.memprobe import PeakMeter
torch.set_num_threads(1)
backend, num_rows, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
num_classes, slots, dim = 19, 512, 64
bank = torch.nn.functional.normalize(torch.randn(num_classes, slots, dim), dim=2)
counts = torch.full((num_classes,), slots)
features = torch.randn(num_rows, dim, requires_grad=True)
labels = torch.randint(0, num_classes, (num_rows,))
# Warm up on a tiny input so one-time allocations (libraries, op registration) are not counted.
cossim_fast.cosine_similarity_loss(features[:8], labels[:8], bank, counts, 0.0, mode=mode, backend=backend).backward()
features.grad = None
# The peak from now on, beyond the resident memory now (VmHWM reset: an earlier peak, e.g. at
# import, whose pages have since been freed or evicted, cannot hide part of the call's).
meter = PeakMeter()
meter.start()
cossim_fast.cosine_similarity_loss(features, labels, bank, counts, 0.0, mode=mode, backend=backend).backward()
print(json.dumps({"extra_mib": meter.stop() / 2**20}))
"""

WORKSPACE_MIB = 16
ROOT = Path(__file__).resolve().parents[1]  # where `bench` is importable from


def script_extra_mib(script: str, *args: str) -> float:
    """The ``extra_mib`` a measuring script prints, run in a fresh interpreter (one thread, the
    test workspace, glibc returning freed tensors to the kernel as bench.memprobe's children do)."""
    from bench.memprobe import LIVE_TENSOR_MALLOC_ENV

    env = dict(os.environ, COSSIM_FAST_WORKSPACE_MB=str(WORKSPACE_MIB), OMP_NUM_THREADS="1", **LIVE_TENSOR_MALLOC_ENV)
    result = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["extra_mib"]


def extra_mib(backend: str, num_rows: int, mode: str) -> float:
    return script_extra_mib(SCRIPT, backend, str(num_rows), mode)


@pytest.mark.parametrize("mode", ["max", "all"])
def test_torch_backend_memory_is_bounded_by_its_workspace(mode):
    num_rows = 4096
    dense_mib = num_rows * 19 * 512 * 4 / 2**20  # one fp32 N x K*M matrix: 152 MiB
    reference = extra_mib("reference", num_rows, mode)
    chunked = extra_mib("torch", num_rows, mode)
    # Outputs and per-row state are O(N * C): 4096 x 64 fp32 rows are 1 MiB each.
    per_row_mib = 6 * num_rows * 64 * 4 / 2**20
    assert reference > dense_mib, f"the measurement should see the reference's {dense_mib:.0f} MiB matrix"
    assert chunked < 2 * WORKSPACE_MIB + per_row_mib, f"torch backend used {chunked:.1f} MiB beyond its inputs"
    assert chunked < 0.25 * reference


WORKSPACE_4MIB = 4 * 2**20


def _torch_forward_extra_bytes(monkeypatch, mode: str, dtype: str, num_rows: int, num_classes: int, slots: int, dim: int) -> int:
    """Peak bytes the torch backend's forward allocates beyond its outputs, op by op (allocation
    ledger), in a 4 MiB workspace; 16-bit rows and buckets are also copied to fp32 (counted too)."""
    import torch

    from allocation_ledger import AllocationLedger
    from cossim_fast.backends import rows, torch_chunked

    monkeypatch.setattr(rows, "WORKSPACE_BYTES", WORKSPACE_4MIB)
    monkeypatch.setattr(torch_chunked, "chunk_length", lambda size, budget=WORKSPACE_4MIB: rows.chunk_length(size, budget))
    gen = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(num_classes, slots, dim, generator=gen), dim=2).to(getattr(torch, dtype))
    counts = torch.full((num_classes,), slots)
    features = torch.randn(1, num_rows, dim, generator=gen).to(bank.dtype)
    labels = torch.arange(num_rows) % num_classes
    backend = torch_chunked.TorchBackend()
    with AllocationLedger() as ledger:
        if mode == "max":
            outputs = backend.max_forward(features, labels, bank, counts, 255)
        else:
            outputs = backend.all_forward(features, labels, bank, counts, 0.0, 255)
    return ledger.peak - sum(t.untyped_storage().nbytes() for t in outputs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["max", "all"])
def test_torch_backend_blocks_fit_the_workspace(mode, dtype, monkeypatch):
    """Counted op by op (allocation ledger): the peak of a forward stays within the workspace plus
    per-row state, whichever temporaries the mode keeps alive at once."""
    num_rows, dim = 8192, 16  # two classes: 4096 x 4096 pairs each, 64 MiB in fp32
    extra = _torch_forward_extra_bytes(monkeypatch, mode, dtype, num_rows, 2, 4096, dim)
    per_row_state = num_rows * (dim * 4 + 64)  # the rows of a chunk, grouping and index buffers
    assert extra <= WORKSPACE_4MIB + per_row_state, f"{extra / 2**20:.1f} MiB"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["max", "all"])
def test_torch_backend_wide_16bit_rows_fit_the_workspace(mode, dtype, monkeypatch):
    """Wide rows (C = 2048) against few slots: the rows' copies dominate, and 16-bit rows and
    buckets have a native and an fp32 copy each (5.7 MiB in a 4 MiB workspace before they counted)."""
    num_rows = 4096
    extra = _torch_forward_extra_bytes(monkeypatch, mode, dtype, num_rows, 2, 64, 2048)
    assert extra <= WORKSPACE_4MIB + num_rows * 64, f"{extra / 2**20:.2f} MiB"


# --- workspace per row of the fused backends (the Triton issue's "< 64 bytes per target row") ---

WORKSPACE_BYTES_PER_ROW = 64


def _fused_call_workspace(backend: str, op: str, num_rows: int) -> float:
    """Peak bytes per row that torch ops allocate in one call, beyond its inputs and outputs."""
    import torch

    from allocation_ledger import AllocationLedger
    from cossim_fast.backends import dispatch

    impl = dispatch.load_backend(backend)
    num_classes, slots, dim = 19, 64, 32
    gen = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(num_classes, slots, dim, generator=gen), dim=2)
    counts = torch.full((num_classes,), slots)
    features = torch.randn(1, num_rows, dim, generator=gen)
    labels = torch.randint(0, num_classes + 1, (num_rows,), generator=gen)
    labels[labels == num_classes] = 255
    values, indices = impl.max_forward(features, labels, bank, counts, 255)
    grad, denom, ptr = torch.ones(num_rows), torch.ones(num_rows), torch.zeros_like(counts)
    calls = {
        "max_forward": lambda: impl.max_forward(features, labels, bank, counts, 255),
        "all_forward": lambda: impl.all_forward(features, labels, bank, counts, 0.1, 255),
        "max_backward": lambda: impl.max_backward(grad, features, labels, bank, values, indices),
        "update": lambda: impl.update(bank, counts, ptr, features, labels, None, denom, -1, 255),
    }
    call = calls[op]
    call()  # warm-up: compiled kernels, caches
    with AllocationLedger() as ledger:
        outputs = call()
        kept = sum(t.untyped_storage().nbytes() for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor))
        assert ledger.peak >= kept
    return (ledger.peak - kept) / num_rows


@pytest.mark.parametrize("op", ["max_forward", "all_forward", "max_backward", "update"])
def test_triton_extra_memory_per_row(op):
    pytest.importorskip("triton")
    import cossim_fast

    if "triton" not in cossim_fast.available_backends("cpu"):
        pytest.skip("Triton's interpreter is off")
    per_row = _fused_call_workspace("triton", op, 6000)
    assert per_row < WORKSPACE_BYTES_PER_ROW, f"{op}: {per_row:.1f} bytes per row"


def test_triton_slot_splits_extra_memory_per_row(monkeypatch):
    # The largest split of the tile space: 4 int64 keys and a norm per row on top.
    pytest.importorskip("triton")
    import dataclasses

    import cossim_fast
    from cossim_fast.backends.triton import backend, tiles

    if "triton" not in cossim_fast.available_backends("cpu"):
        pytest.skip("Triton's interpreter is off")
    splits = max(config.slot_splits for config in tiles.space("max", 32, True))
    config = dataclasses.replace(tiles.interpreter_config(32), slot_splits=splits)
    monkeypatch.setattr(backend, "forward_config", lambda *args: config)
    per_row = _fused_call_workspace("triton", "max_forward", 6000)
    assert per_row < WORKSPACE_BYTES_PER_ROW, f"{splits} splits: {per_row:.1f} bytes per row"


CHECK_SCRIPT = r"""
import json, sys
import torch
from bench.memprobe import PeakMeter
from cossim_fast.contract.inputs import check_feature_values
torch.set_num_threads(1)
features = torch.randn(4, 64 * 2**20 // (4 * 256 * 4), 256).to(getattr(torch, sys.argv[1]))  # 64 MiB as fp32
check_feature_values(features[:, :8])  # warm-up
meter = PeakMeter()
meter.start()
check_feature_values(features)
print(json.dumps({"extra_mib": meter.stop() / 2**20}))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_value_checks_copy_nothing_of_the_features(dtype):
    # On by default, on every loss call and update: a float64 cast of the N x C features (inside
    # the reduction, where no allocation ledger sees it) doubled or quadrupled their memory.
    extra = script_extra_mib(CHECK_SCRIPT, dtype)
    assert extra < 8, f"the value check took {extra:.1f} MiB beyond 64 MiB of features"


UPDATE_SCRIPT = r"""
import json
import torch
import cossim_fast
from bench.memprobe import PeakMeter
torch.set_num_threads(1)
rows, dim = 131072, 256  # bf16 features of 64 MiB, as a B x C x H x W map
features = torch.randn(1, dim, 256, 512).to(torch.bfloat16)
labels = torch.randint(0, 19, (1, 256, 512))
dictionary = cossim_fast.FeatureDictionary(19, 64, dim, dtype=torch.bfloat16)
dictionary.update(features[..., :8, :8], labels[..., :8, :8])  # warm-up
meter = PeakMeter()
meter.start()
dictionary.update(features, labels, max_per_class=64, generator=torch.Generator().manual_seed(0))
print(json.dumps({"extra_mib": meter.stop() / 2**20}))
"""


def test_dictionary_update_of_16bit_features_stays_within_the_workspace():
    # The row norms in fp32 of 16-bit features: cast a chunk at a time on the CPU, not all of
    # them (measured before: 128 MiB beyond 64 MiB of bf16 features).
    extra = script_extra_mib(UPDATE_SCRIPT)
    per_row_mib = 131072 * 16 / 2**20  # the visiting order and the norms, and the backend's per-row state
    assert extra < WORKSPACE_MIB + per_row_mib + 8, f"{extra:.1f} MiB"


def test_value_checks_pass_finite_float64_whose_sum_overflows():
    import torch

    from cossim_fast.contract.inputs import check_feature_values

    check_feature_values(torch.full((3, 4), 1e308, dtype=torch.float64))


def test_allocation_ledger_sees_allocations_views_and_frees():
    import torch

    from allocation_ledger import AllocationLedger

    x = torch.zeros(1000)
    outside = torch.zeros(100_000)
    with AllocationLedger() as ledger:
        y = x * 2  # 4000 bytes
        view = y[::2]  # no new storage
        del y
        z = view + 1  # 2000 bytes; y's storage still held by the view
        assert ledger.live == 6000
        del view
        w = x.add_(1)  # in place: nothing new
        alias = outside.view(100, 1000)[1:]  # a view of memory that existed before: nothing new
        grown = torch.empty(10)  # 40 bytes, then grown in place to 4000
        grown.resize_(1000)
        assert ledger.live == 2000 + 4000
    assert ledger.peak == 6000 and w is x and z.numel() == 500 and alias.shape == (99, 1000)
