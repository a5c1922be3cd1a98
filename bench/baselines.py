"""The per-class materializing baseline of METHOD.md 3b, and the per-class GEMM timing helper.

The baseline is what a user writes by hand: rows grouped by class, one ``n_k x M`` similarity
matrix per class with ``torch.mm``, then max/argmax (or threshold selection) on it, and plain
autograd for the backward. It has the signatures of the package's functions (``N x C``
features only) so the benchmarks can call it in place of a backend; ``backend`` is accepted and
ignored.

Precision: the rows are normalized in fp32 and the GEMM runs in the features' dtype (a bf16
input gets a bf16 cuBLAS GEMM with fp32 accumulation and a bf16 ``S``, as under autocast), then
the selected similarities are used in fp32. For fp32 inputs the results equal the reference to
GEMM rounding; for 16-bit inputs they differ by the 16-bit rounding of ``S``.

``PerClassGemms`` is the throughput yardstick: the same per-class GEMMs (rows of class k times
that class's valid slots), inputs gathered beforehand, no epilogue at all. On a GPU it is cuBLAS
doing the per-class GEMMs; on a CPU the CPU BLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-12


@dataclass(frozen=True)
class ClassGroup:
    """Rows of one class whose bucket is not empty."""

    klass: int
    rows: Tensor  # row indices, increasing
    slots: int  # valid slots of the class (counts[k] > 0)


def group_rows(labels: Tensor, counts: Tensor, num_classes: int) -> list[ClassGroup]:
    """Rows grouped by class (one stable sort on the device and one host sync for the sizes).

    Rows whose label is outside ``[0, K)`` (``ignore_index``) and rows of empty buckets are left
    out: their results are ``-inf`` / ``-1`` and they receive no gradient.
    """
    labels = labels.reshape(-1)
    valid = (labels >= 0) & (labels < num_classes)
    key = torch.where(valid, labels, num_classes)
    order = torch.argsort(key, stable=True)
    sizes = torch.bincount(key, minlength=num_classes + 1)
    host = torch.cat([sizes[:num_classes], counts.to(sizes.dtype)]).tolist()  # the host sync
    groups, start = [], 0
    for k in range(num_classes):
        n_rows, n_slots = host[k], host[num_classes + k]
        if n_rows > 0 and n_slots > 0:
            groups.append(ClassGroup(k, order[start : start + n_rows], n_slots))
        start += n_rows
    return groups


def _class_similarity(features: Tensor, group: ClassGroup, bank: Tensor) -> tuple[Tensor, Tensor]:
    """``(S, f^)``: the ``n_k x M_k`` similarity matrix (features' dtype) and the normalized rows."""
    rows = F.normalize(features[group.rows].float(), dim=1, eps=EPS)
    bucket = bank[group.klass, : group.slots]
    gemm_dtype = features.dtype if features.dtype != torch.float64 else torch.float64
    sim = torch.mm(rows.to(gemm_dtype), bucket.to(gemm_dtype).T)
    return sim, rows


def _check_rows(features: Tensor, labels: Tensor, bank: Tensor) -> None:
    if features.dim() != 2 or labels.shape != (features.shape[0],) or bank.dim() != 3 or bank.shape[2] != features.shape[1]:
        raise ValueError(
            "the per-class baseline takes N x C features, N labels and a K x M x C bank, got "
            f"{tuple(features.shape)}, {tuple(labels.shape)}, {tuple(bank.shape)}"
        )


def max_cosine_similarity(
    features: Tensor,
    labels: Tensor,
    bank: Tensor,
    counts: Tensor,
    *,
    ignore_index: int = 255,
    backend: str | None = None,
    check_values: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Per row, the max cosine similarity to its class's valid slots (``values`` fp32, ``indices``).

    ``-inf`` / ``-1`` for ignored rows and empty buckets; differentiable w.r.t. ``features``
    through plain autograd (the backward rebuilds an ``n_k x M`` gradient per class).
    """
    del backend, check_values, ignore_index  # rows outside [0, K) are the ignored ones
    _check_rows(features, labels, bank)
    num_rows = features.shape[0]
    out_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    values = torch.full((num_rows,), float("-inf"), dtype=out_dtype, device=features.device)
    indices = torch.full((num_rows,), -1, dtype=torch.int64, device=features.device)
    rows_seen, values_seen, indices_seen = [], [], []
    for group in group_rows(labels, counts, bank.shape[0]):
        sim, _ = _class_similarity(features, group, bank)
        best = sim.argmax(dim=1)  # first maximal value: the lowest slot wins ties
        rows_seen.append(group.rows)
        values_seen.append(sim.gather(1, best[:, None]).squeeze(1).to(out_dtype))
        indices_seen.append(best)
    if rows_seen:
        rows = torch.cat(rows_seen)
        values = values.index_put((rows,), torch.cat(values_seen))
        indices = indices.index_put((rows,), torch.cat(indices_seen))
    elif features.requires_grad:
        values = values + 0 * features.sum()  # stay connected to the graph
    return values, indices


def loss_terms(
    features: Tensor,
    labels: Tensor,
    bank: Tensor,
    counts: Tensor,
    threshold: float,
    *,
    mode: str = "max",
) -> tuple[Tensor, Tensor]:
    """Per present class: ``(loss_sum, selected)``, each of shape ``(K',)``: the sum of ``1 - S``
    over the class's selected terms and their number (METHOD.md 4)."""
    if mode not in ("max", "all"):
        raise ValueError(f"mode must be 'max' or 'all', got {mode!r}")
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    loss_sums, selected = [], []
    for group in group_rows(labels, counts, bank.shape[0]):
        sim, _ = _class_similarity(features, group, bank)
        if mode == "max":
            best = sim.argmax(dim=1)
            values = sim.gather(1, best[:, None]).squeeze(1).to(acc)
            chosen = values > threshold
            loss_sums.append(torch.where(chosen, 1.0 - values, 0.0).sum())
            selected.append(chosen.sum().to(acc))
        else:
            chosen = sim > threshold
            loss_sums.append(torch.where(chosen, 1.0 - sim.to(acc), 0.0).sum())
            selected.append(chosen.sum().to(acc))
    if not loss_sums:
        zero = (features.sum() * 0).to(acc)
        return zero[None], zero.detach()[None]
    return torch.stack(loss_sums), torch.stack(selected)


def cosine_similarity_loss(
    features: Tensor,
    labels: Tensor,
    bank: Tensor,
    counts: Tensor,
    threshold: float,
    *,
    mode: str = "max",
    ignore_index: int = 255,
    backend: str | None = None,
    reduction: str = "mean",
    check_values: bool | None = None,
) -> Tensor:
    """The thresholded loss of METHOD.md 4 ("mean" or "class_mean"), computed per class."""
    del backend, check_values, ignore_index
    _check_rows(features, labels, bank)
    if reduction not in ("mean", "class_mean"):
        raise ValueError(f"reduction must be 'mean' or 'class_mean', got {reduction!r}")
    loss_sums, selected = loss_terms(features, labels, bank, counts, threshold, mode=mode)
    if reduction == "mean":
        return loss_sums.sum() / selected.sum().clamp(min=1)
    present = selected > 0
    class_loss = loss_sums / selected.clamp(min=1)
    return torch.where(present, class_loss, 0.0).sum() / present.sum().clamp(min=1)


@torch.no_grad()
def dictionary_update(
    bank: Tensor,
    counts: Tensor,
    ptr: Tensor,
    features: Tensor,
    labels: Tensor,
    *,
    max_per_class: int | None = None,
    ignore_index: int = 255,
) -> None:
    """The ring-buffer write of METHOD.md 5 the way one writes it by hand: a loop over classes
    with one host sync for the class sizes, rows in increasing order (no permutation)."""
    del ignore_index
    num_classes, slots, _ = bank.shape
    for group in group_rows(labels, torch.ones_like(counts), num_classes):
        rows = group.rows if max_per_class is None else group.rows[:max_per_class]
        taken = rows.numel()
        kept = rows[-slots:]  # only the last M rows survive
        first_rank = taken - kept.numel()
        k = group.klass
        slot = torch.remainder(ptr[k] + first_rank + torch.arange(kept.numel(), device=bank.device), slots)
        source = features[kept]
        denom = torch.linalg.vector_norm(source, dim=1, dtype=torch.float32).clamp_min(EPS)
        bank[k, slot] = (source.float() / denom[:, None]).to(bank.dtype)
        ptr[k] = torch.remainder(ptr[k] + taken, slots)
        counts[k] = (counts[k] + taken).clamp(max=slots)


class PerClassGemms:
    """``torch.mm`` of each class's rows against its valid slots, nothing else (the cuBLAS line).

    Built once from the inputs (rows gathered, normalized and cast to the features' dtype, one
    output workspace of the largest block); calling it runs only the GEMMs. ``flops`` is
    ``2 * N_valid * M * C`` for full buckets.
    """

    def __init__(self, features: Tensor, labels: Tensor, bank: Tensor, counts: Tensor) -> None:
        _check_rows(features, labels, bank)
        dtype = features.dtype
        self.blocks: list[tuple[Tensor, Tensor, Tensor]] = []
        groups = group_rows(labels, counts, bank.shape[0])
        largest = max((g.rows.numel() * g.slots for g in groups), default=0)
        self.workspace = torch.empty(largest, dtype=dtype, device=features.device)
        self.flops = 0
        with torch.no_grad():
            for group in groups:
                rows = F.normalize(features[group.rows].float(), dim=1, eps=EPS).to(dtype).contiguous()
                bucket = bank[group.klass, : group.slots].to(dtype)
                out = self.workspace[: rows.shape[0] * group.slots].view(rows.shape[0], group.slots)
                self.blocks.append((rows, bucket, out))
                self.flops += 2 * rows.shape[0] * group.slots * rows.shape[1]

    def __call__(self) -> None:
        for rows, bucket, out in self.blocks:
            torch.mm(rows, bucket.T, out=out)


def keops_max_cosine_similarity(features: Tensor, labels: Tensor, bank: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class max/argmax with pykeops LazyTensors (nothing ``n_k x M`` in memory; no autograd).

    Raises ImportError without pykeops. KeOps has no bf16, so the rows and buckets go in fp32.
    """
    from pykeops.torch import LazyTensor

    _check_rows(features, labels, bank)
    num_rows = features.shape[0]
    values = torch.full((num_rows,), float("-inf"), dtype=torch.float32, device=features.device)
    indices = torch.full((num_rows,), -1, dtype=torch.int64, device=features.device)
    with torch.no_grad():
        for group in group_rows(labels, counts, bank.shape[0]):
            rows = F.normalize(features[group.rows].float(), dim=1, eps=EPS).contiguous()
            bucket = bank[group.klass, : group.slots].float().contiguous()
            sim = LazyTensor(rows[:, None, :]) | LazyTensor(bucket[None, :, :])
            best = sim.argmax(dim=1).long().view(-1)
            values[group.rows] = (rows * bucket[best]).sum(dim=1)
            indices[group.rows] = best
    return values, indices
