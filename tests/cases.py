"""Random inputs with odd shapes, and comparisons against the reference, shared by the tests."""

from __future__ import annotations

import torch

import cossim_fast
from cossim_fast.backends.reference import ReferenceBackend, dense_similarity

IGNORE = 255

#: atol on similarity values and loss per feature dtype: the values are fp32 accumulations of
#: the same inputs in every backend, so only summation order differs.
VALUE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.float64: 1e-10}
#: Relative tolerance of gradients, which are rounded to the feature dtype: about two units in
#: the last place (bf16 2^-8, fp16 2^-11), taken relative to the largest entry for atol.
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def fused_backends(device: str = "cpu") -> list[str]:
    """Every non-reference backend that can run on ``device`` here."""
    return [name for name in cossim_fast.available_backends(device) if name != "reference"]


def make_bank(num_classes: int, slots: int, dim: int, *, dtype=torch.float32, device="cpu", counts=None, generator=None):
    bank = torch.nn.functional.normalize(torch.randn(num_classes, slots, dim, generator=generator), dim=2)
    if counts is None:
        counts = torch.randint(0, slots + 1, (num_classes,), generator=generator)
    return bank.to(device=device, dtype=dtype), torch.as_tensor(counts, dtype=torch.int64, device=device)


def make_rows(num_rows: int, dim: int, num_classes: int, *, dtype=torch.float32, device="cpu", ignore_share=0.1):
    features = (torch.randn(num_rows, dim) * 3).to(device=device, dtype=dtype)
    labels = torch.randint(0, num_classes, (num_rows,))
    labels[torch.rand(num_rows) < ignore_share] = IGNORE
    return features, labels.to(device)


def assert_close_gradient(grad: torch.Tensor, ref_grad: torch.Tensor, dtype: torch.dtype) -> None:
    """``grad`` within ~2 ulp of ``dtype`` of the reference, at the scale of its largest entry
    (a gradient of 1e-3 is not compared with an absolute 1e-2: a zero gradient would pass)."""
    assert ref_grad.abs().max() > 0, "a zero reference gradient compares nothing"
    tol = GRAD_RTOL[dtype]
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=tol * ref_grad.abs().max().item())


def assert_same_max(features, labels, bank, counts, values, indices, ref_values, ref_indices, dtype) -> None:
    """Values within the dtype's tolerance; indices equal except between near-tied slots."""
    torch.testing.assert_close(values, ref_values, atol=VALUE_ATOL[dtype], rtol=0)
    differ = indices != ref_indices
    if differ.any():
        flat_labels = labels.reshape(-1)
        sim = dense_similarity(features.reshape(-1, bank.shape[2]) if features.dim() == 2 else
                               features.flatten(2).transpose(1, 2).reshape(-1, bank.shape[2]),
                               flat_labels, bank, counts, IGNORE)
        rows = differ.reshape(-1).nonzero().squeeze(1)
        assert (ref_indices.reshape(-1)[rows] >= 0).all() and (indices.reshape(-1)[rows] >= 0).all()
        slots = bank.shape[1]
        picked = sim[rows, flat_labels[rows] * slots + indices.reshape(-1)[rows]]
        best = sim[rows, flat_labels[rows] * slots + ref_indices.reshape(-1)[rows]]
        torch.testing.assert_close(picked.float(), best.float(), atol=VALUE_ATOL[dtype], rtol=0)


__all__ = ["IGNORE", "ReferenceBackend"]
