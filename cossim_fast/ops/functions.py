"""``torch.autograd.Function`` wrappers: the path from autograd (and the trainer) to every kernel.

Gradients flow to the features only. The bank is saved for the backward, so a dictionary update
between a forward and its backward bumps its version and is reported here instead of silently
producing a gradient from the wrong dictionary entries.
"""

from __future__ import annotations

import torch
from torch import Tensor

import cossim_fast.ops.custom_ops  # noqa: F401  (registers torch.ops.cossim_fast.*)

_ops = torch.ops.cossim_fast

STALE_BANK = (
    "cossim_fast: the dictionary bank was modified (e.g. FeatureDictionary.update) between the "
    "forward of the cosine similarity and its backward; the gradient would use the wrong entries. "
    "Call backward() before updating the dictionary, or compute the loss after the update."
)


def _remember_bank(ctx, bank: Tensor) -> None:
    # torch.compile cannot trace the version counter: there, any in-place change names the bank.
    ctx.bank_version = None if torch.compiler.is_compiling() else (bank, bank._version)


def _saved(ctx) -> tuple[Tensor, ...]:
    try:
        return ctx.saved_tensors
    except RuntimeError as error:
        # Only a changed bank gets the dictionary message; e.g. features modified in place keep torch's.
        bank_changed = ctx.bank_version is None or ctx.bank_version[0]._version != ctx.bank_version[1]
        if "modified by an inplace operation" in str(error) and bank_changed:
            raise RuntimeError(STALE_BANK) from error
        raise


class MaxCosineSimilarity(torch.autograd.Function):
    """``(values, indices)`` of METHOD.md 3 for canonical ``(B, P, C)`` features."""

    @staticmethod
    def forward(ctx, features, labels, bank, counts, ignore_index: int, backend: str, check_values: bool):
        values, indices = _ops.max_cosine_forward(features, labels, bank, counts, ignore_index, backend, check_values)
        ctx.save_for_backward(features, labels, bank, values, indices)
        _remember_bank(ctx, bank)
        ctx.backend = backend
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, grad_indices):
        features, labels, bank, values, indices = _saved(ctx)
        grad = _ops.max_cosine_backward(grad_values.contiguous(), features, labels, bank, values, indices, ctx.backend)
        return grad.view(features.shape), None, None, None, None, None, None


class ThresholdedCosineSum(torch.autograd.Function):
    """Per-row ``(count, ssum)`` of METHOD.md 4 "all" mode; the backward is elementwise."""

    @staticmethod
    def forward(ctx, features, labels, bank, counts, threshold: float, ignore_index: int, backend: str, check_values: bool):
        count, ssum, dsum = _ops.thresholded_cosine_forward(
            features, labels, bank, counts, threshold, ignore_index, backend, check_values
        )
        # The bank is saved only for the version check: dsum was summed from it.
        ctx.save_for_backward(features, ssum, dsum, bank)
        _remember_bank(ctx, bank)
        ctx.backend = backend
        ctx.mark_non_differentiable(count)
        return count, ssum

    @staticmethod
    def backward(ctx, grad_count, grad_ssum):
        features, ssum, dsum, _ = _saved(ctx)
        grad = _ops.thresholded_cosine_backward(grad_ssum.contiguous(), features, ssum, dsum, ctx.backend)
        return grad.view(features.shape), None, None, None, None, None, None, None
