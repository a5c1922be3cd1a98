"""The Triton backend against the reference: forward, backward and the ring-buffer update.

Runs on CPU tensors through Triton's interpreter (tests/conftest.py switches it on when there is
no GPU) and on CUDA tensors when a GPU is present. Shapes are small but cross every tile edge of
both the interpreter's and the GPU's default tile sizes (``tiles.py``; every candidate: ``test_tiles.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import cossim_fast
from cossim_fast.backends.reference import ReferenceBackend, dense_similarity
from cossim_fast.backends.ring_buffer import ring_buffer_update_torch
from cossim_fast.backends.triton import (
    TritonBackend,
    fp32_precision,
    set_fp32_precision,
)
from cossim_fast.backends.triton import backend as triton_backend
from triton_cases import (
    DEVICES,
    DTYPES,
    FP32_PRECISION_TOLERANCES,
    IGNORE,
    TOLERANCES,
    assert_same_all,
    assert_same_max,
    make_case,
)

TRITON, REFERENCE = TritonBackend(), ReferenceBackend()

pytestmark = pytest.mark.skipif(not DEVICES, reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1")


# name: (K, M, C, counts, N, images). M and C straddle the tiles; counts mix full, empty,
# partial and single-slot buckets.
SHAPES = {
    "small_c": (4, 150, 20, [150, 0, 67, 1], 300, 2),
    "large_c": (3, 150, 300, [150, 93, 0], 160, 1),
    "m_below_tile": (2, 5, 7, [5, 3], 37, 1),
    "c_one_chunk_plus_one": (2, 40, 65, [40, 33], 70, 1),
}


def max_forward_both(features, labels, bank, counts):
    return TRITON.max_forward(features, labels, bank, counts, IGNORE), REFERENCE.max_forward(features, labels, bank, counts, IGNORE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_max_forward_matches_reference(shape, dtype, device):
    num_classes, slots, dim, counts, num_rows, images = SHAPES[shape]
    features, labels, bank, counts = make_case(num_classes, slots, dim, counts, num_rows, dtype=dtype, device=device, images=images)
    if shape == "small_c":  # class 0 gets a single row; class 1 rows meet an empty bucket
        labels[labels == 0] = 2
        labels[7] = 0
    got, want = max_forward_both(features, labels, bank, counts)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    assert_same_max(features, labels, bank, counts, got, want, dtype)
    empty = (labels == IGNORE) | (counts[labels.clamp(max=num_classes - 1)] == 0)
    assert torch.equal(got[1][empty], torch.full_like(got[1][empty], -1))
    assert torch.isneginf(got[0][empty]).all() and not torch.isinf(got[0][~empty]).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["tf32x3", "tf32"])
@pytest.mark.parametrize("shape", ["small_c", "large_c"])
def test_fp32_dot_precisions_match_reference(shape, precision, device):
    # The fp32 choices other than the exact default, within their stated tolerances (the
    # interpreter dots fp32 exactly whatever the precision: a GPU tells them apart).
    num_classes, slots, dim, counts, num_rows, images = SHAPES[shape]
    features, labels, bank, counts = make_case(
        num_classes, slots, dim, counts, num_rows, dtype=torch.float32, device=device, images=images
    )
    tolerances = FP32_PRECISION_TOLERANCES[precision]
    before = fp32_precision()
    set_fp32_precision(precision)
    try:
        got, want = max_forward_both(features, labels, bank, counts)
        assert_same_max(features, labels, bank, counts, got, want, torch.float32, tolerances)
        if precision == "tf32x3":  # at tf32's 2e-3, too many similarities lie that near the threshold
            all_got = TRITON.all_forward(features, labels, bank, counts, 0.05, IGNORE)
            assert_same_all(features, labels, bank, counts, all_got, torch.float32, tolerances=tolerances)
    finally:
        set_fp32_precision(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_rows_one_class_and_mixed_dtypes(dtype, device):
    features, labels, bank, counts = make_case(3, 70, 40, [10, 70, 0], 150, dtype=dtype, device=device)
    labels = torch.ones_like(labels)
    assert_same_max(features, labels, bank, counts, *max_forward_both(features, labels, bank, counts), dtype)
    # A bank in another dtype than the features: both are dotted in fp32.
    other = bank.float() if dtype != torch.float32 else bank.half()
    assert_same_max(features, labels, other, counts, *max_forward_both(features, labels, other, counts), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_pick_the_lowest_slot(dtype, device):
    # One-hot bank entries and integer features: every dot product is exact in every dtype and
    # any summation order, so duplicates tie exactly, inside a slot tile and across tiles.
    num_classes, slots, dim = 2, 150, 20
    axes = (torch.arange(slots) % dim).expand(num_classes, slots)
    bank = torch.nn.functional.one_hot(axes, dim).float()
    for cls in range(num_classes):
        for slot in (5, 40, 70, 100, 140):  # duplicates of slot 2 in later tiles (32, 64, 128 wide)
            bank[cls, slot] = bank[cls, 2]
    features = torch.zeros(1, 6, dim)
    features[0, :, 2] = 3.0  # best: slot 2 and its duplicates
    features[0, 1, 5] = 3.0  # axis 5 (slots 25, 45, ...) ties with axis 2: slot 2 still wins
    features[0, 2, 2] = -1.0  # all dots <= 0: the max is 0, many-way tie -> slot of the first zero
    features[0, 3] = -1.0  # every dot is -1: a full tie -> slot 0
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    counts = torch.tensor([slots, 120])
    features, labels, bank, counts = (t.to(device) for t in (features.to(dtype), labels, bank.to(dtype), counts))
    (values, indices), (ref_values, ref_indices) = max_forward_both(features, labels, bank, counts)
    assert torch.equal(indices, ref_indices)
    assert indices.tolist() == [2, 2, 0, 0, 2, 2]
    torch.testing.assert_close(values, ref_values, atol=TOLERANCES[dtype]["sim"], rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["small_c", "large_c", "m_below_tile"])
def test_all_forward_matches_reference(shape, dtype, device):
    num_classes, slots, dim, counts, num_rows, images = SHAPES[shape]
    features, labels, bank, counts = make_case(num_classes, slots, dim, counts, num_rows, dtype=dtype, device=device, images=images)
    threshold = 0.05
    count, ssum, dsum = TRITON.all_forward(features, labels, bank, counts, threshold, IGNORE)
    ref_count, ref_ssum, ref_dsum = REFERENCE.all_forward(features, labels, bank, counts, threshold, IGNORE)
    assert count.dtype == torch.int64 and ssum.dtype == dsum.dtype == torch.float32
    tol = TOLERANCES[dtype]
    # Rows with a similarity within the tolerance of the threshold may select differently.
    sim = dense_similarity(features, labels, bank, counts, IGNORE)
    sure = ((sim - threshold).abs() > tol["sim"]).all(dim=1)
    assert sure.float().mean() > 0.9
    assert torch.equal(count[sure], ref_count[sure])
    torch.testing.assert_close(ssum[sure], ref_ssum[sure], atol=tol["sim"] * slots, rtol=0)
    torch.testing.assert_close(dsum[sure], ref_dsum[sure], atol=tol["dsum"], rtol=0)
    assert (count[labels == IGNORE] == 0).all() and (dsum[labels == IGNORE] == 0).all()


def _grad_tol(dtype):
    rtol, atol = TOLERANCES[dtype]["grad"]
    return {"rtol": rtol, "atol": atol}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["small_c", "large_c"])
def test_backward_kernels_match_reference(shape, dtype, device):
    num_classes, slots, dim, counts, num_rows, images = SHAPES[shape]
    features, labels, bank, counts = make_case(num_classes, slots, dim, counts, num_rows, dtype=dtype, device=device, images=images)
    values, indices = REFERENCE.max_forward(features, labels, bank, counts, IGNORE)
    grad = torch.randn(labels.shape, device=device)
    grad[::5] = 0.0  # rows that carry no gradient skip the gather
    got = TRITON.max_backward(grad, features, labels, bank, values, indices)
    want = REFERENCE.max_backward(grad, features, labels, bank, values, indices)
    assert got.shape == (labels.numel(), dim) and got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, **_grad_tol(dtype))
    assert (got[indices == -1] == 0).all()

    _, ssum, dsum = REFERENCE.all_forward(features, labels, bank, counts, 0.05, IGNORE)
    got = TRITON.all_backward(grad, features, ssum, dsum)
    want = REFERENCE.all_backward(grad, features, ssum, dsum)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **_grad_tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_two_runs_are_bitwise_identical(device):
    num_classes, slots, dim, counts, num_rows, _ = SHAPES["large_c"]
    features, labels, bank, counts = make_case(num_classes, slots, dim, counts, num_rows, dtype=torch.bfloat16, device=device)
    for run in (
        lambda: TRITON.max_forward(features, labels, bank, counts, IGNORE),
        lambda: TRITON.all_forward(features, labels, bank, counts, 0.0, IGNORE),
    ):
        first, second = run(), run()
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    values, indices = TRITON.max_forward(features, labels, bank, counts, IGNORE)
    grad = torch.randn(labels.shape, device=device)
    assert torch.equal(
        TRITON.max_backward(grad, features, labels, bank, values, indices),
        TRITON.max_backward(grad, features, labels, bank, values, indices),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_public_api_matches_reference(device):
    cossim_fast.set_strict(True)  # no silent fallback to another backend
    features, labels, bank, counts = make_case(3, 40, 24, [40, 13, 0], 2 * 6 * 7, dtype=torch.float32, device=device, images=2)
    maps = features.transpose(1, 2).reshape(2, 24, 6, 7)  # B x C x H x W, labels B x H x W
    maps_labels = labels.reshape(2, 6, 7)
    values, indices = cossim_fast.max_cosine_similarity(maps, maps_labels, bank, counts, backend="triton")
    ref_values, ref_indices = cossim_fast.max_cosine_similarity(maps, maps_labels, bank, counts, backend="reference")
    assert values.shape == indices.shape == (2, 6, 7)
    assert_same_max(features, labels, bank, counts, (values.reshape(-1), indices.reshape(-1)),
                    (ref_values.reshape(-1), ref_indices.reshape(-1)), torch.float32)
    for mode in ("max", "all"):
        grads = []
        for backend in ("triton", "reference"):
            leaf = maps.detach().clone().requires_grad_(True)
            loss = cossim_fast.cosine_similarity_loss(leaf, maps_labels, bank, counts, 0.05, mode=mode, backend=backend)
            loss.backward()
            grads.append((loss.detach(), leaf.grad))
        torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-5)


# --- the ring-buffer update: bitwise equal to ring_buffer_update_torch ------------------------


def _update_both(bank, counts, ptr, features, labels, order, denom, cap):
    ours = [t.clone() for t in (bank, counts, ptr)]
    theirs = [t.clone() for t in (bank, counts, ptr)]
    TRITON.update(*ours, features, labels, order, denom, cap, IGNORE)
    ring_buffer_update_torch(*theirs, features, labels, order, denom, cap, IGNORE)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    return ours


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bank_dtype", DTYPES)
@pytest.mark.parametrize(
    "case",
    ["fresh", "wrap_around", "more_rows_than_slots", "cap", "order", "strided_bf16_features", "ptr_out_of_range"],
)
def test_update_is_bitwise_the_torch_update(case, bank_dtype, device):
    num_classes, slots, dim = 4, 9, 37
    gen = torch.Generator().manual_seed(1)
    bank = torch.nn.functional.normalize(torch.randn(num_classes, slots, dim, generator=gen), dim=2).to(bank_dtype)
    counts = torch.tensor([0, 9, 4, 9])
    ptr = torch.tensor([0, 7, 4, 8]) if case != "fresh" else torch.zeros(4, dtype=torch.int64)
    if case == "ptr_out_of_range":  # value checks off: both wrap the head, no class writes another's slots
        ptr = torch.tensor([11, -1, 20, -10])
    num_rows = 60 if case in ("more_rows_than_slots", "cap", "order") else 23
    features = torch.randn(num_rows, dim, generator=gen) * 2
    if case == "strided_bf16_features":
        features = features.to(torch.bfloat16).T.contiguous().T  # column-major rows
    labels = torch.randint(0, num_classes, (num_rows,), generator=gen)
    labels[torch.rand(num_rows, generator=gen) < 0.2] = IGNORE
    order = torch.randperm(num_rows, generator=gen) if case == "order" else None
    cap = 5 if case == "cap" else -1
    features, labels, bank, counts, ptr = (t.to(device) for t in (features.unsqueeze(0), labels, bank, counts, ptr))
    order = order.to(device) if order is not None else None
    denom = torch.linalg.vector_norm(features, dim=2, dtype=torch.float32).clamp_min(1e-12).reshape(-1)
    new_bank = _update_both(bank, counts, ptr, features, labels, order, denom, cap)[0]
    assert not torch.equal(new_bank, bank)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16 -> inf, on purpose
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
def test_update_rounds_to_nearest_even(bank_dtype, device):
    # fp32 values exactly halfway between two bf16/fp16 neighbours, just below and just above.
    bits = torch.arange(64, dtype=torch.int32) << 11  # covers the fp16 (bit 12) and bf16 (bit 15) ties
    base = torch.tensor([0x3F800000, 0x3F810000, 0xBF818000, 0x00400000, 0x477FE000], dtype=torch.int64).to(torch.int32)
    rows = (base[:, None] + bits[None, :]).view(torch.float32)  # 5 x 64, one row per class slot
    features = rows.unsqueeze(0).to(device)
    labels = torch.zeros(5, dtype=torch.int64, device=device)
    bank = torch.zeros(1, 5, 64, dtype=bank_dtype, device=device)
    zeros = torch.zeros(1, dtype=torch.int64, device=device)
    denom = torch.ones(5, device=device)
    _update_both(bank, zeros, zeros.clone(), features, labels, None, denom, -1)


# --- reasons and settings ---------------------------------------------------------------------


def test_unsupported_reasons(monkeypatch):
    cpu, fp32 = torch.device("cpu"), torch.float32
    assert "float64 is not supported" in TRITON.unsupported_reasons("max_forward", cpu, torch.float64)[-1]
    assert "not supported" in TRITON.unsupported_reasons("max_forward", torch.device("meta"), fp32)[0]
    monkeypatch.setattr(triton_backend, "INTERPRET", False)
    assert "interpreter is off" in TRITON.unsupported_reasons("update", cpu, fp32)[0]
    if not torch.cuda.is_available():
        assert TRITON.unsupported_reasons("max_forward", torch.device("cuda"), fp32) == ["no CUDA device"]


def test_a_spelling_of_triton_interpret_that_triton_reads_as_off_is_refused_not_crashed():
    # "1 " was on to the backend and off to Triton: CPU tensors reached compiled kernels and died
    # with "0 active drivers". Now the backend reads the flag from a decorated kernel.
    script = (
        "import warnings, torch, cossim_fast\n"
        "bank = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=2)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    cossim_fast.max_cosine_similarity(torch.randn(4, 8), torch.tensor([0, 1, 0, 1]), bank, torch.tensor([3, 3]), backend='triton')\n"
        "print(any(\"Triton's interpreter is off\" in str(w.message) for w in caught))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1 "}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True", done.stdout + done.stderr[-2000:]


def test_a_gpu_without_the_shared_memory_of_the_16bit_tiles_is_refused(monkeypatch):
    # A T4's 64 KiB: its 16-bit forwards go to the fallback with this reason, not to an
    # OutOfResources at the first launch; fp32 tiles, the backward and the update still fit.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_backend, "_shared_memory_per_block", lambda index: 64 * 1024)
    gpu = torch.device("cuda", 0)
    for op in ("max_forward", "all_forward"):
        for dtype in (torch.bfloat16, torch.float16):
            (reason,) = TRITON.unsupported_reasons(op, gpu, dtype)
            assert "need 96 KiB of shared memory per block, this GPU has 64 KiB" in reason
        assert TRITON.unsupported_reasons(op, gpu, torch.float32) == []
    assert TRITON.unsupported_reasons("max_backward", gpu, torch.bfloat16) == []
    assert TRITON.unsupported_reasons("update", gpu, torch.bfloat16) == []
    monkeypatch.setattr(triton_backend, "_shared_memory_per_block", lambda index: 227 * 1024)  # an H100
    assert TRITON.unsupported_reasons("max_forward", gpu, torch.bfloat16) == []


def test_fp32_precision_setting():
    before = fp32_precision()
    with pytest.raises(ValueError, match="tf32x3"):
        set_fp32_precision("fast")
    set_fp32_precision("tf32")
    try:
        assert triton_backend.dot_precision(torch.float32, torch.float32) == "tf32"
        assert triton_backend.dot_precision(torch.bfloat16, torch.float32) == "tf32"
    finally:
        set_fp32_precision(before)
    assert triton_backend.dot_precision(torch.float16, torch.float16) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_on_cuda():
    features, labels, bank, counts = make_case(3, 70, 300, [70, 5, 0], 100, dtype=torch.bfloat16, device="cuda")
    ptr = torch.zeros_like(counts)
    denom = torch.ones(labels.numel(), device="cuda")
    TRITON.max_forward(features, labels, bank, counts, IGNORE)  # compile outside the check
    TRITON.all_forward(features, labels, bank, counts, 0.1, IGNORE)
    TRITON.update(bank.clone(), counts.clone(), ptr.clone(), features, labels, None, denom, 5, IGNORE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        values, indices = TRITON.max_forward(features, labels, bank, counts, IGNORE)
        TRITON.all_forward(features, labels, bank, counts, 0.1, IGNORE)
        TRITON.max_backward(torch.ones_like(values), features, labels, bank, values, indices)
        TRITON.update(bank, counts, ptr, features, labels, None, denom, 5, IGNORE)
    finally:
        torch.cuda.set_sync_debug_mode("default")
