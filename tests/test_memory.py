"""Memory is the product: the chunked backend's extra memory must not grow with N x M.

Each case runs in a fresh subprocess and reads its peak resident memory before and after one
forward + backward, so earlier tests cannot hide or inflate the peak.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, sys
import torch
import cossim_fast
torch.set_num_threads(1)
backend, num_rows, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
num_classes, slots, dim = 19, 512, 64
bank = torch.nn.functional.normalize(torch.randn(num_classes, slots, dim), dim=2)
counts = torch.full((num_classes,), slots)
features = torch.randn(num_rows, dim, requires_grad=True)
labels = torch.randint(0, num_classes, (num_rows,))
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
# Warm up on a tiny input so one-time allocations (libraries, op registration) are not counted.
cossim_fast.cosine_similarity_loss(features[:8], labels[:8], bank, counts, 0.0, mode=mode, backend=backend).backward()
features.grad = None
before = peak_mib()
cossim_fast.cosine_similarity_loss(features, labels, bank, counts, 0.0, mode=mode, backend=backend).backward()
print(json.dumps({"extra_mib": peak_mib() - before}))
"""

WORKSPACE_MIB = 16


def extra_mib(backend: str, num_rows: int, mode: str) -> float:
    env = dict(os.environ, COSSIM_FAST_WORKSPACE_MB=str(WORKSPACE_MIB), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, backend, str(num_rows), mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["extra_mib"]


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
