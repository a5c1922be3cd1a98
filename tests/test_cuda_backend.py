"""The CUDA backend's cosine-similarity kernels (csrc/cuda/cosine_similarity_kernels.cuh).

CPU-runnable: op schemas, every host-side argument check (through the CPU kernel, which runs the
same checks and then refuses), fake kernels under FakeTensorMode and on meta tensors,
``CudaBackend.unsupported_reasons`` and the precision setting.

The kernels against the "reference" backend on odd shapes, every dtype and fp32 precision, exact
ties, bitwise determinism, gradients, and agreement with the Triton backend: on a GPU (marked
``gpu``, skipped without CUDA by tests/conftest.py) and, everywhere, on the CPU through the
emulation of tests/cuda_emulation, which runs the same kernel source; the public API with
backend="cuda" on both too. GPU only: no host synchronization, opcheck, devices.
"""

from __future__ import annotations

import re

import pytest
import torch

import cossim_fast
from cossim_fast import _extension
from cossim_fast.backends import cuda as cuda_backend
from cossim_fast.backends import dispatch
from cossim_fast.backends.cuda import CudaBackend
from cossim_fast.backends.schedule import group_by_class
from cossim_fast.backends.reference import ReferenceBackend, dense_similarity
from cuda_emulation import EmulatedCudaBackend

pytestmark = pytest.mark.skipif(
    _extension.load_error is not None and _extension.load_error.startswith(_extension.NOT_BUILT),
    reason=f"compiled extension not installed: {_extension.load_error}",
)

IGNORE = 255
CUDA, REFERENCE = CudaBackend(), ReferenceBackend()
HAS_CUDA = torch.cuda.is_available()

SCHEMAS = {
    "cuda_max_forward": (
        "cossim_fast::cuda_max_forward(Tensor features, Tensor labels, Tensor bank, Tensor counts, Tensor rows, "
        "Tensor bounds, int tile_rows, str fp32_precision) -> (Tensor values, Tensor indices)"
    ),
    "cuda_all_forward": (
        "cossim_fast::cuda_all_forward(Tensor features, Tensor labels, Tensor bank, Tensor counts, Tensor rows, "
        "Tensor bounds, int tile_rows, float threshold, str fp32_precision) -> (Tensor count, Tensor ssum, Tensor dsum)"
    ),
    "cuda_max_backward": (
        "cossim_fast::cuda_max_backward(Tensor grad_values, Tensor features, Tensor labels, Tensor bank, "
        "Tensor values, Tensor indices) -> Tensor"
    ),
    "cuda_all_backward": (
        "cossim_fast::cuda_all_backward(Tensor grad_ssum, Tensor features, Tensor ssum, Tensor dsum) -> Tensor"
    ),
}
ARGUMENTS = {
    "cuda_max_forward": ("features", "labels", "bank", "counts", "rows", "bounds", "tile_rows", "fp32_precision"),
    "cuda_all_forward": (
        "features", "labels", "bank", "counts", "rows", "bounds", "tile_rows", "threshold", "fp32_precision"
    ),
    "cuda_max_backward": ("grad_values", "features", "labels", "bank", "values", "indices"),
    "cuda_all_backward": ("grad_ssum", "features", "ssum", "dsum"),
}


def op(name):
    return getattr(torch.ops.cossim_fast, name)


def prefix(name):
    return f"cossim_fast::{name}: "


# --------------------------------------------------------------------------------------------
# Registration


def test_extension_has_the_cosine_ops():
    assert _extension.load_error is None, _extension.load_error
    assert _extension.has_cosine_ops()
    assert _extension.fake_error is None, _extension.fake_error


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_op_schema(name):
    schema = op(name).default._schema
    assert str(schema) == SCHEMAS[name]
    assert not schema.is_mutable


# --------------------------------------------------------------------------------------------
# Host-side argument checks (CPU tensors: the CPU kernel runs the same checks, then refuses)


def valid_args(name, device="cpu", feature_dtype=torch.float32, bank_dtype=torch.float32):
    """A valid call: K=3, M=4, C=5, features the strided (B, H*W, C) view of a B x C x H x W map."""
    num_classes, slots, dim, batch, height, width = 3, 4, 5, 2, 2, 3
    num_rows = batch * height * width
    maps = torch.randn(batch, dim, height, width, device=device).to(feature_dtype)
    features = maps.flatten(2).transpose(1, 2)  # (B, P, C), channel stride P
    labels = torch.randint(0, num_classes, (num_rows,), device=device)
    bank = torch.nn.functional.normalize(torch.randn(num_classes, slots, dim, device=device), dim=2).to(bank_dtype)
    counts = torch.tensor([4, 0, 2], device=device)
    if name in ("cuda_max_forward", "cuda_all_forward"):
        groups = group_by_class(labels, num_classes)
        args = dict(features=features, labels=labels, bank=bank, counts=counts, rows=groups.rows, bounds=groups.bounds, tile_rows=4)
        if name == "cuda_all_forward":
            args["threshold"] = 0.1
        args["fp32_precision"] = "ieee"
        return args
    if name == "cuda_max_backward":
        return dict(
            grad_values=torch.ones(num_rows, device=device),
            features=features,
            labels=labels,
            bank=bank,
            values=torch.zeros(num_rows, device=device),
            indices=torch.zeros(num_rows, dtype=torch.int64, device=device),
        )
    return dict(
        grad_ssum=torch.ones(num_rows, device=device),
        features=features,
        ssum=torch.zeros(num_rows, device=device),
        dsum=torch.zeros(num_rows, dim, device=device),
    )


def call(name, args):
    return op(name)(*(args[key] for key in ARGUMENTS[name]))


def _set(key, value_of):
    def change(args):
        args[key] = value_of(args)

    return change


def _noncontig(t):
    return t.repeat_interleave(2, dim=0)[::2] if t.dim() else t


FORWARD = ("cuda_max_forward", "cuda_all_forward")
BAD_ARGUMENTS = [
    # (id, ops, change, argument named, pattern)
    ("features-2d", FORWARD, _set("features", lambda a: a["features"][0]), "features", "3-D"),
    ("features-dtype", FORWARD, _set("features", lambda a: a["features"].double()), "features", "float32, bfloat16 or float16"),
    ("features-int", FORWARD, _set("features", lambda a: a["features"].int()), "features", "float32, bfloat16 or float16"),
    ("labels-dtype", FORWARD, _set("labels", lambda a: a["labels"].int()), "labels", r"int64 \(torch.long\), got Int"),
    ("labels-shape", FORWARD, _set("labels", lambda a: a["labels"][:-1]), "labels", r"shape \(12,\) = \(B\*P,\)"),
    ("labels-noncontig", FORWARD, _set("labels", lambda a: _noncontig(a["labels"])), "labels", "contiguous"),
    ("bank-2d", FORWARD, _set("bank", lambda a: a["bank"][0]), "bank", "3-D"),
    ("bank-dtype", FORWARD, _set("bank", lambda a: a["bank"].double()), "bank", "float32, bfloat16 or float16"),
    ("bank-noncontig", FORWARD, _set("bank", lambda a: a["bank"].transpose(0, 1).contiguous().transpose(0, 1)), "bank", "contiguous"),
    ("bank-channels", FORWARD, _set("bank", lambda a: a["bank"][..., :4].contiguous()), "bank", "C = 5"),
    ("counts-dtype", FORWARD, _set("counts", lambda a: a["counts"].int()), "counts", r"int64 \(torch.long\), got Int"),
    ("counts-shape", FORWARD, _set("counts", lambda a: a["counts"][:2]), "counts", r"shape \(3,\) = \(K,\)"),
    ("counts-noncontig", FORWARD, _set("counts", lambda a: _noncontig(a["counts"])), "counts", "contiguous"),
    ("rows-dtype", FORWARD, _set("rows", lambda a: a["rows"].int()), "rows", r"int64 \(torch.long\), got Int"),
    ("rows-shape", FORWARD, _set("rows", lambda a: a["rows"][:-1]), "rows", r"shape \(12,\) = \(B\*P,\)"),
    ("rows-noncontig", FORWARD, _set("rows", lambda a: _noncontig(a["rows"])), "rows", "contiguous"),
    ("bounds-dtype", FORWARD, _set("bounds", lambda a: a["bounds"].int()), "bounds", r"int64 \(torch.long\), got Int"),
    ("bounds-shape", FORWARD, _set("bounds", lambda a: a["bounds"][:-1]), "bounds", r"shape \(5,\) = \(K\+2,\)"),
    ("bounds-noncontig", FORWARD, _set("bounds", lambda a: _noncontig(a["bounds"])), "bounds", "contiguous"),
    ("tile-rows", FORWARD, _set("tile_rows", lambda a: 0), "tile_rows", r"in \[1, 2147483647\], got 0"),
    ("tile-rows-huge", FORWARD, _set("tile_rows", lambda a: 2**63 - 1), "tile_rows", r"in \[1, 2147483647\], got 9223372036854775807"),
    ("precision", FORWARD, _set("fp32_precision", lambda a: "fast"), "fp32_precision", r"\"ieee\" or \"tf32\", got \"fast\""),
    # backward "max"
    ("grad-dtype", ("cuda_max_backward",), _set("grad_values", lambda a: a["grad_values"].double()), "grad_values", "float32, got Double"),
    ("grad-shape", ("cuda_max_backward",), _set("grad_values", lambda a: a["grad_values"][:-1]), "grad_values", r"shape \(12,\)"),
    ("grad-noncontig", ("cuda_max_backward",), _set("grad_values", lambda a: torch.ones(24)[::2]), "grad_values", "contiguous"),
    ("grad-stride0", ("cuda_max_backward",), _set("grad_values", lambda a: torch.ones(()).expand(12)), "grad_values", "contiguous"),
    ("mb-features", ("cuda_max_backward",), _set("features", lambda a: a["features"].double()), "features", "float32, bfloat16 or float16"),
    ("mb-labels", ("cuda_max_backward",), _set("labels", lambda a: a["labels"].int()), "labels", "int64"),
    ("mb-bank", ("cuda_max_backward",), _set("bank", lambda a: a["bank"][..., :4].contiguous()), "bank", "C = 5"),
    ("mb-values", ("cuda_max_backward",), _set("values", lambda a: a["values"].half()), "values", "float32, got Half"),
    ("mb-indices", ("cuda_max_backward",), _set("indices", lambda a: a["indices"][:3]), "indices", r"shape \(12,\)"),
    # backward "all"
    ("gs-dtype", ("cuda_all_backward",), _set("grad_ssum", lambda a: a["grad_ssum"].bfloat16()), "grad_ssum", "float32, got BFloat16"),
    ("ab-features", ("cuda_all_backward",), _set("features", lambda a: a["features"].reshape(12, 5)), "features", "3-D"),
    ("ab-ssum", ("cuda_all_backward",), _set("ssum", lambda a: _noncontig(a["ssum"])), "ssum", "contiguous"),
    ("ab-dsum-dtype", ("cuda_all_backward",), _set("dsum", lambda a: a["dsum"].half()), "dsum", "float32, got Half"),
    ("ab-dsum-shape", ("cuda_all_backward",), _set("dsum", lambda a: a["dsum"][:, :4]), "dsum", r"shape \(12, 5\) = \(B\*P, C\)"),
    ("ab-dsum-noncontig", ("cuda_all_backward",), _set("dsum", lambda a: a["dsum"].t().contiguous().t()), "dsum", "contiguous"),
]
BAD_CASES = [(case_id, name, change, arg, pattern) for case_id, names, change, arg, pattern in BAD_ARGUMENTS for name in names]


@pytest.mark.parametrize(
    "name, change, argument, pattern", [c[1:] for c in BAD_CASES], ids=[f"{c[1]}-{c[0]}" for c in BAD_CASES]
)
def test_argument_checks(name, change, argument, pattern):
    args = valid_args(name)
    change(args)
    with pytest.raises(RuntimeError, match=re.escape(prefix(name) + argument + " must ") + ".*" + pattern) as info:
        call(name, args)
    assert not isinstance(info.value, NotImplementedError), "the check should have fired before the CUDA refusal"


DEVICE_CASES = [(name, key) for name in SCHEMAS for key in ARGUMENTS[name] if key not in ("features", "threshold", "tile_rows", "fp32_precision")]


@pytest.mark.parametrize("name, argument", DEVICE_CASES, ids=[f"{n}-{a}" for n, a in DEVICE_CASES])
def test_device_checks(name, argument):
    """Every tensor must be on features' device (checked on the CPU kernel with one meta tensor)."""
    args = valid_args(name)
    args[argument] = args[argument].to("meta")
    cpu_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    expected = re.escape(f"{prefix(name)}{argument} must be on the same device as features (cpu), got meta")
    with pytest.raises(RuntimeError, match=expected):
        op(name).default.redispatch(cpu_only, *(args[key] for key in ARGUMENTS[name]))


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize(
    "feature_dtype, bank_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16)],
    ids=["fp32", "bf16", "fp16-bf16"],
)
def test_valid_cpu_call_is_refused_clearly(name, feature_dtype, bank_dtype):
    args = valid_args(name, feature_dtype=feature_dtype, bank_dtype=bank_dtype)
    pattern = re.escape(prefix(name)) + r"this compiled kernel needs CUDA tensors, got tensors on cpu.*\"torch\" backend serves CPU"
    with pytest.raises(NotImplementedError, match=pattern):
        call(name, args)


def test_tf32_precision_passes_the_checks():
    args = valid_args("cuda_max_forward")
    args["fp32_precision"] = "tf32"
    with pytest.raises(NotImplementedError, match="needs CUDA tensors"):
        call("cuda_max_forward", args)


# --------------------------------------------------------------------------------------------
# Fake kernels (torch.compile, FakeTensorMode); opcheck needs CUDA tensors (GPU test below)

EXPECTED_SHAPES = {
    "cuda_max_forward": [((12,), torch.float32), ((12,), torch.int64)],
    "cuda_all_forward": [((12,), torch.int64), ((12,), torch.float32), ((12, 5), torch.float32)],
    "cuda_max_backward": [((12, 5), torch.bfloat16)],
    "cuda_all_backward": [((12, 5), torch.bfloat16)],
}


def _outputs(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_fake_kernel_runs_under_fake_tensor_mode(name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = valid_args(name, feature_dtype=torch.bfloat16, bank_dtype=torch.bfloat16)
    with FakeTensorMode() as mode:
        args = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in real.items()}
        outputs = _outputs(call(name, args))
    assert [(tuple(o.shape), o.dtype) for o in outputs] == EXPECTED_SHAPES[name]


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_fake_kernel_runs_on_meta_tensors(name):
    real = valid_args(name, feature_dtype=torch.bfloat16, bank_dtype=torch.bfloat16)
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in real.items()}
    outputs = _outputs(call(name, args))
    assert all(o.device.type == "meta" for o in outputs)
    assert [(tuple(o.shape), o.dtype) for o in outputs] == EXPECTED_SHAPES[name]


# --------------------------------------------------------------------------------------------
# The backend object and the precision setting


def test_cuda_backend_reasons_on_cpu():
    assert CUDA.name == "cuda"
    assert set(cuda_backend.IMPLEMENTED) == {"max_forward", "max_backward", "all_forward", "all_backward", "update"}
    for name in ("max_forward", "max_backward", "all_forward", "all_backward", "update"):
        reasons = CUDA.unsupported_reasons(name, torch.device("cpu"), torch.float32)
        assert any("tensors are on cpu" in reason for reason in reasons)
        assert not any("not implemented" in reason for reason in reasons)
    reasons = CUDA.unsupported_reasons("max_forward", torch.device("cuda"), torch.float64)
    assert any("float64 is not supported" in reason for reason in reasons)
    assert any("unknown operation" in r for r in CUDA.unsupported_reasons("bogus", torch.device("cuda"), torch.float32))
    forward = CUDA.unsupported_reasons("max_forward", torch.device("cuda"), torch.bfloat16)
    if _extension.has_cuda_kernels() and HAS_CUDA and torch.cuda.get_device_capability() >= (8, 0):
        assert forward == []
    elif not _extension.has_cuda_kernels():
        assert any("without CUDA kernels" in reason for reason in forward)


def test_auto_never_picks_cuda_on_cpu():
    assert cossim_fast.backends.dispatch.select("max_forward", "auto", torch.device("cpu"), torch.float32).name != "cuda"


def test_fp32_precision_setting(monkeypatch):
    before = cuda_backend.fp32_precision()
    assert before in cuda_backend.FP32_PRECISIONS
    with pytest.raises(ValueError, match="ieee"):
        cuda_backend.set_fp32_precision("tf32x3")
    cuda_backend.set_fp32_precision("tf32")
    try:
        assert cuda_backend.fp32_precision() == "tf32"
    finally:
        cuda_backend.set_fp32_precision(before)
    # The environment variable: a bad value is reported as a reason, not raised at import.
    monkeypatch.setenv(cuda_backend.PRECISION_ENV, "TF32")
    assert cuda_backend._read_precision() == ("tf32", None)
    monkeypatch.setenv(cuda_backend.PRECISION_ENV, "fast")
    value, error = cuda_backend._read_precision()
    assert value == "ieee" and "COSSIM_FAST_CUDA_FP32_PRECISION" in error and "'fast'" in error
    monkeypatch.setattr(cuda_backend, "_precision_error", error)
    assert error in CUDA.unsupported_reasons("max_forward", torch.device("cuda"), torch.float32)
    assert error not in CUDA.unsupported_reasons("max_backward", torch.device("cuda"), torch.float32)


# ============================================================================================
# The kernels against the reference: on a GPU, and on the CPU through the CUDA emulation
# ============================================================================================

gpu = pytest.mark.gpu


DTYPES = [torch.float32, torch.bfloat16, torch.float16]

#: Tolerances in one table, by (feature dtype, fp32 precision). "sim": values, ssum per term and
#: the near-tie / near-threshold margin; "dsum": sums of up to M unit vectors; "grad": (rtol,
#: atol) of gradients rounded to the feature dtype. ieee and 16-bit inputs have exact products
#: accumulated in fp32 (only summation order and where the norm is applied differ from the
#: reference); tf32 rounds both inputs to 10 mantissa bits.
TOLERANCES = {
    (torch.float32, "ieee"): {"sim": 1e-5, "dsum": 1e-4, "grad": (1e-5, 1e-6)},
    (torch.float32, "tf32"): {"sim": 5e-3, "dsum": 1e-4, "grad": (1e-5, 1e-6)},
    (torch.bfloat16, "ieee"): {"sim": 1e-5, "dsum": 1e-4, "grad": (8e-3, 1e-5)},
    (torch.float16, "ieee"): {"sim": 1e-5, "dsum": 1e-4, "grad": (1e-3, 1e-5)},
}

# name: (K, M, C, counts, N, images). N, M, C off the 64/64/32 tiles; M below a tile; C below
# one channel chunk (32 channels), one chunk plus one, two plus one, several chunks; full,
# partial, single-slot and empty buckets. images > 1: features are the strided view of a
# B x C x H x W map (channel stride P). Only the "vector_loads" shapes take the 16-byte loads,
# which the bf16/fp16 kernels make cp.async copies (C a multiple of 8, contiguous rows).
SHAPES = {
    "small": (4, 150, 20, [150, 0, 67, 1], 300, 2),
    "m_below_tile": (2, 5, 7, [5, 3], 37, 1),
    "c_chunk_plus_one": (3, 70, 33, [70, 64, 65], 130, 1),
    "c_two_chunks_plus_one": (3, 70, 65, [70, 64, 65], 130, 2),
    "large_c": (3, 150, 300, [150, 93, 0], 160, 1),
    "vector_loads": (5, 200, 264, [200, 128, 1, 0, 129], 333, 1),  # C % 8 == 0: 16-byte loads
    "vector_loads_one_chunk": (3, 200, 32, [200, 0, 130], 300, 1),  # each stage keeps the feature chunk
}


def make_case(device, num_classes, slots, dim, counts, num_rows, *, dtype, bank_dtype=None, images=1, labels=None, seed=0, contiguous=None):
    """Unit-norm bank and (B, P, C) features (strided NCHW view, or contiguous rows)."""
    gen = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(num_classes, slots, dim, generator=gen), dim=2)
    points = num_rows // images
    if labels is None:
        labels = torch.randint(0, num_classes, (images * points,), generator=gen)
        labels[torch.rand(images * points, generator=gen) < 0.1] = IGNORE
    if contiguous if contiguous is not None else images == 1:
        features = (torch.randn(images, points, dim, generator=gen) * 3).to(device=device, dtype=dtype)
    else:
        maps = torch.randn(images, dim, points, generator=gen) * 3
        features = maps.to(device=device, dtype=dtype).transpose(1, 2)  # channel stride P
    counts = torch.as_tensor(counts, dtype=torch.int64, device=device)
    bank = bank.to(device=device, dtype=bank_dtype or dtype)
    return features, labels.to(device), bank, counts


@pytest.fixture
def precision():
    """Restores the backend's fp32 precision after a test that sets it."""
    before = cuda_backend.fp32_precision()
    yield cuda_backend.set_fp32_precision
    cuda_backend.set_fp32_precision(before)


def assert_same_max(features, labels, bank, counts, got, want, tol):
    """Values within tol; indices exact unless the reference's top two are within tol."""
    (values, indices), (ref_values, ref_indices) = got, want
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    torch.testing.assert_close(values, ref_values, atol=tol, rtol=0)
    sim = dense_similarity(features, labels, bank, counts, IGNORE)
    top = sim.topk(min(2, sim.shape[1]), dim=1).values
    second = top[:, 1] if top.shape[1] > 1 else torch.full_like(top[:, 0], float("-inf"))
    clear = (top[:, 0] - second > tol) | (second == float("-inf"))
    assert torch.equal(indices[clear], ref_indices[clear])
    near = ~clear
    slots = bank.shape[1]
    picked = sim[near, labels[near] * slots + indices[near]]
    torch.testing.assert_close(picked, top[near, 0], atol=tol, rtol=0)


def assert_same_all(features, labels, bank, counts, threshold, got, want, tol, min_sure):
    """"all" mode: rows with no similarity within tol["sim"] of the threshold select the same
    slots (count equal, ssum and dsum close); every row stays within what its near-threshold
    similarities could change (each moves count by 1, ssum by about tau, dsum by one unit row)."""
    (count, ssum, dsum), (ref_count, ref_ssum, ref_dsum) = got, want
    sim = dense_similarity(features, labels, bank, counts, IGNORE)
    near = ((sim - threshold).abs() <= tol["sim"]).sum(dim=1)
    sure = near == 0
    assert sure.float().mean() >= min_sure
    assert torch.equal(count[sure], ref_count[sure])
    torch.testing.assert_close(ssum[sure], ref_ssum[sure], atol=tol["sim"] * bank.shape[1], rtol=0)
    torch.testing.assert_close(dsum[sure], ref_dsum[sure], atol=tol["dsum"], rtol=0)
    assert ((count - ref_count).abs() <= near).all()
    ssum_bound = ref_count * tol["sim"] + near * (abs(threshold) + tol["sim"]) + 1e-4
    assert ((ssum - ref_ssum).abs() <= ssum_bound).all()
    dsum_bound = tol["dsum"] + near.float() * bank.float().abs().amax()
    assert ((dsum - ref_dsum).abs() <= dsum_bound[:, None]).all()


CONFIGS = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "ieee"), (torch.float16, "ieee")]
CONFIG_IDS = ["fp32", "tf32", "bf16", "fp16"]


@pytest.mark.parametrize("dtype, fp32", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_max_forward_matches_reference(shape, dtype, fp32, precision, cuda_target):
    precision(fp32)
    num_classes, slots, dim, counts, num_rows, images = SHAPES[shape]
    features, labels, bank, counts = make_case(cuda_target.device, num_classes, slots, dim, counts, num_rows, dtype=dtype, images=images)
    if shape == "small":  # class 0 gets a single row; class 1 rows meet an empty bucket
        labels[labels == 0] = 2
        labels[7] = 0
    tol = TOLERANCES[(dtype, fp32)]["sim"]
    got = cuda_target.backend.max_forward(features, labels, bank, counts, IGNORE)
    want = REFERENCE.max_forward(features, labels, bank, counts, IGNORE)
    assert_same_max(features, labels, bank, counts, got, want, tol)
    empty = (labels == IGNORE) | (counts[labels.clamp(max=num_classes - 1)] == 0)
    assert torch.equal(got[1][empty], torch.full_like(got[1][empty], -1))
    assert torch.isneginf(got[0][empty]).all() and not torch.isinf(got[0][~empty]).any()


@pytest.mark.parametrize("dtype, fp32", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("shape", ["small", "m_below_tile", "large_c", "vector_loads"])
@pytest.mark.parametrize("threshold", [0.05, -0.3])  # below 0: the zero padding past counts[k] would pass
def test_all_forward_matches_reference(shape, threshold, dtype, fp32, precision, cuda_target):
    precision(fp32)
    num_classes, slots, dim, counts, num_rows, images = SHAPES[shape]
    features, labels, bank, counts = make_case(cuda_target.device, num_classes, slots, dim, counts, num_rows, dtype=dtype, images=images)
    count, ssum, dsum = cuda_target.backend.all_forward(features, labels, bank, counts, threshold, IGNORE)
    ref_count, ref_ssum, ref_dsum = REFERENCE.all_forward(features, labels, bank, counts, threshold, IGNORE)
    assert count.dtype == torch.int64 and ssum.dtype == dsum.dtype == torch.float32 and dsum.is_contiguous()
    assert_same_all(features, labels, bank, counts, threshold, (count, ssum, dsum), (ref_count, ref_ssum, ref_dsum),
                    TOLERANCES[(dtype, fp32)], min_sure=0.9 if fp32 == "ieee" else 0.0)
    ignored = labels == IGNORE
    assert (count[ignored] == 0).all() and (ssum[ignored] == 0).all() and (dsum[ignored] == 0).all()


@pytest.mark.parametrize("feature_dtype, bank_dtype", [
    (torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
], ids=["bf16-fp32", "fp32-fp16", "fp16-bf16", "bf16-fp16"])
def test_mixed_dtypes_use_exact_fp32(feature_dtype, bank_dtype, precision, cuda_target):
    precision("tf32")  # ignored for mixed pairs: they are dotted in exact fp32
    features, labels, bank, counts = make_case(cuda_target.device, 3, 70, 40, [10, 70, 0], 150, dtype=feature_dtype, bank_dtype=bank_dtype, images=2)
    got = cuda_target.backend.max_forward(features, labels, bank, counts, IGNORE)
    want = REFERENCE.max_forward(features, labels, bank, counts, IGNORE)
    assert_same_max(features, labels, bank, counts, got, want, 1e-5)
    got = cuda_target.backend.all_forward(features, labels, bank, counts, 0.0, IGNORE)
    want = REFERENCE.all_forward(features, labels, bank, counts, 0.0, IGNORE)
    assert_same_all(features, labels, bank, counts, 0.0, got, want, {"sim": 1e-5, "dsum": 1e-4}, min_sure=0.9)


@pytest.mark.parametrize("dtype, fp32", CONFIGS, ids=CONFIG_IDS)
def test_all_rows_one_class(dtype, fp32, precision, cuda_target):
    precision(fp32)
    features, labels, bank, counts = make_case(cuda_target.device, 3, 70, 40, [10, 70, 0], 150, dtype=dtype)
    labels = torch.ones_like(labels)  # one class, 3 row tiles (64 + 64 + 22)
    tol = TOLERANCES[(dtype, fp32)]["sim"]
    got = cuda_target.backend.max_forward(features, labels, bank, counts, IGNORE)
    assert_same_max(features, labels, bank, counts, got, REFERENCE.max_forward(features, labels, bank, counts, IGNORE), tol)
    assert (got[1] >= 0).all()
    # every row ignored, and a bank whose buckets are all empty
    nothing = torch.full_like(labels, IGNORE)
    values, indices = cuda_target.backend.max_forward(features, nothing, bank, counts, IGNORE)
    assert torch.isneginf(values).all() and (indices == -1).all()
    values, indices = cuda_target.backend.max_forward(features, labels, bank, torch.zeros_like(counts), IGNORE)
    assert torch.isneginf(values).all() and (indices == -1).all()
    count, ssum, dsum = cuda_target.backend.all_forward(features, nothing, bank, counts, -2.0, IGNORE)
    assert (count == 0).all() and (ssum == 0).all() and (dsum == 0).all()


def test_empty_inputs(cuda_target):
    features, labels, bank, counts = make_case(cuda_target.device, 3, 8, 16, [8, 8, 8], 10, dtype=torch.float32)
    values, indices = cuda_target.backend.max_forward(features[:, :0], labels[:0], bank, counts, IGNORE)
    assert values.shape == indices.shape == (0,)
    count, ssum, dsum = cuda_target.backend.all_forward(features[:, :0], labels[:0], bank, counts, 0.0, IGNORE)
    assert count.shape == ssum.shape == (0,) and dsum.shape == (0, 16)
    grad = cuda_target.backend.max_backward(values, features[:, :0], labels[:0], bank, values, indices)
    assert grad.shape == (0, 16)
    no_classes = bank[:0]
    values, indices = cuda_target.backend.max_forward(features, torch.full_like(labels, IGNORE), no_classes, counts[:0], IGNORE)
    assert torch.isneginf(values).all() and (indices == -1).all()



@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_counts_outside_the_bucket_are_clamped(dtype, cuda_target):
    """counts above M read no slot past the bucket (the last class's is the end of the bank),
    negative counts none: as counts clamped to [0, M] (the value checks are the caller's)."""
    slots = 70
    features, labels, bank, _ = make_case(cuda_target.device, 3, slots, 40, [0, 0, 0], 150, dtype=dtype, images=2)
    counts = torch.tensor([slots + 5, -3, slots + 64], device=cuda_target.device)
    clamped = counts.clamp(0, slots)
    got = cuda_target.backend.max_forward(features, labels, bank, counts, IGNORE)
    want = REFERENCE.max_forward(features, labels, bank, clamped, IGNORE)
    assert_same_max(features, labels, bank, clamped, got, want, TOLERANCES[(dtype, "ieee")]["sim"])
    got = cuda_target.backend.all_forward(features, labels, bank, counts, -0.2, IGNORE)
    want = REFERENCE.all_forward(features, labels, bank, clamped, -0.2, IGNORE)
    assert_same_all(features, labels, bank, clamped, -0.2, got, want, TOLERANCES[(dtype, "ieee")], min_sure=0.9)

def _tie_case(device, dtype, bank_dtype=None):
    """Bank entries in {0, +-0.5} and small-integer features: every raw dot is exact in every dtype
    (tf32 included) and any summation order, so duplicated slots tie exactly, within a slot tile
    and across the 64-slot tiles."""
    gen = torch.Generator().manual_seed(3)
    num_classes, slots, dim = 2, 200, 40
    bank = (torch.randint(-1, 2, (num_classes, slots, dim), generator=gen) * 0.5).float()
    for cls in range(num_classes):
        for slot in (9, 40, 63, 64, 100, 130, 199):  # duplicates of slot 5
            bank[cls, slot] = bank[cls, 5]
        bank[cls, 150] = bank[cls, 149]  # a pair straddling nothing special
    features = torch.randint(-3, 4, (1, 12, dim), generator=gen).float()
    for row in (0, 1, 2):  # rows pointing at slot 5 (and its duplicates): best dot, tied 8 ways
        features[0, row] = bank[row % 2, 5] * 2
    features[0, 3] = bank[0, 149] * 2  # tie of 149 and 150 (class 0: all 200 slots valid)
    features[0, 4] = 0.0
    features[0, 4, 0] = 1.0  # many exact ties at various dot values
    features[0, 5] = -1.0  # every dot of a row of ones is a multiple of 0.5: more ties
    labels = torch.tensor([0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 0, 1])
    counts = torch.tensor([slots, 131])
    return features.to(device, dtype), labels.to(device), bank.to(device, bank_dtype or dtype), counts.to(device)


def _exact_argmax(features, labels, bank, counts):
    """The lowest maximal slot over the exact raw dots (float64; every dot here is exact)."""
    out = []
    for row in range(labels.numel()):
        cls = int(labels[row])
        dots = bank[cls, : int(counts[cls])].double() @ features.reshape(-1, bank.shape[2])[row].double()
        out.append(int(torch.nonzero(dots == dots.max())[0]))
    return torch.tensor(out, device=labels.device)


@pytest.mark.parametrize("dtype, fp32", CONFIGS + [(torch.bfloat16, "mixed")], ids=CONFIG_IDS + ["bf16-fp32bank"])
def test_ties_pick_the_lowest_slot(dtype, fp32, precision, cuda_target):
    precision("tf32" if fp32 == "tf32" else "ieee")
    features, labels, bank, counts = _tie_case(cuda_target.device, dtype, torch.float32 if fp32 == "mixed" else None)
    values, indices = cuda_target.backend.max_forward(features, labels, bank, counts, IGNORE)
    expected = _exact_argmax(features, labels, bank, counts)
    assert torch.equal(indices, expected)
    assert indices[:3].tolist() == [5, 5, 5] and int(indices[3]) == 149
    ref_values, _ = REFERENCE.max_forward(features, labels, bank, counts, IGNORE)
    torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype, fp32", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("shape", ["small", "large_c", "vector_loads"])
def test_backward_matches_reference(shape, dtype, fp32, precision, cuda_target):
    precision(fp32)
    num_classes, slots, dim, counts, num_rows, images = SHAPES[shape]
    features, labels, bank, counts = make_case(cuda_target.device, num_classes, slots, dim, counts, num_rows, dtype=dtype, images=images)
    values, indices = REFERENCE.max_forward(features, labels, bank, counts, IGNORE)
    grad = torch.randn(labels.shape, device=cuda_target.device)
    grad[::5] = 0.0  # rows that carry no gradient skip the gather
    rtol, atol = TOLERANCES[(dtype, fp32)]["grad"]
    got = cuda_target.backend.max_backward(grad, features, labels, bank, values, indices)
    want = REFERENCE.max_backward(grad, features, labels, bank, values, indices)
    assert got.shape == (labels.numel(), dim) and got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert (got[indices == -1] == 0).all()
    # an expanded (stride 0) incoming gradient, as autograd passes for a sum
    ones = torch.ones((), device=cuda_target.device).expand(labels.numel())
    torch.testing.assert_close(
        cuda_target.backend.max_backward(ones, features, labels, bank, values, indices),
        REFERENCE.max_backward(ones, features, labels, bank, values, indices), rtol=rtol, atol=atol,
    )

    _, ssum, dsum = REFERENCE.all_forward(features, labels, bank, counts, 0.05, IGNORE)
    got = cuda_target.backend.all_backward(grad, features, ssum, dsum)
    want = REFERENCE.all_backward(grad, features, ssum, dsum)
    assert got.dtype == dtype and got.shape == (labels.numel(), dim)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype, fp32", CONFIGS, ids=CONFIG_IDS)
def test_two_runs_are_bitwise_identical(dtype, fp32, precision, cuda_target):
    precision(fp32)
    num_classes, slots, dim, counts, num_rows, images = SHAPES["large_c"]
    features, labels, bank, counts = make_case(cuda_target.device, num_classes, slots, dim, counts, num_rows, dtype=dtype, images=images)
    runs = (
        lambda: cuda_target.backend.max_forward(features, labels, bank, counts, IGNORE),
        lambda: cuda_target.backend.all_forward(features, labels, bank, counts, 0.0, IGNORE),
    )
    for run in runs:
        first, second = run(), run()
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(first, second))
    values, indices = cuda_target.backend.max_forward(features, labels, bank, counts, IGNORE)
    grad = torch.randn(labels.shape, device=cuda_target.device)
    first = cuda_target.backend.max_backward(grad, features, labels, bank, values, indices)
    assert torch.equal(first.view(torch.uint8), cuda_target.backend.max_backward(grad, features, labels, bank, values, indices).view(torch.uint8))



@pytest.mark.parametrize("dtype, fp32", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("shape", ["small", "c_chunk_plus_one", "vector_loads", "vector_loads_one_chunk"])
def test_emulated_same_bits_in_any_thread_order(shape, dtype, fp32, precision):
    """Emulation only (a GPU picks its own order): the threads of a block between barriers, and
    the blocks of a launch, in index order, reversed and shuffled give the same bits; a race
    would make them depend on the order. The schedules also land the 16-bit kernels' cp.async
    copies at their wait (0), at once (1) or either (random), so a buffer read before its copy
    landed, or overwritten while still read, shows too."""
    precision(fp32)
    emulated = EmulatedCudaBackend()
    num_classes, slots, dim, counts, num_rows, images = SHAPES[shape]
    features, labels, bank, counts = make_case("cpu", num_classes, slots, dim, counts, num_rows, dtype=dtype, images=images)
    grad = torch.randn(labels.shape)
    runs = []
    try:
        for seed in (0, 1, 2, 3):
            emulated.ops.set_schedule(seed)
            values, indices = emulated.max_forward(features, labels, bank, counts, IGNORE)
            count, ssum, dsum = emulated.all_forward(features, labels, bank, counts, -0.1, IGNORE)
            runs.append((values, indices, count, ssum, dsum, emulated.max_backward(grad, features, labels, bank, values, indices),
                         emulated.all_backward(grad, features, ssum, dsum)))
    finally:
        emulated.ops.set_schedule(0)
    for run in runs[1:]:
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(runs[0], run))

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", ["vector_loads", "vector_loads_one_chunk", "small"])
def test_emulated_tiles_of_several_row_groups(shape, dtype, monkeypatch):
    """Emulation only: the backend's tiles are one row group (TILE_ROWS = 64) each, so the
    kernels' loop over the row groups of a longer tile, which restarts the cp.async pipeline,
    runs only here (256-row tiles), against the reference in several thread orders."""
    monkeypatch.setattr(cuda_backend, "TILE_ROWS", 256)
    emulated = EmulatedCudaBackend()
    num_classes, slots, dim, counts, num_rows, images = SHAPES[shape]
    features, labels, bank, counts = make_case("cpu", num_classes, slots, dim, counts, num_rows, dtype=dtype, images=images)
    tol = TOLERANCES[(dtype, "ieee")]
    want_max = REFERENCE.max_forward(features, labels, bank, counts, IGNORE)
    want_all = REFERENCE.all_forward(features, labels, bank, counts, 0.05, IGNORE)
    try:
        for seed in (0, 1, 2):
            emulated.ops.set_schedule(seed)
            got_max = emulated.max_forward(features, labels, bank, counts, IGNORE)
            assert_same_max(features, labels, bank, counts, got_max, want_max, tol["sim"])
            got_all = emulated.all_forward(features, labels, bank, counts, 0.05, IGNORE)
            assert_same_all(features, labels, bank, counts, 0.05, got_all, want_all, tol, min_sure=0.9)
    finally:
        emulated.ops.set_schedule(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tile_rows", [3, 64, 256])
def test_emulated_blocks_find_their_tiles(tile_rows, dtype, monkeypatch):
    """Emulation only: the tile table kernel gives each thread block its class and rows from the
    class bounds. Classes of 0, 1, 64, 65 and 130 rows (empty ones first, between and last) and
    ignored rows, in tiles of 3 (one block per 3 rows), 64 and 256 rows."""
    monkeypatch.setattr(cuda_backend, "TILE_ROWS", tile_rows)
    sizes = [0, 1, 0, 130, 64, 65, 0]
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)] + [torch.full((9,), IGNORE)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
    features, labels, bank, counts = make_case(
        "cpu", len(sizes), 70, 24, [70, 3, 70, 70, 65, 1, 70], labels.numel(), dtype=dtype, labels=labels
    )
    emulated = EmulatedCudaBackend()
    tol = TOLERANCES[(dtype, "ieee")]
    assert_same_max(features, labels, bank, counts, emulated.max_forward(features, labels, bank, counts, IGNORE),
                    REFERENCE.max_forward(features, labels, bank, counts, IGNORE), tol["sim"])
    assert_same_all(features, labels, bank, counts, 0.05, emulated.all_forward(features, labels, bank, counts, 0.05, IGNORE),
                    REFERENCE.all_forward(features, labels, bank, counts, 0.05, IGNORE), tol, min_sure=0.9)


@gpu
def test_no_host_sync():
    features, labels, bank, counts = make_case("cuda", 3, 70, 300, [70, 5, 0], 100, dtype=torch.bfloat16, images=2)
    grad = torch.ones(labels.shape, device="cuda")
    torch.cuda.synchronize()  # every tensor is on the GPU before the check starts
    torch.cuda.set_sync_debug_mode("error")
    try:
        values, indices = CUDA.max_forward(features, labels, bank, counts, IGNORE)
        _, ssum, dsum = CUDA.all_forward(features, labels, bank, counts, 0.1, IGNORE)
        CUDA.max_backward(grad, features, labels, bank, values, indices)
        CUDA.all_backward(grad, features, ssum, dsum)
        CUDA.max_forward(features.float(), labels, bank.float(), counts, IGNORE)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_public_api_and_gradients_match_reference(cuda_target, monkeypatch):
    """backend="cuda" through the public functions, the custom ops and the autograd.Functions
    (the emulation stands in for the "cuda" backend on the CPU)."""
    cossim_fast.set_strict(True)  # no silent fallback to another backend
    if cuda_target.device == "cpu":
        load = dispatch.load_backend
        monkeypatch.setattr(dispatch, "load_backend", lambda name: cuda_target.backend if name == "cuda" else load(name))
    features, labels, bank, counts = make_case(cuda_target.device, 3, 40, 24, [40, 13, 0], 2 * 6 * 7, dtype=torch.float32, images=2)
    maps = features.transpose(1, 2).reshape(2, 24, 6, 7)  # B x C x H x W, labels B x H x W
    maps_labels = labels.reshape(2, 6, 7)
    values, indices = cossim_fast.max_cosine_similarity(maps, maps_labels, bank, counts, backend="cuda")
    ref_values, ref_indices = cossim_fast.max_cosine_similarity(maps, maps_labels, bank, counts, backend="reference")
    assert values.shape == indices.shape == (2, 6, 7)
    assert_same_max(features, labels, bank, counts, (values.reshape(-1), indices.reshape(-1)),
                    (ref_values.reshape(-1), ref_indices.reshape(-1)), 1e-5)
    for mode in ("max", "all"):
        results = []
        for backend in ("cuda", "reference"):
            leaf = maps.detach().clone().requires_grad_(True)
            loss = cossim_fast.cosine_similarity_loss(leaf, maps_labels, bank, counts, 0.05, mode=mode, backend=backend)
            loss.backward()
            results.append((loss.detach(), leaf.grad))
        torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_agrees_with_triton(dtype, cuda_target):
    triton_module = pytest.importorskip("cossim_fast.backends.triton")
    triton = triton_module.TritonBackend()
    if triton.unsupported_reasons("max_forward", torch.device(cuda_target.device), dtype):
        pytest.skip("triton backend unavailable on cuda")
    num_classes, slots, dim, counts, num_rows, images = SHAPES["vector_loads"]
    features, labels, bank, counts = make_case(cuda_target.device, num_classes, slots, dim, counts, num_rows, dtype=dtype, images=images)
    tol = TOLERANCES[(dtype, "ieee")]
    got = cuda_target.backend.max_forward(features, labels, bank, counts, IGNORE)
    other = triton.max_forward(features, labels, bank, counts, IGNORE)
    assert_same_max(features, labels, bank, counts, got, other, tol["sim"] * 2)
    got_all = cuda_target.backend.all_forward(features, labels, bank, counts, 0.05, IGNORE)
    triton_all = triton.all_forward(features, labels, bank, counts, 0.05, IGNORE)
    assert_same_all(features, labels, bank, counts, 0.05, got_all, triton_all, tol, min_sure=0.9)
    grad = torch.randn(labels.shape, device=cuda_target.device)
    rtol, atol = tol["grad"]
    torch.testing.assert_close(
        cuda_target.backend.max_backward(grad, features, labels, bank, *got), triton.max_backward(grad, features, labels, bank, *got),
        rtol=rtol, atol=atol,
    )


@gpu
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_opcheck(name):
    args = valid_args(name, device="cuda", feature_dtype=torch.bfloat16, bank_dtype=torch.bfloat16)
    torch.library.opcheck(op(name).default, tuple(args[key] for key in ARGUMENTS[name]))


@gpu
def test_cuda_refuses_tensors_on_another_device():
    args = valid_args("cuda_max_forward", device="cuda")
    args["counts"] = args["counts"].cpu()
    with pytest.raises(RuntimeError, match=re.escape("cuda_max_forward: counts must be on the same device as features")):
        call("cuda_max_forward", args)


@gpu
@pytest.mark.skipif(not torch.cuda.device_count() > 1, reason="needs two CUDA GPUs")
def test_runs_on_a_non_current_device():
    features, labels, bank, counts = make_case("cuda", 3, 40, 24, [40, 13, 2], 90, dtype=torch.bfloat16)
    want = CUDA.max_forward(features, labels, bank, counts, IGNORE)
    moved = [t.to("cuda:1") for t in (features, labels, bank, counts)]
    with torch.cuda.device(0):
        got = CUDA.max_forward(*moved, IGNORE)
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(got, want))
