"""Which tensor storages torch ops create during a call, and the most of them alive at once.

A ``TorchDispatchMode`` sees every op's inputs and outputs. A storage first seen as an op's
output is an allocation; one first seen as an input existed before (a view of it, e.g.
``bank.view(...)``, allocates nothing). An allocation is released when the last Python tensor
on it dies; in-place growth (``resize_``) of an allocation is added to it. Device-independent,
so it measures on the CPU what a GPU call allocates through torch ops. Not seen: scratch an op
keeps inside itself (e.g. a sort's radix buffers), and memory that only C++ still holds after
its last Python tensor died (e.g. autograd's saved tensors) counts as released.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _tensors(tree) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


class AllocationLedger(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.holders: dict[int, int] = {}  # storage id -> live Python tensors on it
        self.sizes: dict[int, int] = {}
        self.external: dict[int, torch.UntypedStorage] = {}  # kept alive: their ids cannot be reused
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        for tensor in inputs:
            storage = tensor.untyped_storage()
            if storage._cdata not in self.holders:
                self.external.setdefault(storage._cdata, storage)
        before = {tensor.untyped_storage()._cdata: tensor.untyped_storage().nbytes() for tensor in inputs}
        out = func(*args, **kwargs)
        for tensor in inputs:  # in-place growth of memory allocated inside the ledger
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.sizes and storage.nbytes() > before.get(key, storage.nbytes()):
                self._grow(key, storage.nbytes() - before[key])
                before[key] = storage.nbytes()
        for tensor in _tensors(out):
            self._hold(tensor)
        return out

    def _grow(self, key: int, size: int) -> None:
        self.sizes[key] += size
        self.live += size
        self.peak = max(self.peak, self.live)

    def _hold(self, tensor: torch.Tensor) -> None:
        key = tensor.untyped_storage()._cdata
        if key in self.external:
            return
        if key not in self.holders:
            self.holders[key], self.sizes[key] = 0, 0
            self._grow(key, tensor.untyped_storage().nbytes())
        self.holders[key] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self.holders[key] -= 1
        if self.holders[key] == 0:
            del self.holders[key]
            self.live -= self.sizes.pop(key)
