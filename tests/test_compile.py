"""The registered ops pass torch.library.opcheck, and the loss compiles with fullgraph=True."""

import pytest
import torch

import cossim_fast
from cases import make_bank, make_rows

BANK, COUNTS = make_bank(4, 6, 5, counts=[6, 0, 3, 6])


def _rows(num_rows=9, requires_grad=False):
    features, labels = make_rows(num_rows, 5, 4)
    return features.unsqueeze(0).requires_grad_(requires_grad), labels


#: reference, torch, and triton where its interpreter runs.
OPCHECK_BACKENDS = ["reference", *(b for b in cossim_fast.available_backends("cpu") if b != "reference")]


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
def test_opcheck_forward_ops(backend):
    features, labels = _rows()
    ops = torch.ops.cossim_fast
    torch.library.opcheck(ops.max_cosine_forward, (features, labels, BANK, COUNTS, 255, backend, True))
    torch.library.opcheck(ops.thresholded_cosine_forward, (features, labels, BANK, COUNTS, 0.1, 255, backend, True))


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
def test_opcheck_backward_ops(backend):
    features, labels = _rows()
    ops = torch.ops.cossim_fast
    values, indices = ops.max_cosine_forward(features, labels, BANK, COUNTS, 255, backend, True)
    torch.library.opcheck(ops.max_cosine_backward, (torch.randn(9), features, labels, BANK, values, indices, backend))
    _, ssum, dsum = ops.thresholded_cosine_forward(features, labels, BANK, COUNTS, 0.1, 255, backend, True)
    torch.library.opcheck(ops.thresholded_cosine_backward, (torch.randn(9), features, ssum, dsum, backend))


def test_opcheck_update_op():
    features, labels = _rows(12)
    bank, counts, ptr = BANK.clone(), COUNTS.clone(), torch.tensor([0, 0, 2, 5])
    order = torch.randperm(12)
    args = (bank, counts, ptr, features, labels, order, 2, 255, "torch", True)
    torch.library.opcheck(torch.ops.cossim_fast.update_dictionary, args)
    torch.library.opcheck(torch.ops.cossim_fast.check_update_values, (bank, counts, ptr, features, labels, 255))


COMPILE_BACKENDS = ["auto"] + [b for b in cossim_fast.available_backends("cpu") if b == "triton"]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("mode", ["max", "all"])
def test_compiled_loss_fullgraph_matches_eager(mode, backend):
    dictionary = cossim_fast.FeatureDictionary(4, 6, 5)
    dictionary.update(*make_rows(40, 5, 4, ignore_share=0.0))

    def step(features, labels):
        return cossim_fast.cosine_similarity_loss(
            features, labels, dictionary.bank, dictionary.counts, 0.1, mode=mode, reduction="class_mean", backend=backend
        )

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    features, labels = make_rows(21, 5, 4)
    eager_x = features.clone().requires_grad_(True)
    compiled_x = features.clone().requires_grad_(True)
    eager = step(eager_x, labels)
    result = compiled(compiled_x, labels)
    eager.backward()
    result.backward()
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)


def test_compiled_dictionary_update_fullgraph():
    dictionary = cossim_fast.FeatureDictionary(4, 6, 37)
    eager = cossim_fast.FeatureDictionary(4, 6, 37)
    compiled = torch.compile(dictionary.update, fullgraph=True)
    for _ in range(3):
        features, labels = make_rows(13, 37, 4)
        compiled(features, labels)
        eager.update(features, labels)
    # Bitwise: the row norms are taken inside the op, where inductor cannot fuse them its own way
    # (taken outside, they came out 1 ulp off eager's now and then).
    assert torch.equal(dictionary.bank, eager.bank)
    assert torch.equal(dictionary.ptr, eager.ptr) and torch.equal(dictionary.counts, eager.counts)
