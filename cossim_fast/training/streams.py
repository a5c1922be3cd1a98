"""Deterministic, resumable batch streams for iteration-based training, on one rank or many.

The samples of iteration ``i`` are a pure function of ``(seed, i)``: the stream is a sequence
of seeded epoch permutations, iteration ``i`` takes the global positions ``i*B*W .. (i+1)*B*W``
and rank ``r`` its slice ``r*B .. (r+1)*B`` of them. Resuming at iteration ``i`` therefore
continues exactly, and ``W`` ranks with batch ``B`` see the same samples (and flips) as one
process with batch ``W*B``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


class IterationBatches(torch.utils.data.Sampler[list[int]]):
    """Index batches of iterations ``start, start+1, ...`` for one rank."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, *, rank: int = 0, world: int = 1, start: int = 0) -> None:
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world, self.start = rank, world, start
        self._epoch: tuple[int, Tensor] | None = None

    def _permutation(self, epoch: int) -> Tensor:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_permutation(self.num_samples, self.seed, epoch))
        return self._epoch[1]

    def batch(self, iteration: int) -> list[int]:
        first = (iteration * self.world + self.rank) * self.batch_size
        indices = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, self.num_samples)
            indices.append(int(self._permutation(epoch)[offset]))
        return indices

    def __iter__(self) -> Iterator[list[int]]:
        iteration = self.start
        while True:
            yield self.batch(iteration)
            iteration += 1


class CachedDataset(Dataset):
    """Keeps decoded samples in memory, up to ``max_bytes`` of tensors: a small dataset (the
    synthetic one) is read once; of a large one (GTA5: ~18 MB a decoded sample) only the first
    samples are kept and the rest are decoded every time."""

    def __init__(self, dataset: Dataset, max_bytes: int = 2 * 2**30) -> None:
        self.dataset = dataset
        self.max_bytes = max_bytes
        self.cached_bytes = 0
        self.cache: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        if index in self.cache:
            return self.cache[index]
        sample = self.dataset[index]
        size = sum(item.nbytes for item in sample if isinstance(item, Tensor))
        if self.cached_bytes + size <= self.max_bytes:
            self.cache[index] = sample
            self.cached_bytes += size
        return sample


def flips(seed: int, iteration: int, batch_size: int, rank: int, world: int) -> Tensor:
    """Horizontal-flip decisions of this rank's samples, drawn for the global batch."""
    generator = torch.Generator().manual_seed(seed * 7_919 + iteration)
    return (torch.rand(batch_size * world, generator=generator) < 0.5)[rank * batch_size : (rank + 1) * batch_size]


def batch_stream(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    *,
    rank: int = 0,
    world: int = 1,
    start: int = 0,
    num_workers: int = 0,
    flip: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(images, labels)`` per iteration from ``start`` on, flipped as drawn by ``flips``."""
    sampler = IterationBatches(len(dataset), batch_size, seed, rank=rank, world=world, start=start)
    # Its own generator for the workers' base seed: a loader started on resume must not move
    # the global RNG, whose state the checkpoints save and restore.
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    for iteration, (images, labels, _) in enumerate(loader, start=start):
        if flip:
            flipped = flips(seed, iteration, batch_size, rank, world)
            images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
            if labels.numel():
                labels = torch.where(flipped[:, None, None], labels.flip(-1), labels)
        yield images, labels
