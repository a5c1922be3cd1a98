"""Process-group setup for torchrun (NCCL on GPU, gloo on CPU) and DDP wrapping."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cossim_fast.ops.distributed import sum_over_ranks
from cossim_fast.training.config import ConfigError


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``train.device`` (auto | cpu | cuda) as a device; a CUDA one becomes the current device."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but no CUDA device is available (use auto or cpu)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(preference: str = "auto") -> Context:
    """Join the process group torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(preference, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world, local_rank, device)


def wrap(model: nn.Module, context: Context) -> nn.Module:
    """DDP around ``model`` when there are several ranks; the model itself otherwise."""
    if context.world == 1:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def broadcast_buffers(model: nn.Module, context: Context) -> None:
    """Rank 0's buffers on every rank: BatchNorm running statistics drift apart per rank, as each
    rank updates them from its own batches (DDP broadcasts them only when a forward starts)."""
    if context.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def mean_over_ranks(tensor: torch.Tensor, context: Context | None) -> torch.Tensor:
    """The mean of ``tensor`` over the ranks (itself with one rank)."""
    if context is None or context.world == 1:
        return tensor
    return sum_over_ranks(tensor, context.world) / context.world


def check_same_on_all_ranks(what: str, value: str, context: Context) -> None:
    """Raise on every rank (no rank left waiting in a collective) unless all ranks see ``value``."""
    if context.world == 1:
        return
    seen: list[str] = [""] * context.world
    dist.all_gather_object(seen, value)
    if len(set(seen)) > 1:
        views = "; ".join(f"rank {rank}: {view}" for rank, view in enumerate(seen))
        raise ConfigError(
            f"the ranks disagree on the {what} ({views}): on several machines the output_dir and "
            f"checkpoints must be on a filesystem every rank reads"
        )


def stack_over_ranks(tensor: torch.Tensor, context: Context | None) -> torch.Tensor:
    """Every rank's ``tensor``, stacked in rank order (a leading dimension of 1 with one rank)."""
    if context is None or context.world == 1:
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(context.world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def shutdown(context: Context) -> None:
    """Destroy the process group at the end of a run, as torch asks (pending work finishes)."""
    if context.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Context) -> None:
    if context.world > 1:
        dist.barrier()
