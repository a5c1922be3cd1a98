"""The loss normalizers over ranks (cossim_fast.ops.distributed) with torch.distributed emulated
in one process: the world size they normalize over, and the loss DDP optimizes across ranks."""

from types import SimpleNamespace

import pytest
import torch

from cossim_fast.ops import distributed
from cossim_fast.ops.loss import reduce_terms

IGNORE = 255


def _fake_dist(*, initialized: bool, world: int, all_reduce=None) -> SimpleNamespace:
    return SimpleNamespace(
        is_available=lambda: True, is_initialized=lambda: initialized, get_world_size=lambda: world, all_reduce=all_reduce
    )


def test_world_is_one_unless_enabled_and_a_group_is_up(monkeypatch):
    # sync_distributed=False must keep a rank's loss local even inside a process group.
    monkeypatch.setattr(distributed, "dist", _fake_dist(initialized=True, world=4))
    assert distributed.distributed_world(True) == 4
    assert distributed.distributed_world(False) == 1
    monkeypatch.setattr(distributed, "dist", _fake_dist(initialized=False, world=4))
    assert distributed.distributed_world(True) == 1


def _on_two_ranks(monkeypatch, call):
    """``call(rank)`` on each of two emulated ranks, its all-reduces summing over both: a first
    pass records what each rank hands every all-reduce, a second hands each rank the sums."""
    sent = [[], []]
    for rank in range(2):
        record = lambda tensor, op=None, rank=rank: sent[rank].append(tensor.clone())  # noqa: E731
        monkeypatch.setattr(distributed, "dist", _fake_dist(initialized=True, world=2, all_reduce=record))
        call(rank)
    assert len(sent[0]) == len(sent[1]) > 0  # every rank takes part in every all-reduce
    results = []
    for rank in range(2):
        totals = iter([a + b for a, b in zip(*sent, strict=True)])
        add = lambda tensor, op=None, totals=totals: tensor.copy_(next(totals))  # noqa: E731
        monkeypatch.setattr(distributed, "dist", _fake_dist(initialized=True, world=2, all_reduce=add))
        results.append(call(rank))
    return results


def _by_hand(loss_sum, selected, labels, num_classes, reduction):
    """The loss one process computes on the combined batch (METHOD.md 4), from the definitions."""
    if reduction == "mean":
        return loss_sum.sum() / max(selected.sum().item(), 1)
    class_losses = []
    for k in range(num_classes):
        in_class = labels == k
        if selected[in_class].sum() > 0:
            class_losses.append(loss_sum[in_class].sum() / selected[in_class].sum())
    return sum(class_losses) / len(class_losses)


@pytest.mark.parametrize("reduction", ["mean", "class_mean"])
def test_ddp_average_of_the_ranks_losses_is_the_loss_of_the_combined_batch(monkeypatch, reduction):
    # Class 0 on both ranks with uneven counts, class 1 on rank 0 only, class 2 on rank 1 only
    # (a single term), class 3 present but never selected, ignored rows on both: a rank's own
    # counts or classes, or a missing world scaling, give another average. DDP averages the
    # ranks' gradients, so the mean of the ranks' losses and of their gradients must be those of
    # the combined batch.
    num_classes = 4
    labels = [torch.tensor([0, 0, 0, 1, 3, IGNORE]), torch.tensor([0, 2, 2, 3, IGNORE])]
    selected = [torch.tensor([1.0, 2.0, 0.0, 3.0, 0.0, 0.0]), torch.tensor([4.0, 1.0, 0.0, 0.0, 0.0])]
    gen = torch.Generator().manual_seed(0)
    loss_sum = [(s * torch.rand(s.shape, generator=gen, dtype=torch.float64) * 2).requires_grad_(True) for s in selected]

    def rank_loss(rank):
        return reduce_terms(loss_sum[rank], selected[rank], labels[rank], num_classes, reduction, world=2)

    losses = _on_two_ranks(monkeypatch, rank_loss)
    grads = [torch.autograd.grad(loss, terms)[0] for loss, terms in zip(losses, loss_sum, strict=True)]

    combined = torch.cat([t.detach() for t in loss_sum]).requires_grad_(True)
    expected = _by_hand(combined, torch.cat(selected), torch.cat(labels), num_classes, reduction)
    (expected_grad,) = torch.autograd.grad(expected, combined)
    torch.testing.assert_close((losses[0] + losses[1]) / 2, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat(grads) / 2, expected_grad, atol=1e-12, rtol=0)
