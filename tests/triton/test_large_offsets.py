"""Element offsets past 2**31: the kernels' int32 index products must not wrap (offsets.py).

The tensors are views into large ``torch.empty`` storages: gigabytes of address space of which
only the few pages the kernels touch become memory. CPU only (the interpreter); a GPU run would
need that memory for real.
"""

import pytest
import torch

from cossim_fast.backends.reference import ReferenceBackend
from cossim_fast.backends.triton import backend as triton_backend
from cossim_fast.backends.triton.backend import TritonBackend
from cossim_fast.backends.triton.offsets import needs_int64

pytestmark = pytest.mark.skipif(not triton_backend.INTERPRET, reason="address-space views: CPU through the interpreter")

TRITON, REFERENCE = TritonBackend(), ReferenceBackend()
IGNORE = 255
DIM = 256


def test_needs_int64_looks_at_each_product():
    assert not needs_int64(torch.empty(0, 5))
    rows = torch.empty(2**22, 1024, dtype=torch.uint8)[:, :512]  # row stride 1024: 2**32 - 1024 at the last row
    assert needs_int64(rows) and not needs_int64(rows, [1])  # the kernels' row offsets are int64 anyway
    assert not needs_int64(torch.empty(2**21, 1024, dtype=torch.uint8))  # 2**31 - 1024: int32 holds it


def _unit_rows(count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(count, DIM, generator=gen), dim=1)


def test_a_class_starting_past_2_31_elements():
    # A contiguous 3 x 2**22 x 256 fp16 bank (6 GiB of address space): class 2 starts at
    # element 2**31, where an int32 cls * stride_bk wraps.
    bank = torch.empty(3, 2**22, DIM, dtype=torch.float16)
    assert 2 * bank.stride(0) == 2**31
    counts = torch.tensor([3, 2, 5])
    for k in range(3):
        bank[k, : counts[k]] = _unit_rows(int(counts[k]), seed=k).half()
    small = torch.zeros(3, 5, DIM, dtype=torch.float16)
    small[:, :5] = bank[:, :5]
    labels = torch.tensor([2, 0, 2, 1, IGNORE, 2])
    features = (torch.randn(1, 6, DIM, generator=torch.Generator().manual_seed(9)) * 2).half()
    features[0, 0] = bank[2, 4] * 3  # row 0 points at class 2's slot 4

    values, indices = TRITON.max_forward(features, labels, bank, counts, IGNORE)
    want_values, want_indices = REFERENCE.max_forward(features, labels, small, counts, IGNORE)
    torch.testing.assert_close(values, want_values, atol=1e-4, rtol=0)
    assert torch.equal(indices, want_indices) and indices[0] == 4

    count, ssum, dsum = TRITON.all_forward(features, labels, bank, counts, -0.5, IGNORE)
    want = REFERENCE.all_forward(features, labels, small, counts, -0.5, IGNORE)
    assert torch.equal(count, want[0])
    torch.testing.assert_close(ssum, want[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(dsum, want[2], atol=1e-3, rtol=0)

    grad = torch.ones(6)
    torch.testing.assert_close(
        TRITON.max_backward(grad, features, labels, bank, values, indices).float(),
        REFERENCE.max_backward(grad, features, labels, small, want_values, want_indices).float(),
        atol=1e-3, rtol=1e-3,
    )


def test_a_channel_stride_past_2_31_elements():
    # N x C features with channel stride 10**7 (a column-major view; 5 GiB of address space):
    # channel 255 sits at element 2.55e9, where an int32 offs_c * stride_fc wraps.
    rows, stride = 5, 10**7
    storage = torch.empty((DIM - 1) * stride + rows, dtype=torch.float16)
    features = storage.as_strided((1, rows, DIM), (0, 1, stride))
    assert needs_int64(features, [2])
    features.copy_((torch.randn(1, rows, DIM, generator=torch.Generator().manual_seed(4)) * 2).half())
    dense = features.contiguous()
    labels = torch.tensor([0, 1, 0, IGNORE, 1])
    bank = torch.stack([_unit_rows(4, seed=1), _unit_rows(4, seed=2)]).half()
    counts = torch.tensor([4, 3])

    values, indices = TRITON.max_forward(features, labels, bank, counts, IGNORE)
    want_values, want_indices = REFERENCE.max_forward(dense, labels, bank, counts, IGNORE)
    torch.testing.assert_close(values, want_values, atol=1e-4, rtol=0)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(
        TRITON.max_backward(torch.ones(rows), features, labels, bank, values, indices).float(),
        REFERENCE.max_backward(torch.ones(rows), dense, labels, bank, want_values, want_indices).float(),
        atol=1e-3, rtol=1e-3,
    )

    updated, expected = bank.clone(), bank.clone()
    denom = torch.linalg.vector_norm(dense.float(), dim=2).reshape(-1)
    for backend, source, target in ((TRITON, features, updated), (REFERENCE, dense, expected)):
        backend.update(target, counts.clone(), torch.tensor([1, 2]), source, labels, None, denom, -1, IGNORE)
    assert torch.equal(updated, expected)
