"""The class grouping every backend shares: the narrow sort keys at their type boundaries."""

import pytest
import torch

from cossim_fast.backends.schedule import _key_dtype, group_by_class


def _grouping_by_hand(labels: torch.Tensor, num_classes: int):
    """Rows of class 0, 1, ..., K-1 in row order, then the rows of no class; counts; starts."""
    values = labels.tolist()
    key = [v if 0 <= v < num_classes else num_classes for v in values]
    rows = sorted(range(len(values)), key=key.__getitem__)  # Python's sort is stable
    per_class = torch.zeros(num_classes, dtype=torch.int64)
    for k in key:
        if k < num_classes:
            per_class[k] += 1
    return torch.tensor(rows, dtype=torch.int64), per_class, torch.cumsum(per_class, 0) - per_class


@pytest.mark.parametrize("num_classes", [1, 19, 253, 254, 255, 256, 32766, 32767, 32768, 70000])
def test_grouping_at_the_key_type_boundaries(num_classes):
    gen = torch.Generator().manual_seed(num_classes)
    top = [num_classes - 1, num_classes - 2 if num_classes > 1 else 0]
    labels = torch.cat([
        torch.randint(0, num_classes, (300,), generator=gen),
        torch.tensor([-1, -100, num_classes, num_classes + 1, 255, 1000, 70001, *top]),
    ])
    labels = labels[torch.randperm(labels.numel(), generator=gen)]
    groups = group_by_class(labels, num_classes)
    rows, per_class, first = _grouping_by_hand(labels, num_classes)
    assert torch.equal(groups.rows, rows)
    assert torch.equal(groups.per_class, per_class) and torch.equal(groups.first, first)
    assert groups.rows.dtype == groups.per_class.dtype == groups.first.dtype == torch.int64
    # The rows of no class run from bounds[K] to bounds[K + 1] = N (the Triton kernels' last segment).
    assert groups.bounds.shape == (num_classes + 2,)
    assert groups.bounds[-2] == per_class.sum() and groups.bounds[-1] == labels.numel()


def test_key_dtype_holds_the_no_class_key_and_the_search_end():
    assert _key_dtype(254) == torch.uint8 and _key_dtype(255) == torch.int16
    assert _key_dtype(32766) == torch.int16 and _key_dtype(32767) == torch.int32


def test_grouping_of_no_rows():
    groups = group_by_class(torch.zeros(0, dtype=torch.int64), 5)
    assert groups.rows.numel() == 0 and torch.equal(groups.per_class, torch.zeros(5, dtype=torch.int64))
