"""The source cross-entropy at label resolution, optionally in bands of rows to save memory.

The network's logits come at feature resolution (1/8); the loss compares them, upsampled
bilinearly, with the full-resolution labels. The upsampled logits, their log-softmax and both
gradients are four ``B x K x H x W`` fp32 tensors: with activation checkpointing on, for a
small backbone or at high resolution, they are a large part of a step's peak. With
``bands > 1`` the rows of the output are taken a band at a time, each band under
``torch.utils.checkpoint``: its full-resolution tensors exist only while that band is computed,
in the forward and again in the backward, so the peak holds one band's instead of the image's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from cossim_fast.ops.distributed import sum_over_ranks


def upsampled_cross_entropy(logits: Tensor, labels: Tensor, *, ignore_index: int, bands: int = 1, world: int = 1) -> Tensor:
    """Mean cross-entropy of ``logits`` (B, K, h, w) upsampled bilinearly (``align_corners=False``)
    to ``labels`` (B, H, W), over the pixels not labelled ``ignore_index``; 0, with zero gradients,
    if there are none (``F.cross_entropy`` gives NaN there, whose gradient would ruin the weights).
    ``bands = 1`` is ``F.interpolate`` then ``F.cross_entropy``'s sum over the labelled count;
    more bands give the same value up to float rounding, with ``1/bands`` of its memory.
    ``world > 1``: normalized by the labelled pixels of all ranks and scaled by ``world``
    (``cossim_fast.ops.distributed``), so DDP optimizes the global batch's mean."""
    if bands < 1:
        raise ValueError(f"bands must be >= 1, got {bands}")
    height, width = labels.shape[-2:]
    labelled = sum_over_ranks((labels != ignore_index).sum(), world).clamp(min=1)  # on the device: no host sync
    if bands == 1:
        upsampled = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        total = F.cross_entropy(upsampled.float(), labels, ignore_index=ignore_index, reduction="sum")
    else:
        total = logits.new_zeros((), dtype=torch.float32)
        edges = torch.linspace(0, height, min(bands, height) + 1).round().long().tolist()
        for start, stop in zip(edges[:-1], edges[1:]):
            total = total + checkpoint(
                _band_loss_sum, logits, labels[:, start:stop], start, height, ignore_index, use_reentrant=False
            )
    loss = total / labelled
    return loss * world if world > 1 else loss


def _band_loss_sum(logits: Tensor, labels: Tensor, start: int, height: int, ignore_index: int) -> Tensor:
    """Summed cross-entropy of output rows ``start ..`` (as many as ``labels`` has).

    ``grid_sample`` at the sampling positions ``F.interpolate`` uses: output pixel ``y`` reads
    input position ``(y + 0.5) * h / H - 0.5``, which in grid_sample's normalized coordinates
    (``align_corners=False``) is ``(2y + 1) / H - 1`` whatever ``h``; positions before the first
    pixel are clamped to it in both (``padding_mode="border"``).
    """
    batch, rows, width = labels.shape
    ys = (2 * torch.arange(start, start + rows, device=logits.device, dtype=torch.float32) + 1) / height - 1
    xs = (2 * torch.arange(width, device=logits.device, dtype=torch.float32) + 1) / width - 1
    grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)  # (rows, W, [x, y])
    band = F.grid_sample(
        logits.float(), grid.expand(batch, rows, width, 2), mode="bilinear", padding_mode="border", align_corners=False
    )
    return F.cross_entropy(band, labels, ignore_index=ignore_index, reduction="sum")
