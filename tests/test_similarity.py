"""Every available backend against the reference: max cosine similarity, values and gradients."""

import pytest
import torch

import cossim_fast
from cases import DTYPES, IGNORE, assert_close_gradient, assert_same_max, fused_backends, make_bank, make_rows

BACKENDS = fused_backends("cpu")

# (N, K, M, C, counts): odd sizes, K = 1, empty and partially filled buckets, M of 1.
SHAPES = [
    (37, 5, 13, 17, [13, 0, 6, 1, 13]),
    (1, 1, 3, 5, [2]),
    (53, 1, 29, 33, [29]),
    (64, 4, 1, 3, [1, 1, 0, 1]),
    (129, 19, 9, 70, None),
]


def _reference(features, labels, bank, counts):
    return cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(backend, dtype, shape):
    num_rows, num_classes, slots, dim, counts = shape
    bank, counts = make_bank(num_classes, slots, dim, counts=counts, dtype=dtype)
    features, labels = make_rows(num_rows, dim, num_classes, dtype=dtype)
    values, indices = cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend=backend)
    ref_values, ref_indices = _reference(features, labels, bank, counts)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert_same_max(features, labels, bank, counts, values, indices, ref_values, ref_indices, dtype)
    empty = (labels == IGNORE) | (counts[labels.clamp(max=num_classes - 1)] == 0)
    assert torch.isneginf(values[empty]).all() and (indices[empty] == -1).all()
    assert (indices[~empty] >= 0).all() and (indices[~empty] < counts[labels[~empty]]).all()


def dyadic_bank(num_classes: int, slots: int) -> torch.Tensor:
    """Unit rows with entries in {0, +-0.5}: every dot product with them is exact in any
    summation order, so equal entries give exactly tied similarities whatever the GEMM does."""
    base = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 0.0])
    rows = [base[torch.randperm(6)] * torch.where(torch.rand(6) < 0.5, -1.0, 1.0) for _ in range(num_classes * slots)]
    return torch.stack(rows).reshape(num_classes, slots, 6)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_pick_the_lowest_slot(backend, dtype):
    bank = dyadic_bank(2, 11)
    bank[0, 3] = bank[0, 8] = bank[0, 10]  # three identical entries
    bank[1, 2] = bank[1, 5]
    counts = torch.tensor([11, 7])
    features = torch.stack([bank[0, 8] * 2.5, bank[1, 5] * 0.5, bank[0, 8]]).to(dtype)
    labels = torch.tensor([0, 1, 0])
    values, indices = cossim_fast.max_cosine_similarity(features, labels, bank.to(dtype), counts, backend=backend)
    assert indices.tolist() == [3, 2, 3]
    torch.testing.assert_close(values, torch.ones(3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_slots_beyond_counts_are_never_picked(backend):
    bank, counts = make_bank(1, 8, 4, counts=[3])
    features = bank[0, 6:7].clone()  # identical to an invalid slot
    values, indices = cossim_fast.max_cosine_similarity(features, torch.zeros(1, dtype=torch.long), bank, counts, backend=backend)
    assert 0 <= indices.item() < 3 and values.item() < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_and_labels_out_of_range_with_checks_off(backend):
    # check_values=False skips the value checks; no backend may then read outside a bucket:
    # counts are clamped to [0, M], labels that are no class select nothing (as the reference).
    bank, _ = make_bank(3, 4, 8, counts=[4, 4, 4])
    counts = torch.tensor([-2, 9, 3])
    features, labels = torch.randn(30, 8), torch.arange(30) % 3
    labels[::7], labels[1::11] = 7, -1
    for mode in ("max", "all"):
        expected, actual = (
            cossim_fast.cosine_similarity_loss(features, labels, bank, counts, -1.0, mode=mode, backend=name, check_values=False)
            for name in ("reference", backend)
        )
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    expected = cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend="reference", check_values=False)
    actual = cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend=backend, check_values=False)
    assert torch.equal(actual[1], expected[1]) and (actual[1] < 4).all()
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_empty_and_all_ignored_inputs(backend):
    bank, counts = make_bank(3, 5, 4, counts=[5, 5, 5])
    values, indices = cossim_fast.max_cosine_similarity(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), bank, counts, backend=backend)
    assert values.shape == (0,) and indices.shape == (0,)
    features = torch.randn(6, 4, requires_grad=True)
    labels = torch.full((6,), IGNORE)
    values, indices = cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend=backend)
    assert torch.isneginf(values).all() and (indices == -1).all()
    loss = cossim_fast.cosine_similarity_loss(features, labels, bank, counts, 0.0, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(features.grad, torch.zeros_like(features))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_feature_maps_in_any_layout(backend, layout):
    batch, dim, height, width, num_classes = 2, 7, 5, 3, 4
    bank, counts = make_bank(num_classes, 9, dim, counts=[9, 4, 0, 9])
    maps = torch.randn(batch, dim, height, width * 2)[..., ::2] if layout == "strided" else torch.randn(batch, dim, height, width)
    if layout == "channels_last":
        maps = maps.to(memory_format=torch.channels_last)
    maps.requires_grad_(True)
    labels = torch.randint(0, num_classes, (batch, height, width))
    values, indices = cossim_fast.max_cosine_similarity(maps, labels, bank, counts, backend=backend)
    assert values.shape == (batch, height, width)
    rows = maps.detach().permute(0, 2, 3, 1).reshape(-1, dim)
    ref_values, ref_indices = cossim_fast.max_cosine_similarity(rows, labels.reshape(-1), bank, counts, backend="reference")
    assert_same_max(rows, labels.reshape(-1), bank, counts, values.reshape(-1), indices.reshape(-1), ref_values, ref_indices, torch.float32)
    grad_out = torch.randn_like(values)
    (grad,) = torch.autograd.grad(torch.where(indices >= 0, values, 0).mul(grad_out).sum(), maps)
    rows.requires_grad_(True)
    ref_values, _ = cossim_fast.max_cosine_similarity(rows, labels.reshape(-1), bank, counts, backend="reference")
    (ref_grad,) = torch.autograd.grad(torch.where(ref_values > -1e30, ref_values, 0).mul(grad_out.reshape(-1)).sum(), rows)
    torch.testing.assert_close(grad, ref_grad.reshape(batch, height, width, dim).permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)


def test_reference_gradcheck_float64():
    bank, counts = make_bank(3, 6, 5, counts=[6, 2, 0], dtype=torch.float64)
    features = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, IGNORE, 0, 0, 1])

    def finite_values(x):
        values, _ = cossim_fast.max_cosine_similarity(x, labels, bank, counts, backend="reference")
        return torch.where(torch.isfinite(values), values, 0)

    assert torch.autograd.gradcheck(finite_values, (features,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_reference(backend, dtype):
    bank, counts = make_bank(4, 15, 19, counts=[15, 3, 0, 8])
    features, labels = make_rows(41, 19, 4, dtype=dtype)
    grad_out = torch.randn(41)

    def gradient(name):
        x = features.clone().requires_grad_(True)
        values, _ = cossim_fast.max_cosine_similarity(x, labels, bank, counts, backend=name)
        (torch.where(torch.isfinite(values), values, 0) * grad_out).sum().backward()
        return x.grad

    grad = gradient(backend)
    assert grad.dtype == dtype
    assert_close_gradient(grad, gradient("reference"), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_labels(backend):
    # One column of an (N, 2) label table: a strided 1-D view, as slicing gives it.
    features, labels = make_rows(45, 9, 3)
    bank, counts = make_bank(3, 11, 9, counts=[11, 0, 6])
    strided = torch.stack([labels, torch.zeros_like(labels)], dim=1)[:, 0]
    assert not strided.is_contiguous()
    values, indices = cossim_fast.max_cosine_similarity(features, strided, bank, counts, backend=backend)
    ref_values, ref_indices = _reference(features, labels, bank, counts)
    assert_same_max(features, labels, bank, counts, values, indices, ref_values, ref_indices, torch.float32)
    loss = cossim_fast.cosine_similarity_loss(features, strided, bank, counts, 0.05, mode="all", backend=backend)
    ref = cossim_fast.cosine_similarity_loss(features, labels, bank, counts, 0.05, mode="all", backend="reference")
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)


# Triton's interpreter (numpy) warns about the overflowing square and -inf * 0 in the untaken branch.
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_row_whose_norm_overflows_fp32(backend):
    # ||f||^2 overflows fp32 (inv_norm becomes 0): the value checks refuse such rows (test_errors);
    # without them an empty bucket must still give -inf, never NaN.
    bank, counts = make_bank(2, 6, 16, counts=[0, 6])
    features = torch.randn(3, 16) * 1e20
    labels = torch.tensor([0, 1, IGNORE])
    values, indices = cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend=backend, check_values=False)
    assert torch.isneginf(values[0]) and indices[0] == -1
    assert torch.isneginf(values[2]) and indices[2] == -1
    assert not torch.isnan(values).any()
