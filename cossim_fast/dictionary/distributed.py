"""Keep every rank's dictionary identical under ``torch.distributed`` (the MoCo queue rule).

Each rank gathers all ranks' source rows in rank order before its update, so all ranks write the
same rows to the same slots. Ranks may hold different numbers of rows: shorter ones are padded
with rows labelled ``ignore_index``, which the update skips.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def gather_from_all_ranks(features: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(N, C)`` features and ``(N,)`` labels of every rank, concatenated in rank order."""
    size = torch.tensor([labels.numel()], device=labels.device)
    sizes = [torch.empty_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded_features = features.new_zeros(longest, features.shape[1])
    padded_features[: labels.numel()] = features
    padded_labels = labels.new_full((longest,), ignore_index)
    padded_labels[: labels.numel()] = labels
    all_features = [torch.empty_like(padded_features) for _ in sizes]
    all_labels = [torch.empty_like(padded_labels) for _ in sizes]
    dist.all_gather(all_features, padded_features.contiguous())
    dist.all_gather(all_labels, padded_labels)
    return torch.cat(all_features), torch.cat(all_labels)
