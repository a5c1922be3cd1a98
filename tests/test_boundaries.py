"""Inputs on the edges the contract names: a similarity equal to the threshold (strict >), a
feature row of zeros (its norm is clamped to eps), and 16-bit rows normalized in fp32."""

import pytest
import torch

import cossim_fast
from cases import DTYPES, IGNORE, fused_backends

BACKENDS = ["reference", *fused_backends("cpu")]


def _threshold_case(dtype):
    # Class 0 holds one unit slot (.5, .5, .5, .5, 0, 0). Row 0 = e0 meets it at exactly 0.5 in
    # every dtype and summation order; row 1 at 1.5 / sqrt(3), above it.
    bank = torch.zeros(2, 3, 6)
    bank[0, 0, :4] = 0.5
    counts = torch.tensor([1, 0])
    features = torch.zeros(3, 6)
    features[0, 0] = 1.0
    features[1, :3] = 1.0
    labels = torch.tensor([0, 0, IGNORE])
    return features.to(dtype), labels, bank.to(dtype), counts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["max", "all"])
def test_a_similarity_equal_to_the_threshold_is_not_selected(mode, backend, dtype):
    features, labels, bank, counts = _threshold_case(dtype)
    loss = cossim_fast.cosine_similarity_loss(features, labels, bank, counts, 0.5, mode=mode, backend=backend)
    above = 1.5 / 3**0.5  # only row 1's term: 1 - 0.866
    torch.testing.assert_close(loss.float(), torch.tensor(1 - above), atol=2e-3, rtol=0)
    class_mean = cossim_fast.cosine_similarity_loss(
        features, labels, bank, counts, 0.5, mode=mode, backend=backend, reduction="class_mean"
    )
    torch.testing.assert_close(class_mean.float(), torch.tensor(1 - above), atol=2e-3, rtol=0)


@pytest.mark.parametrize("tau", [0.1, 0.3, 0.7])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["max", "all"])
def test_a_float32_similarity_is_compared_with_tau_itself_not_its_rounding(mode, backend, tau):
    # S = float32(tau) exactly (e0 against a slot whose first entry is float32(tau)). float32(0.1)
    # and float32(0.3) lie above tau: selected by the strict test. float32(0.7) lies below: not.
    s = float(torch.tensor(tau, dtype=torch.float32))
    bank = torch.zeros(1, 1, 2)
    bank[0, 0, 0], bank[0, 0, 1] = s, (1 - s * s) ** 0.5
    features, labels, counts = torch.tensor([[1.0, 0.0]]), torch.tensor([0]), torch.tensor([1])
    values, _ = cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend=backend)
    assert values.item() == s
    loss = cossim_fast.cosine_similarity_loss(features, labels, bank, counts, tau, mode=mode, backend=backend)
    expected = 1 - s if s > tau else 0.0
    torch.testing.assert_close(loss, torch.tensor(expected), atol=1e-7, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["max", "all"])
def test_a_row_of_zeros_has_similarity_zero_and_a_finite_gradient(mode, backend):
    # f / max(||f||, eps) is 0 for a zero row: every similarity 0, the lowest slot wins the tie.
    gen = torch.Generator().manual_seed(5)
    bank = torch.nn.functional.normalize(torch.randn(2, 4, 8, generator=gen), dim=2)
    counts = torch.tensor([4, 3])
    features = torch.randn(5, 8, generator=gen)
    features[2] = 0.0
    labels = torch.tensor([0, 1, 0, 1, 0])
    values, indices = cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend=backend)
    assert values[2] == 0.0 and indices[2] == 0
    features.requires_grad_(True)
    loss = cossim_fast.cosine_similarity_loss(features, labels, bank, counts, -0.5, mode=mode, backend=backend)
    (grad,) = torch.autograd.grad(loss, features)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    reference = features.detach().clone().requires_grad_(True)
    expected_loss = cossim_fast.cosine_similarity_loss(reference, labels, bank, counts, -0.5, mode=mode, backend="reference")
    (expected,) = torch.autograd.grad(expected_loss, reference)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)  # a zero row's is d / eps: about 1e12


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_zero_source_row_is_stored_as_zeros(dtype):
    dictionary = cossim_fast.FeatureDictionary(2, 3, 8, dtype=dtype)
    features = torch.randn(3, 8).to(dtype)
    features[1] = 0.0
    dictionary.update(features, torch.tensor([0, 0, 1]))
    assert torch.isfinite(dictionary.bank.float()).all()
    assert torch.count_nonzero(dictionary.bank[0, 1]) == 0 and torch.count_nonzero(dictionary.bank[0, 0]) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_source_rows_are_normalized_in_fp32(dtype):
    # METHOD.md 5's division in fp32 with the fp32 norm of the rows, then one rounding: a norm
    # taken in the 16-bit dtype would round twice and store other bits.
    features = (torch.randn(64, 40, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    dictionary = cossim_fast.FeatureDictionary(1, 64, 40, dtype=dtype)
    dictionary.update(features, torch.zeros(64, dtype=torch.long), backend="torch")
    exact = features.float()
    expected = (exact / torch.linalg.vector_norm(exact, dim=1, keepdim=True).clamp_min(1e-12)).to(dtype)
    assert torch.equal(dictionary.bank[0], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_norm_floor_is_1e_12(backend):
    # A row of norm 1e-9 is above the floor: normalized fully, it meets its parallel slot at 1.
    # A zero row is below it: its gradient is d / eps (METHOD.md 3 with f^ = 0).
    bank = torch.zeros(1, 2, 4)
    bank[0, 0, 0], bank[0, 1, 1] = 1.0, 1.0
    features = torch.tensor([[1e-9, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    labels, counts = torch.tensor([0, 0]), torch.tensor([2])
    values, indices = cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend=backend)
    torch.testing.assert_close(values[0], torch.tensor(1.0), atol=1e-6, rtol=0)
    assert indices.tolist() == [0, 0]
    (grad,) = torch.autograd.grad(values[1], features)
    torch.testing.assert_close(grad[1], bank[0, 0] / 1e-12, rtol=1e-6, atol=0)
