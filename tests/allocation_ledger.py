"""Which tensor storages torch ops create during a call, and the most of them alive at once.

A ``TorchDispatchMode`` sees every op's outputs. A storage not seen before is an allocation; it
is released when the last Python tensor on it dies (every later view of it holds a reference).
Device-independent, so it measures on the CPU what a GPU call would allocate through torch ops;
scratch memory an op keeps inside itself (e.g. a sort's radix buffers) is not seen.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationLedger(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.holders: dict[int, int] = {}  # storage data_ptr -> live Python tensors on it
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in inputs:  # in-place ops return an input
                self._hold(tensor)
        return out

    def _hold(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return
        if key not in self.holders:
            self.holders[key], self.sizes[key] = 0, size
            self.live += size
            self.peak = max(self.peak, self.live)
        self.holders[key] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self.holders[key] -= 1
        if self.holders[key] == 0:
            del self.holders[key]
            self.live -= self.sizes.pop(key)
