"""Keep every rank's dictionary identical under ``torch.distributed`` (the MoCo queue rule).

Each rank gathers all ranks' source rows in rank order before its update, so all ranks write the
same rows to the same slots. Ranks may hold different numbers of rows: shorter ones are padded
with rows labelled ``ignore_index``, which the update skips. The row counts are host ints and
are exchanged through a gloo group: an exchange through NCCL would end in a copy from the
device, which waits for everything queued on the GPU before it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_host_group: tuple[object, object] | None = None  # (default group, its gloo group)


def host_group() -> object:
    """A group over the default group's ranks that exchanges CPU tensors: the default group
    itself when its backend has gloo, otherwise a gloo group made once (every rank calls this
    at the same point, as ``new_group`` requires)."""
    global _host_group
    world = dist.group.WORLD
    if "gloo" in dist.get_backend(world):
        return world
    if _host_group is None or _host_group[0] is not world:
        _host_group = (world, dist.new_group(backend="gloo"))
    return _host_group[1]


def longest_on_any_rank(num_rows: int) -> int:
    """The largest ``num_rows`` over the ranks, exchanged on the host: no wait for the GPU."""
    size = torch.tensor([num_rows])
    sizes = [torch.empty_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size, group=host_group())
    return int(max(sizes))


@torch.no_grad()
def gather_from_all_ranks(features: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(N, C)`` features and ``(N,)`` labels of every rank, concatenated in rank order."""
    longest = longest_on_any_rank(labels.numel())
    padded_features = features.new_zeros(longest, features.shape[1])
    padded_features[: labels.numel()] = features
    padded_labels = labels.new_full((longest,), ignore_index)
    padded_labels[: labels.numel()] = labels
    all_features = [torch.empty_like(padded_features) for _ in range(world_size())]
    all_labels = [torch.empty_like(padded_labels) for _ in range(world_size())]
    dist.all_gather(all_features, padded_features.contiguous())
    dist.all_gather(all_labels, padded_labels)
    return torch.cat(all_features), torch.cat(all_labels)
