"""The public functional API: max cosine similarity and the thresholded loss (METHOD.md 3, 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from cossim_fast.backends import dispatch
from cossim_fast.backends.numerics import accumulation_dtype
from cossim_fast.contract import inputs
from cossim_fast.ops.distributed import sum_over_ranks
from cossim_fast.ops.functions import MaxCosineSimilarity, ThresholdedCosineSum


def _prepare(features, labels, bank, counts, ignore_index, backend, check_values):
    dispatch.check_backend_name(backend)
    rows = inputs.rows_of(features, labels, inputs.bank_dim(bank), ignore_index)
    bank, counts = inputs.check_dictionary(bank, counts, rows.features.device)
    inputs.check_ignore_index(ignore_index, bank.shape[0])
    return rows, bank, counts, inputs.value_checks_enabled(check_values)


def max_cosine_similarity(
    features: Tensor,
    labels: Tensor,
    bank: Tensor,
    counts: Tensor,
    *,
    ignore_index: int = 255,
    backend: str = "auto",
    check_values: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Per row, the max cosine similarity to the valid dictionary slots of its class.

    ``features`` is ``N x C`` (labels ``N``) or ``B x C x H x W`` (labels ``B x H x W``); ``bank``
    is ``K x M x C`` with unit-norm rows and ``counts[k]`` valid slots. Returns ``values`` (fp32,
    fp64 for fp64 features, which are for testing; ``-inf`` for ignored rows and empty buckets)
    and ``indices`` (the winning slot, lowest on ties, or -1), both shaped like ``labels``. Differentiable with respect to ``features``.
    """
    rows, bank, counts, check = _prepare(features, labels, bank, counts, ignore_index, backend, check_values)
    values, indices = MaxCosineSimilarity.apply(rows.features, rows.labels, bank, counts, ignore_index, backend, check)
    return values.view(rows.row_shape), indices.view(rows.row_shape)


def loss_terms(
    features: Tensor,
    labels: Tensor,
    bank: Tensor,
    counts: Tensor,
    threshold: float,
    *,
    mode: str = "max",
    ignore_index: int = 255,
    backend: str = "auto",
    check_values: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(loss_sum, selected, labels)``: the sum of ``1 - S`` over the row's selected
    terms and their number, from which every reduction is computed without ``N x M`` storage."""
    inputs.check_choice("mode", mode, inputs.MODES)
    threshold = inputs.check_threshold(threshold)
    rows, bank, counts, check = _prepare(features, labels, bank, counts, ignore_index, backend, check_values)
    if accumulation_dtype(rows.features.dtype) == torch.float32:  # every backend compares float32 similarities
        threshold = inputs.float32_threshold(threshold)
    if mode == "max":
        values, _ = MaxCosineSimilarity.apply(rows.features, rows.labels, bank, counts, ignore_index, backend, check)
        chosen = values > threshold
        # where() and not a product: unselected values are -inf and must not reach the sum.
        return torch.where(chosen, 1.0 - values, 0.0), chosen.to(values.dtype), rows.labels
    count, ssum = ThresholdedCosineSum.apply(
        rows.features, rows.labels, bank, counts, threshold, ignore_index, backend, check
    )
    count = count.to(ssum.dtype)
    return count - ssum, count, rows.labels


def reduce_terms(
    loss_sum: Tensor, selected: Tensor, labels: Tensor, num_classes: int, reduction: str, *, world: int = 1
) -> Tensor:
    """``"mean"`` pools all selected terms; ``"class_mean"`` averages within each class first,
    then over the classes with a selected term, so frequent classes cannot dominate.

    ``world > 1`` (every rank calling, see ``cossim_fast.ops.distributed``): the counts are those
    of all ranks and the result is scaled by ``world``, so that DDP's average of the ranks'
    gradients is the gradient of the loss over all ranks' rows.
    """
    inputs.check_choice("reduction", reduction, inputs.REDUCTIONS)
    if reduction == "mean":
        loss = loss_sum.sum() / sum_over_ranks(selected.sum(), world).clamp(min=1)
        return loss * world if world > 1 else loss
    in_range = (labels >= 0) & (labels < num_classes)
    key = torch.where(in_range, labels, num_classes)
    per_class_loss = loss_sum.new_zeros(num_classes + 1).scatter_add_(0, key, loss_sum)[:num_classes]
    per_class_selected = selected.new_zeros(num_classes + 1).scatter_add_(0, key, selected)[:num_classes]
    per_class_selected = sum_over_ranks(per_class_selected, world)
    present = per_class_selected > 0
    class_loss = per_class_loss / per_class_selected.clamp(min=1)
    loss = torch.where(present, class_loss, 0).sum() / present.sum().clamp(min=1)
    return loss * world if world > 1 else loss


def cosine_similarity_loss(
    features: Tensor,
    labels: Tensor,
    bank: Tensor,
    counts: Tensor,
    threshold: float,
    *,
    mode: str = "max",
    ignore_index: int = 255,
    backend: str = "auto",
    reduction: str = "mean",
    check_values: bool | None = None,
) -> Tensor:
    """The thresholded cosine-similarity loss of METHOD.md 4, a float32 scalar (float64 for float64
    features, which are for testing).

    ``mode="max"``: ``mean(1 - values[i])`` over rows whose max similarity exceeds ``threshold``;
    ``mode="all"``: ``mean(1 - S[i, j])`` over every same-class pair above it.
    ``reduction="class_mean"`` takes that mean within each class first, then over the classes
    with a selected term, so frequent classes cannot dominate. With nothing selected the loss
    is 0 and still part of the graph (zero gradient).
    """
    inputs.check_choice("reduction", reduction, inputs.REDUCTIONS)
    inputs.warn_if_threshold_selects_nothing(inputs.check_threshold(threshold))
    loss_sum, selected, flat_labels = loss_terms(
        features, labels, bank, counts, threshold, mode=mode, ignore_index=ignore_index, backend=backend, check_values=check_values
    )
    return reduce_terms(loss_sum, selected, flat_labels, bank.shape[0], reduction)
