"""The interface every backend implements (METHOD.md sections 3 to 5).

Backends receive inputs that the contract layer (``cossim_fast.contract``) has already
validated and put in canonical form, so they never re-check shapes:

- ``features``: ``(B, P, C)`` with arbitrary strides (an ``N x C`` input is ``B = 1``; a
  ``B x C x H x W`` map is the strided view ``(B, H*W, C)``, no copy). Row ``i = b * P + p``.
  dtype float32, bfloat16 or float16 (float64 only on the PyTorch backends, for gradcheck).
- ``labels``: ``(N,)`` int64, contiguous, each in ``[0, K)`` or equal to ``ignore_index``.
- ``bank``: ``(K, M, C)`` contiguous, rows unit-norm; ``counts``/``ptr``: ``(K,)`` int64.

Outputs are fp32 (fp64 for fp64 features), on the features' device.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

#: The operations a backend may or may not support; used in "not supported" reasons.
OPERATIONS = ("max_forward", "max_backward", "all_forward", "all_backward", "update")


class Backend(abc.ABC):
    """One implementation of the operator contract."""

    name: str = ""

    @abc.abstractmethod
    def unsupported_reasons(self, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
        """Why this backend cannot run ``op`` on tensors of this device and dtype (empty: it can)."""

    def auto_skip_reasons(self, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
        """Why "auto" should not pick this backend although it can run (e.g. measured slower)."""
        return []

    @abc.abstractmethod
    def max_forward(
        self, features: Tensor, labels: Tensor, bank: Tensor, counts: Tensor, ignore_index: int
    ) -> tuple[Tensor, Tensor]:
        """Per-row max cosine similarity over the row's class bucket.

        Returns ``values`` (N,) fp32 and ``indices`` (N,) int64: the slot of the winner (lowest on
        ties), or ``(-inf, -1)`` for ignored rows and rows whose bucket is empty.
        """

    @abc.abstractmethod
    def max_backward(
        self,
        grad_values: Tensor,
        features: Tensor,
        labels: Tensor,
        bank: Tensor,
        values: Tensor,
        indices: Tensor,
    ) -> Tensor:
        """Gradient ``(N, C)`` in the features' dtype: ``g_i * (d - s_i * f^_i) / r_i``, zero where ``indices == -1``."""

    @abc.abstractmethod
    def all_forward(
        self,
        features: Tensor,
        labels: Tensor,
        bank: Tensor,
        counts: Tensor,
        threshold: float,
        ignore_index: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row sums over the slots with ``S[i, j] > threshold`` ("all" mode).

        Returns ``count`` (N,) int64, ``ssum`` (N,) fp32 = sum of selected similarities and
        ``dsum`` (N, C) fp32 = sum of the selected dictionary vectors.
        """

    @abc.abstractmethod
    def all_backward(self, grad_ssum: Tensor, features: Tensor, ssum: Tensor, dsum: Tensor) -> Tensor:
        """Gradient ``(N, C)`` in the features' dtype: ``g_i * (dsum_i - ssum_i * f^_i) / r_i``."""

    @abc.abstractmethod
    def update(
        self,
        bank: Tensor,
        counts: Tensor,
        ptr: Tensor,
        features: Tensor,
        labels: Tensor,
        order: Tensor | None,
        denom: Tensor,
        max_per_class: int,
        ignore_index: int,
    ) -> None:
        """Ring-buffer write of METHOD.md 5, in place, with no host synchronization.

        Rows are visited in the sequence ``order`` (``None``: 0, 1, ..., N-1). For each class k
        the first ``n_k = min(#rows of k, max_per_class)`` visited rows of class k (``max_per_class
        < 0``: no cap) have ranks ``r = 0 .. n_k-1``; those with ``r >= n_k - M`` are written to
        ``bank[k, (ptr[k] + r) % M] = (features[row].float() / denom[row]).to(bank.dtype)``
        (``denom`` is fp32, indexed by row). Then ``ptr[k] = (ptr[k] + n_k) % M`` and
        ``counts[k] = min(M, counts[k] + n_k)``. Every backend must produce bitwise the same bank.
        """
