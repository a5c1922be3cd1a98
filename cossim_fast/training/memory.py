"""Peak memory of a run, and what to change when a training step does not fit.

Users of this trainer are the ones who hit GPU memory limits: an out-of-memory error in a
training step is re-raised with the levers this config does not use yet, instead of the
allocator's message alone.
"""

from __future__ import annotations

import torch

from cossim_fast.training.config import Config


class TrainingOutOfMemoryError(torch.cuda.OutOfMemoryError):
    """A training step ran out of device memory; the message lists the levers left to pull.
    A subclass of ``torch.cuda.OutOfMemoryError``, so code that catches that still does."""


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_levers(config: Config) -> list[str]:
    """Settings that lower a step's peak memory and that ``config`` does not use yet."""
    levers = []
    if not config.model.activation_checkpointing:
        levers.append(
            "model.activation_checkpointing=true: the backbone keeps a third of its activations "
            "(same gradients, about 1.35x the step time)"
        )
    if config.train.ce_bands == 1:
        levers.append(
            "train.ce_bands=8: the source cross-entropy's full-resolution logits a band of rows at a time "
            "(the same loss up to rounding)"
        )
    if config.train.amp == "none":
        levers.append("train.amp=bf16: half-size activations")
    batch = max(config.train.batch_size_source, config.train.batch_size_target)
    if batch > 1:
        levers.append(
            f"train.batch_size_source/target halved with train.grad_accum={2 * config.train.grad_accum}: "
            "the same samples per optimizer step"
        )
    if config.cosine.backend == "reference":
        levers.append("cosine.backend=auto: the reference backend materializes an N x K*M similarity matrix")
    levers.append("smaller data.source.size / data.target.size (the crop)")
    return levers


def out_of_memory(error: torch.cuda.OutOfMemoryError, config: Config, iteration: int) -> TrainingOutOfMemoryError:
    """The error to raise instead of ``error``, naming the levers."""
    lines = [
        f"out of device memory in training iteration {iteration}. Settings that lower the peak "
        "(--set KEY=VALUE; python -m bench.frontier --step train measures what fits a budget):",
        *(f"  - {lever}" for lever in memory_levers(config)),
        f"The allocator said: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}",
    ]
    return TrainingOutOfMemoryError("\n".join(lines))
