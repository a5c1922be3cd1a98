"""The registered operators (``torch.ops.cossim_fast.*``) with their fake kernels.

Registering them with ``torch.library`` makes each one opaque to ``torch.compile`` (it sees the
fake kernel's shapes, not the Python inside), so the backend choice and the data-reading value
checks happen at run time, inside the op, and ``fullgraph=True`` holds.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from cossim_fast.backends import dispatch
from cossim_fast.backends.numerics import accumulation_dtype
from cossim_fast.backends.ring_buffer import row_norms
from cossim_fast.contract import inputs


def _exact(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off inside the ops: the backends compute in their inputs' dtypes with fp32
    accumulation (METHOD.md), while a caller's autocast would run their matmuls in bf16/fp16
    (a different winner, 16-bit values) or mix dtypes (``index_add_`` refuses)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _check(features: Tensor, labels: Tensor, bank: Tensor, counts: Tensor, ignore_index: int) -> None:
    inputs.check_feature_values(features)
    inputs.check_label_values(labels, bank.shape[0], ignore_index)
    inputs.check_slot_values("counts", counts, 0, bank.shape[1])


# An op of its own so that torch.compile treats its data-dependent branches as one opaque call.
@torch.library.custom_op("cossim_fast::check_update_values", mutates_args=())
def check_update_values(bank: Tensor, counts: Tensor, ptr: Tensor, features: Tensor, labels: Tensor, ignore_index: int) -> None:
    """The data-reading checks of ``update_dictionary`` (each reads the data: a host sync on GPU)."""
    _check(features, labels, bank, counts, ignore_index)
    inputs.check_slot_values("ptr", ptr, 0, bank.shape[1] - 1)


@check_update_values.register_fake
def _(bank, counts, ptr, features, labels, ignore_index):
    return None


@torch.library.custom_op("cossim_fast::max_cosine_forward", mutates_args=())
def max_cosine_forward(
    features: Tensor, labels: Tensor, bank: Tensor, counts: Tensor, ignore_index: int, backend: str, check_values: bool
) -> tuple[Tensor, Tensor]:
    inputs.check_ignore_index(ignore_index, bank.shape[0])  # free: a number, not data
    if check_values:
        _check(features, labels, bank, counts, ignore_index)
        inputs.check_bank_norms(bank, counts)
    chosen = dispatch.select("max_forward", backend, features.device, features.dtype, bank.dtype, dim=bank.shape[2], rows=labels.numel())
    with _exact(features.device):
        return chosen.max_forward(features, labels, bank, counts, ignore_index)


@max_cosine_forward.register_fake
def _(features, labels, bank, counts, ignore_index, backend, check_values):
    rows = labels.shape[0]
    return features.new_empty(rows, dtype=accumulation_dtype(features.dtype)), labels.new_empty(rows)


@torch.library.custom_op("cossim_fast::max_cosine_backward", mutates_args=())
def max_cosine_backward(
    grad_values: Tensor, features: Tensor, labels: Tensor, bank: Tensor, values: Tensor, indices: Tensor, backend: str
) -> Tensor:
    chosen = dispatch.select("max_backward", backend, features.device, features.dtype, bank.dtype, dim=bank.shape[2], rows=labels.numel())
    with _exact(features.device):
        return chosen.max_backward(grad_values, features, labels, bank, values, indices)


@max_cosine_backward.register_fake
def _(grad_values, features, labels, bank, values, indices, backend):
    return features.new_empty(labels.shape[0], features.shape[2])


@torch.library.custom_op("cossim_fast::thresholded_cosine_forward", mutates_args=())
def thresholded_cosine_forward(
    features: Tensor,
    labels: Tensor,
    bank: Tensor,
    counts: Tensor,
    threshold: float,
    ignore_index: int,
    backend: str,
    check_values: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    inputs.check_ignore_index(ignore_index, bank.shape[0])  # free: a number, not data
    if check_values:
        _check(features, labels, bank, counts, ignore_index)
        inputs.check_bank_norms(bank, counts)
    chosen = dispatch.select("all_forward", backend, features.device, features.dtype, bank.dtype, dim=bank.shape[2], rows=labels.numel())
    with _exact(features.device):
        return chosen.all_forward(features, labels, bank, counts, threshold, ignore_index)


@thresholded_cosine_forward.register_fake
def _(features, labels, bank, counts, threshold, ignore_index, backend, check_values):
    rows, acc = labels.shape[0], accumulation_dtype(features.dtype)
    return labels.new_empty(rows), features.new_empty(rows, dtype=acc), features.new_empty(rows, features.shape[2], dtype=acc)


@torch.library.custom_op("cossim_fast::thresholded_cosine_backward", mutates_args=())
def thresholded_cosine_backward(grad_ssum: Tensor, features: Tensor, ssum: Tensor, dsum: Tensor, backend: str) -> Tensor:
    chosen = dispatch.select("all_backward", backend, features.device, features.dtype, dim=dsum.shape[1], rows=dsum.shape[0])
    with _exact(features.device):
        return chosen.all_backward(grad_ssum, features, ssum, dsum)


@thresholded_cosine_backward.register_fake
def _(grad_ssum, features, ssum, dsum, backend):
    return features.new_empty(dsum.shape[0], features.shape[2])


def _no_second_derivative(ctx, *grads):
    raise RuntimeError(
        "cossim_fast: the cosine-similarity loss is differentiable once; its gradient (from "
        "backward with create_graph=True) cannot be differentiated again"
    )


# Reached only when a gradient computed with create_graph=True is itself differentiated.
max_cosine_backward.register_autograd(_no_second_derivative)
thresholded_cosine_backward.register_autograd(_no_second_derivative)


@torch.library.custom_op("cossim_fast::update_dictionary", mutates_args=("bank", "counts", "ptr"))
def update_dictionary(
    bank: Tensor,
    counts: Tensor,
    ptr: Tensor,
    features: Tensor,
    labels: Tensor,
    order: Tensor | None,
    max_per_class: int,
    ignore_index: int,
    backend: str,
    check_values: bool,
) -> None:
    inputs.check_ignore_index(ignore_index, bank.shape[0])  # free: a number, not data
    if check_values:
        check_update_values(bank, counts, ptr, features, labels, ignore_index)
        if order is not None:
            inputs.check_order_values(order, labels.numel())
    chosen = dispatch.select("update", backend, bank.device, bank.dtype, features.dtype, dim=bank.shape[2], rows=labels.numel())
    with _exact(bank.device):
        # The norms inside the op: taken outside, torch.compile fused and reordered their sums
        # (a bank 1 ulp off eager's).
        chosen.update(bank, counts, ptr, features, labels, order, row_norms(features), max_per_class, ignore_index)


@update_dictionary.register_fake
def _(bank, counts, ptr, features, labels, order, max_per_class, ignore_index, backend, check_values):
    return None
