"""Loss normalizers summed over ranks, so that a DDP run optimizes the loss of its global batch.

DDP averages the ranks' gradients. If each rank divides its own sum of terms by its own count,
that average is a mean of per-rank means, and a rank with few selected terms weighs as much as
one with many. Dividing each rank's sum by the count of all ranks and scaling it by the world
size makes the average exactly the gradient of (sum of all terms) / (count of all terms), the
loss one process computes on the combined batch. Only the counts cross ranks (detached, one
all-reduce each), never the features.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def distributed_world(enabled: bool) -> int:
    """The number of ranks to normalize over: 1 unless ``enabled`` and a process group is up."""
    return dist.get_world_size() if enabled and dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(counts: Tensor, world: int) -> Tensor:
    """``counts`` summed over all ranks (detached; every rank must call it), or as is for one."""
    if world == 1:
        return counts
    total = counts.detach().clone()
    dist.all_reduce(total)
    return total
