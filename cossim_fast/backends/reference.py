"""The "reference" backend: the formulation the paper describes, materializing by design.

One dense similarity matrix between all target rows and the whole dictionary (``N x K*M``),
masked to each row's class and valid slots (METHOD.md 3b). It is the test oracle and the memory
baseline; nothing else in the package may materialize ``N x M``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cossim_fast.backends import gradients
from cossim_fast.backends.base import Backend
from cossim_fast.backends.numerics import EPS, accumulation_dtype
from cossim_fast.backends.ring_buffer import ring_buffer_update_torch


def dense_similarity(features: Tensor, labels: Tensor, bank: Tensor, counts: Tensor, ignore_index: int) -> Tensor:
    """``S`` as an ``N x K*M`` matrix, ``-inf`` outside each row's class and valid slots."""
    num_classes, slots, dim = bank.shape
    acc = accumulation_dtype(features.dtype)
    rows = torch.nn.functional.normalize(features.reshape(-1, dim).to(acc), dim=1, eps=EPS)
    sim = rows @ bank.reshape(-1, dim).to(acc).T
    slot_class = torch.arange(num_classes, device=bank.device).repeat_interleave(slots)
    slot_index = torch.arange(slots, device=bank.device).repeat(num_classes)
    valid_slot = slot_index < counts[slot_class]
    keep = (labels[:, None] == slot_class[None, :]) & valid_slot[None, :]
    return sim.masked_fill(~keep, float("-inf"))


class ReferenceBackend(Backend):
    name = "reference"

    def unsupported_reasons(self, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
        return []

    def max_forward(self, features, labels, bank, counts, ignore_index):
        slots = bank.shape[1]
        sim = dense_similarity(features, labels, bank, counts, ignore_index)
        flat_index = sim.argmax(dim=1)  # first maximal value: the lowest slot wins ties
        values = sim.gather(1, flat_index[:, None]).squeeze(1)
        found = values > float("-inf")
        indices = torch.where(found, flat_index - labels.clamp(min=0) * slots, -1)
        return values, indices

    def max_backward(self, grad_values, features, labels, bank, values, indices):
        return gradients.max_backward(grad_values, features, labels, bank, values, indices)

    def all_forward(self, features, labels, bank, counts, threshold, ignore_index):
        num_classes, slots, dim = bank.shape
        sim = dense_similarity(features, labels, bank, counts, ignore_index)
        selected = sim > threshold
        count = selected.sum(dim=1)
        ssum = torch.where(selected, sim, 0).sum(dim=1)
        dsum = selected.to(sim.dtype) @ bank.reshape(-1, dim).to(sim.dtype)
        return count, ssum, dsum

    def all_backward(self, grad_ssum, features, ssum, dsum):
        return gradients.all_backward(grad_ssum, features, ssum, dsum)

    def update(self, bank, counts, ptr, features, labels, order, denom, max_per_class, ignore_index):
        ring_buffer_update_torch(bank, counts, ptr, features, labels, order, denom, max_per_class, ignore_index)
