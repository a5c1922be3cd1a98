"""Inputs, tolerances and comparisons shared by the Triton tests (interpreter on CPU, or CUDA)."""

from __future__ import annotations

import torch

from cossim_fast.backends.reference import ReferenceBackend, dense_similarity
from cossim_fast.backends.triton import backend as triton_backend

IGNORE = 255
DEVICES = (["cpu"] if triton_backend.INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

#: Tolerances per feature dtype. Similarities are fp32 accumulations of the same (exact) products
#: in both backends, so only summation order and where the norm is applied differ ("sim": values,
#: ssum, and the near-tie margin for indices; "dsum": sums of up to M unit vectors). Gradients
#: are rounded to the feature dtype: "grad" is (rtol, atol), about one ulp of that dtype.
TOLERANCES = {
    torch.float32: {"sim": 1e-5, "dsum": 1e-4, "grad": (1e-5, 1e-6)},
    torch.bfloat16: {"sim": 1e-5, "dsum": 1e-4, "grad": (8e-3, 1e-5)},
    torch.float16: {"sim": 1e-5, "dsum": 1e-4, "grad": (1e-3, 1e-5)},
}

def make_case(num_classes, slots, dim, counts, num_rows, *, dtype, device, images=1, labels=None, seed=0):
    """Unit-norm bank and ``(B, P, C)`` features; with ``images > 1`` the features are the strided
    view of a ``B x C x H x W`` map, as the contract layer passes it."""
    gen = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(num_classes, slots, dim, generator=gen), dim=2)
    points = num_rows // images
    maps = torch.randn(images, dim, points, generator=gen) * 3
    if labels is None:
        labels = torch.randint(0, num_classes, (images * points,), generator=gen)
        labels[torch.rand(images * points, generator=gen) < 0.1] = IGNORE
    features = maps.to(device=device, dtype=dtype).transpose(1, 2)  # (B, P, C), channel stride P
    counts = torch.as_tensor(counts, dtype=torch.int64, device=device)
    return features, labels.to(device), bank.to(device=device, dtype=dtype), counts


#: fp32 inputs by dot precision (the Triton backend's choice): tf32x3 is about as exact as fp32;
#: tf32 rounds the operands to 10 mantissa bits (about 1e-3 on a cosine).
FP32_PRECISION_TOLERANCES = {
    "ieee": TOLERANCES[torch.float32],
    "tf32x3": TOLERANCES[torch.float32],
    "tf32": {"sim": 2e-3, "dsum": 1e-4, "grad": (1e-5, 1e-6)},
}


def assert_same_max(features, labels, bank, counts, got, want, dtype, tolerances=None):
    """Values within tolerance (``tolerances``, default the dtype's); indices exact unless the
    reference's top two are within it."""
    (values, indices), (ref_values, ref_indices) = got, want
    tol = (tolerances or TOLERANCES[dtype])["sim"]
    torch.testing.assert_close(values, ref_values, atol=tol, rtol=0)
    sim = dense_similarity(features, labels, bank, counts, IGNORE)
    top = sim.topk(2, dim=1).values
    clear = (top[:, 0] - top[:, 1] > tol) | (top[:, 1] == float("-inf"))
    assert torch.equal(indices[clear], ref_indices[clear])
    near = ~clear
    slots = bank.shape[1]
    picked = sim[near, labels[near] * slots + indices[near]]
    torch.testing.assert_close(picked, top[near, 0], atol=tol, rtol=0)


def assert_same_all(features, labels, bank, counts, got, dtype, threshold=0.05, tolerances=None):
    """Equal counts and sums within tolerance on rows with no similarity near the threshold."""
    count, ssum, dsum = got
    ref_count, ref_ssum, ref_dsum = ReferenceBackend().all_forward(features, labels, bank, counts, threshold, IGNORE)
    tol = tolerances or TOLERANCES[dtype]
    sim = dense_similarity(features, labels, bank, counts, IGNORE)
    sure = ((sim - threshold).abs() > tol["sim"]).all(dim=1)
    assert sure.float().mean() > 0.5
    assert torch.equal(count[sure], ref_count[sure])
    torch.testing.assert_close(ssum[sure], ref_ssum[sure], atol=tol["sim"] * bank.shape[1], rtol=0)
    torch.testing.assert_close(dsum[sure], ref_dsum[sure], atol=tol["dsum"], rtol=0)
