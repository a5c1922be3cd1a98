"""The row tiles the forward kernels find themselves (``max_similarity.tile_rows``).

Each program derives its (class, row tile) from the class bounds of the rows sorted by class;
here every program of the grid writes what it found, and that must be the plain cut of each
class's rows (then the rows of no class) into tiles of ``BLOCK_M``, in order, with every
program past the last tile finding nothing.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

from cossim_fast.backends.reference import ReferenceBackend
from cossim_fast.backends.schedule import group_by_class, max_row_tiles
from cossim_fast.backends.triton import TritonBackend, backend, max_similarity, thresholded_sum, tiles
from cossim_fast.backends.triton.max_similarity import class_block, tile_rows
from triton_cases import DEVICES, IGNORE, assert_same_all, assert_same_max, make_case

pytestmark = pytest.mark.skipif(not DEVICES, reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1")


@triton.jit
def _found_tiles_kernel(
    bounds_ptr, num_classes, sorted_rows_ptr, classes_ptr, rows_ptr,
    BLOCK_M: tl.constexpr, CLASS_BLOCK: tl.constexpr,
):
    tile = tl.program_id(0)
    cls, rows, row_mask = tile_rows(bounds_ptr, num_classes, sorted_rows_ptr, tile, BLOCK_M, CLASS_BLOCK)
    tl.store(classes_ptr + tile, cls)
    tl.store(rows_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M), tl.where(row_mask, rows, -1))


def found_tiles(labels: torch.Tensor, num_classes: int, block_m: int) -> list[tuple[int, list[int]]]:
    """(class, row ids) that each program of the grid finds."""
    groups = group_by_class(labels, num_classes)
    grid = max_row_tiles(labels.numel(), num_classes + 1, block_m)
    classes = torch.full((grid,), -2, dtype=torch.int32, device=labels.device)
    rows = torch.full((grid, block_m), -2, dtype=torch.int64, device=labels.device)
    _found_tiles_kernel[(grid,)](
        groups.bounds, num_classes, groups.rows, classes, rows, BLOCK_M=block_m, CLASS_BLOCK=class_block(num_classes)
    )
    return [(cls, [r for r in tile if r >= 0]) for cls, tile in zip(classes.tolist(), rows.tolist())]


def tiles_by_hand(labels: list[int], num_classes: int, block_m: int) -> list[tuple[int, list[int]]]:
    """Each class's rows in row order (then the rows of no class, as class K) cut into tiles."""
    tiles = []
    for segment in range(num_classes + 1):
        members = [i for i, y in enumerate(labels) if (y if 0 <= y < num_classes else num_classes) == segment]
        tiles += [(segment, members[i : i + block_m]) for i in range(0, len(members), block_m)]
    return tiles


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "labels, num_classes, block_m",
    [
        ([0, 1, 0, 255, 2, 2, 2, 1, 0, 255], 3, 2),
        ([1] * 9, 3, 4),  # all rows one class, empty classes around it
        ([255, 255, 255], 3, 2),  # no row has a class
        ([2], 3, 16),  # fewer rows than a tile
        (list(range(5)) * 7 + [7, -1, -300, 5], 5, 4),  # labels outside [0, K) other than ignore_index
        ([0] * 16 + [1] * 15 + [2] * 17, 3, 16),  # classes of exactly, just under and just over a tile
        ([0, 0, 0], 1, 2),  # one class: the segment table is two wide
    ],
)
def test_programs_find_the_tiles_of_each_class_in_order(labels, num_classes, block_m, device):
    want = tiles_by_hand(labels, num_classes, block_m)
    got = found_tiles(torch.tensor(labels, device=device), num_classes, block_m)
    assert got[: len(want)] == want
    assert all(found == (-1, []) for found in got[len(want) :])  # past the last tile: nothing


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_classes", [19, 31, 32, 70])  # segment tables of 32, 32, 64 and 128
def test_random_labels_over_many_classes(num_classes, device):
    gen = torch.Generator().manual_seed(num_classes)
    labels = torch.randint(0, num_classes, (300,), generator=gen)
    labels[torch.rand(300, generator=gen) < 0.2] = 255
    want = tiles_by_hand(labels.tolist(), num_classes, 8)
    got = found_tiles(labels.to(device), num_classes, 8)
    assert got[: len(want)] == want and all(found == (-1, []) for found in got[len(want) :])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_classes", [1, 3, 254, 255])  # the one-byte sort key holds K up to 254
@pytest.mark.parametrize("dim", [20, 80])  # C resident, C streamed (the interpreter's tiles)
def test_every_row_is_written_over_stale_outputs(num_classes, dim, device):
    """The outputs start as ``torch.empty``: whatever memory held must never survive, for rows
    of no class, of an empty bucket, or of a bucket, with and without slot splits."""
    if device == "cuda" and num_classes in (1, 254):
        pytest.skip("each K compiles its own kernels: on a GPU, 3 and 255 stand for the others (the time budget)")
    counts = [0] + [40] * (num_classes - 1) if num_classes > 1 else [40]
    features, labels, bank, counts = make_case(num_classes, 40, dim, counts, 70, dtype=torch.float32, device=device)
    groups = group_by_class(labels, num_classes)
    precision = backend.dot_precision(features.dtype, bank.dtype)
    config = tiles.interpreter_config(dim) if backend.INTERPRET else tiles.space("max", dim, False)[0]
    reference = ReferenceBackend().max_forward(features, labels, bank, counts, IGNORE)
    for splits in (1, 2, 4):
        values = torch.full((70,), float("nan"), device=device)
        indices = torch.full((70,), -7, device=device)
        max_similarity.launch_max_forward(
            features, bank, counts, groups, values, indices, replace(config, slot_splits=splits), precision
        )
        assert_same_max(features, labels, bank, counts, (values, indices), reference, torch.float32)
    config = tiles.interpreter_config(dim) if backend.INTERPRET else tiles.space("all", dim, False)[0]
    count = torch.full((70,), -7, device=device)
    ssum = torch.full((70,), float("nan"), device=device)
    dsum = torch.full((70, dim), float("nan"), device=device) if config.c_resident else torch.zeros(70, dim, device=device)
    thresholded_sum.launch_all_forward(features, bank, counts, 0.05, groups, count, ssum, dsum, config, precision)
    assert_same_all(features, labels, bank, counts, (count, ssum, dsum), torch.float32)


class _DeviceOps(TorchDispatchMode):
    """Records the ATen ops that do work (a launch each on a GPU); views and bare allocations are free."""

    FREE = frozenset({"view", "_unsafe_view", "as_strided", "slice", "select", "unsqueeze", "alias", "detach", "empty", "empty_strided"})

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.FREE:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["max", "all"])
def test_a_forward_launches_six_small_ops_besides_its_kernels(mode, monkeypatch):
    """Host time per small op dominated the GPU forward at training sizes (about 1 ms at N = 16384
    on an H200, against about 0.2 ms of kernel): the schedule is the class sort and its bounds,
    and the kernels write every row, so the outputs need no fill."""
    launches = []
    kernel = {"max": (max_similarity, "_max_forward_kernel"), "all": (thresholded_sum, "_thresholded_sum_kernel")}[mode]
    monkeypatch.setattr(*kernel, type("Recorded", (), {"__getitem__": lambda self, grid: lambda *a, **k: launches.append(grid)})())
    features, labels = torch.randn(1, 100, 32), torch.randint(0, 19, (100,))
    bank, counts = torch.randn(19, 64, 32), torch.full((19,), 64)
    with _DeviceOps() as recorded:
        if mode == "max":
            TritonBackend().max_forward(features, labels, bank, counts, 255)
        else:
            TritonBackend().all_forward(features, labels, bank, counts, 0.5, 255)
    assert len(launches) == 1
    assert recorded.ops == ["clamp", "remainder_", "_to_copy", "sort", "arange", "searchsorted"], recorded.ops
