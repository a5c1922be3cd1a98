"""The compiled extension ``cossim_fast._C``: loading, op registration, host-side argument checks,
fake kernel, and the CUDA ring-buffer update against plain PyTorch, bitwise (on a GPU, and on the
CPU through the CUDA emulation)."""

from __future__ import annotations

import re

import pytest
import torch

import cossim_fast
from cossim_fast import _extension
from cossim_fast.backends import auto_rule
from cossim_fast.backends.cuda import CudaBackend

# Skip only when the package was installed without an extension (COSSIM_FAST_SKIP_EXTENSION=1):
# an extension that was built but fails to load is a failure, not a skip.
pytestmark = pytest.mark.skipif(
    _extension.load_error is not None and _extension.load_error.startswith(_extension.NOT_BUILT),
    reason=f"compiled extension not installed: {_extension.load_error}",
)

SCHEMA = (
    "cossim_fast::ring_buffer_update(Tensor(a!) bank, Tensor(b!) counts, Tensor(c!) ptr, "
    "Tensor features, Tensor labels, Tensor? order, Tensor denom, int max_per_class, "
    "int ignore_index) -> ()"
)
PREFIX = "cossim_fast::ring_buffer_update: "
IGNORE = 255


def op():
    return torch.ops.cossim_fast.ring_buffer_update


# --------------------------------------------------------------------------------------------
# Loading and registration


def test_extension_loads():
    assert _extension.load_error is None, _extension.load_error
    assert _extension.is_loaded()
    assert _extension.fake_error is None, _extension.fake_error
    import cossim_fast._C  # noqa: F401  (importable as a module)


def test_extension_info():
    info = torch.ops.cossim_fast.extension_info()
    assert isinstance(info, str)
    assert info == _extension.info()
    fields = dict(item.split("=", 1) for item in info.split(";"))
    assert fields["torch"] == ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if fields["cuda"] == "none":
        assert not _extension.has_cuda_kernels()
    else:
        assert _extension.has_cuda_kernels()
        version = int(fields["cuda"])
        assert f"{version // 1000}.{version % 1000 // 10}" == torch.version.cuda
    status = cossim_fast.extension_status()
    assert status.startswith("loaded: ") and status.endswith(f"built for torch {fields['torch']}"), status
    if fields["cuda"] == "none":
        assert "CPU-only build" in status
    else:
        assert f"CUDA {torch.version.cuda} kernels for sm_" in status, status
        assert re.fullmatch(r"[A-Za-z0-9.+,]+", fields["archs"]), fields["archs"]


def test_op_registered():
    assert hasattr(torch.ops.cossim_fast, "ring_buffer_update")
    assert str(op().default._schema) == SCHEMA
    assert op().default._schema.is_mutable


# --------------------------------------------------------------------------------------------
# Host-side argument checks (CPU tensors: the CPU kernel runs the same checks, then refuses)


def valid_args(device="cpu", bank_dtype=torch.float32, feature_dtype=torch.float32, order=True):
    """A valid call: K=3 classes, M=4 slots, C=5 channels, features an NCHW-derived strided view."""
    num_classes, slots, dim, batch, height, width = 3, 4, 5, 2, 2, 3
    points = height * width
    num_rows = batch * points
    bank = torch.zeros(num_classes, slots, dim, dtype=bank_dtype, device=device)
    maps = torch.randn(batch, dim, height, width, device=device).to(feature_dtype)
    features = maps.flatten(2).transpose(1, 2)  # (B, P, C), not contiguous
    return dict(
        bank=bank,
        counts=torch.zeros(num_classes, dtype=torch.int64, device=device),
        ptr=torch.zeros(num_classes, dtype=torch.int64, device=device),
        features=features,
        labels=torch.randint(0, num_classes, (num_rows,), device=device),
        order=torch.randperm(num_rows, device=device) if order else None,
        denom=torch.ones(num_rows, device=device),
        max_per_class=-1,
        ignore_index=IGNORE,
    )


def call(args):
    names = ("bank", "counts", "ptr", "features", "labels", "order", "denom", "max_per_class", "ignore_index")
    return op()(*(args[name] for name in names))


def _set(name, value_of):
    def change(args):
        args[name] = value_of(args)

    return change


BAD_ARGUMENTS = [
    # (id, change, argument named, pattern)
    ("bank-2d", _set("bank", lambda a: a["bank"][0]), "bank", "3-D"),
    ("bank-dtype", _set("bank", lambda a: a["bank"].double()), "bank", "float32, bfloat16 or float16"),
    ("bank-int", _set("bank", lambda a: a["bank"].int()), "bank", "float32, bfloat16 or float16"),
    ("bank-noncontig", _set("bank", lambda a: a["bank"].transpose(0, 1).contiguous().transpose(0, 1)), "bank", "contiguous"),
    ("bank-no-slots", _set("bank", lambda a: a["bank"][:, :0]), "bank", r"at least one slot"),
    ("counts-dtype", _set("counts", lambda a: a["counts"].int()), "counts", r"int64 \(torch.long\), got Int"),
    ("counts-shape", _set("counts", lambda a: a["counts"][:2]), "counts", r"shape \(3,\) = \(K,\)"),
    ("counts-2d", _set("counts", lambda a: a["counts"][None]), "counts", r"shape \(3,\)"),
    ("counts-noncontig", _set("counts", lambda a: torch.zeros(6, dtype=torch.int64)[::2]), "counts", "contiguous"),
    ("ptr-dtype", _set("ptr", lambda a: a["ptr"].float()), "ptr", r"int64 \(torch.long\), got Float"),
    ("ptr-shape", _set("ptr", lambda a: torch.zeros(4, dtype=torch.int64)), "ptr", r"shape \(3,\) = \(K,\)"),
    ("ptr-noncontig", _set("ptr", lambda a: torch.zeros(6, dtype=torch.int64)[::2]), "ptr", "contiguous"),
    ("features-2d", _set("features", lambda a: a["features"][0]), "features", "3-D"),
    ("features-channels", _set("features", lambda a: a["features"][..., :4]), "features", "C = 5"),
    ("features-dtype", _set("features", lambda a: a["features"].double()), "features", "float32, bfloat16 or float16"),
    ("labels-dtype", _set("labels", lambda a: a["labels"].int()), "labels", r"int64 \(torch.long\), got Int"),
    ("labels-shape", _set("labels", lambda a: a["labels"][:-1]), "labels", r"shape \(12,\) = \(B\*P,\)"),
    ("labels-noncontig", _set("labels", lambda a: a["labels"].repeat(2)[::2]), "labels", "contiguous"),
    ("order-dtype", _set("order", lambda a: a["order"].int()), "order", r"int64 \(torch.long\), got Int"),
    ("order-shape", _set("order", lambda a: a["order"][:-1]), "order", r"shape \(12,\) = \(B\*P,\)"),
    ("order-noncontig", _set("order", lambda a: a["order"].repeat(2)[::2]), "order", "contiguous"),
    ("denom-dtype", _set("denom", lambda a: a["denom"].double()), "denom", "float32, got"),
    ("denom-half", _set("denom", lambda a: a["denom"].half()), "denom", "float32, got"),
    ("denom-shape", _set("denom", lambda a: a["denom"][None]), "denom", r"shape \(12,\) = \(B\*P,\)"),
    ("denom-noncontig", _set("denom", lambda a: a["denom"].repeat(2)[::2]), "denom", "contiguous"),
]


@pytest.mark.parametrize("change, name, pattern", [b[1:] for b in BAD_ARGUMENTS], ids=[b[0] for b in BAD_ARGUMENTS])
def test_argument_checks(change, name, pattern):
    args = valid_args()
    change(args)
    with pytest.raises(RuntimeError, match=re.escape(PREFIX + name + " must ") + ".*" + pattern) as info:
        call(args)
    assert not isinstance(info.value, NotImplementedError), "the check should have fired before the CUDA refusal"


@pytest.mark.parametrize("name", ["counts", "ptr", "features", "labels", "order", "denom"])
def test_device_checks(name):
    """Every argument must be on bank's device (checked on the CPU kernel with one meta tensor)."""
    args = valid_args()
    args[name] = args[name].to("meta")
    cpu_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    names = ("bank", "counts", "ptr", "features", "labels", "order", "denom", "max_per_class", "ignore_index")
    with pytest.raises(RuntimeError, match=re.escape(f"{PREFIX}{name} must be on the same device as bank (cpu), got meta")):
        op().default.redispatch(cpu_only, *(args[n] for n in names))


@pytest.mark.parametrize("order", [True, False])
@pytest.mark.parametrize("bank_dtype, feature_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_valid_cpu_call_is_refused_clearly(order, bank_dtype, feature_dtype):
    """Valid arguments (mixed dtypes, strided features, order or None) pass every check; the CPU
    kernel then refuses: the compiled kernel needs CUDA tensors, the torch backend serves CPU."""
    args = valid_args(bank_dtype=bank_dtype, feature_dtype=feature_dtype, order=order)
    before = args["bank"].clone()
    with pytest.raises(NotImplementedError, match=re.escape(PREFIX) + r"this compiled kernel needs CUDA tensors.*\"torch\" backend serves CPU"):
        call(args)
    assert torch.equal(args["bank"], before)


# --------------------------------------------------------------------------------------------
# Fake kernel (torch.compile, FakeTensorMode); opcheck needs real CUDA tensors (GPU test below)


def test_fake_kernel_runs_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        args = {key: mode.from_tensor(value) if isinstance(value, torch.Tensor) else value for key, value in valid_args().items()}
        assert call(args) is None
        args["order"] = None
        assert call(args) is None


def test_fake_kernel_runs_on_meta_tensors():
    args = {key: value.to("meta") if isinstance(value, torch.Tensor) else value for key, value in valid_args().items()}
    assert call(args) is None


# --------------------------------------------------------------------------------------------
# The backend object


def test_cuda_backend_reasons(monkeypatch):
    backend = CudaBackend()
    assert backend.name == "cuda"
    cpu = backend.unsupported_reasons("update", torch.device("cpu"), torch.float32)
    assert any("tensors are on cpu" in reason for reason in cpu)
    assert any("float64 is not supported" in r for r in backend.unsupported_reasons("update", torch.device("cuda"), torch.float64))
    # "auto" leaves the forward kernels alone on an architecture without measurements (the
    # shipped rule holds the H200's: an empty one stands for any other GPU).
    monkeypatch.setattr(auto_rule, "measurements", lambda path=None: ())
    assert backend.auto_skip_reasons("max_forward", torch.device("cuda"), torch.float32)
    assert backend.auto_skip_reasons("update", torch.device("cuda"), torch.float32) == []
    update = backend.unsupported_reasons("update", torch.device("cuda"), torch.bfloat16)
    if _extension.has_cuda_kernels():
        assert update == []
    else:
        assert any("without CUDA kernels" in reason for reason in update)


@pytest.mark.parametrize(
    "archs, capability, runs",
    [
        ("8.0,9.0+PTX", (7, 5), False),  # a T4 with the default build
        ("8.0,9.0+PTX", (8, 6), True),  # the sm_80 cubin runs on every 8.x
        ("8.0,9.0+PTX", (9, 0), True),
        ("8.0,9.0+PTX", (12, 0), True),  # compute_90 PTX, compiled by the driver
        ("8.0,9.0", (10, 0), False),  # cubins only: none for 10.x
        ("9.0a", (9, 0), True),
        ("9.0a", (9, 1), False),  # an arch-specific cubin runs on that architecture only
        ("7.5,8.6", (8, 0), False),  # no cubin at or below 8.0 of major 8
        ("Ampere", (8, 0), None),  # a form not read here: no one is refused
    ],
)
def test_which_gpus_the_kernels_run_on(monkeypatch, archs, capability, runs):
    monkeypatch.setattr(_extension, "_info", f"cuda=13000;archs={archs};torch=2.14")
    assert _extension.runs_on(capability) is runs


@pytest.mark.skipif(not _extension.has_cuda_kernels(), reason="needs the extension's CUDA build")
def test_a_gpu_without_kernel_code_is_refused_with_the_rebuild(monkeypatch):
    monkeypatch.setattr(_extension, "_info", "cuda=13000;archs=8.0,9.0+PTX;torch=2.14")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    for op in ("update", "max_forward", "max_backward"):
        (reason,) = CudaBackend().unsupported_reasons(op, torch.device("cuda"), torch.float32)
        assert "built for sm_80, sm_90 (+PTX), not for this GPU (sm_75)" in reason
        assert 'TORCH_CUDA_ARCH_LIST="7.5"' in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 9))
    assert CudaBackend().unsupported_reasons("update", torch.device("cuda"), torch.float32) == []


# --------------------------------------------------------------------------------------------
# The CUDA kernel against plain PyTorch, bitwise: on a GPU, and on the CPU through the CUDA
# emulation (tests/cuda_emulation), which runs the same kernel source


def reference_update(bank, counts, ptr, features, labels, order, denom, max_per_class, ignore_index):
    """METHOD.md 5 in plain PyTorch, one class at a time (host syncs allowed: it is the oracle)."""
    num_classes, slots, _ = bank.shape
    num_rows = labels.numel()
    points = features.shape[1]
    if num_rows == 0:
        return
    visit = order if order is not None else torch.arange(num_rows, device=labels.device)
    visited_labels = labels[visit]
    for k in range(num_classes):
        rows = visit[visited_labels == k] if k != ignore_index else visit[:0]  # visiting order kept
        taken = rows.numel() if max_per_class < 0 else min(rows.numel(), max_per_class)
        start = int(ptr[k])
        first = max(0, taken - slots)
        kept = rows[first:taken]
        slot = (start + torch.arange(first, taken, device=bank.device)) % slots
        values = features[kept // points, kept % points].float() / denom[kept, None]
        bank[k, slot] = values.to(bank.dtype)
        ptr[k] = (start + taken) % slots
        counts[k] = min(slots, int(counts[k]) + taken)


def bits(t):
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def make_case(device, num_classes, slots, dim, batch, height, width, bank_dtype, feature_dtype, skew, seed):
    """NCHW maps viewed as (B, H*W, C) (strided), labels skewed to class 0 (n_0 > M), ignored rows."""
    gen = torch.Generator(device=device).manual_seed(seed)
    maps = torch.randn(batch, dim, height, width, device=device, generator=gen).to(feature_dtype)
    features = maps.flatten(2).transpose(1, 2)
    num_rows = batch * height * width
    labels = torch.randint(0, num_classes, (num_rows,), device=device, generator=gen)
    labels = torch.where(torch.rand(num_rows, device=device, generator=gen) < skew, 0, labels)
    labels = torch.where(torch.rand(num_rows, device=device, generator=gen) < 0.1, IGNORE, labels)
    denom = torch.linalg.vector_norm(features, dim=2, dtype=torch.float32).clamp_min(1e-12).reshape(-1).contiguous()
    bank = torch.randn(num_classes, slots, dim, device=device, generator=gen).to(bank_dtype)
    counts = torch.randint(0, slots + 1, (num_classes,), device=device, generator=gen)
    ptr = torch.randint(0, slots, (num_classes,), device=device, generator=gen)
    order = torch.randperm(num_rows, device=device, generator=gen)
    return bank, counts, ptr, features, labels, order, denom


CASES = [
    # K, M, C, B, H, W, skew: odd shapes; n_0 > M (wrap-around, only the last M survive)
    (5, 6, 37, 2, 5, 7, 0.5),
    (3, 7, 1, 1, 3, 3, 0.0),
    # several 1024-row tiles, kept rows spanning tiles, M larger than a tile
    (4, 1500, 19, 2, 41, 43, 0.6),
    (19, 33, 64, 1, 30, 31, 0.3),
]
DTYPE_PAIRS = [(b, f) for b in (torch.float32, torch.bfloat16, torch.float16) for f in (torch.float32, torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "K{}-M{}-C{}-B{}-{}x{}".format(*c[:6]))
@pytest.mark.parametrize("bank_dtype, feature_dtype", DTYPE_PAIRS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("use_order", [True, False], ids=["order", "no-order"])
@pytest.mark.parametrize("max_per_class", [-1, 0, 5, 100000])
def test_cuda_kernel_matches_pytorch_bitwise(case, bank_dtype, feature_dtype, use_order, max_per_class, cuda_target):
    from cossim_fast.backends.ring_buffer import ring_buffer_update_torch

    num_classes, slots, dim, batch, height, width, skew = case
    bank, counts, ptr, features, labels, order, denom = make_case(
        cuda_target.device, num_classes, slots, dim, batch, height, width, bank_dtype, feature_dtype, skew,
        seed=sum(case[:6]),
    )
    assert dim == 1 or not features.is_contiguous()  # an NCHW-derived strided view
    order = order if use_order else None
    expected = [bank.clone(), counts.clone(), ptr.clone()]
    reference_update(*expected, features, labels, order, denom, max_per_class, IGNORE)
    package = [bank.clone(), counts.clone(), ptr.clone()]
    ring_buffer_update_torch(*package, features, labels, order, denom, max_per_class, IGNORE)

    if cuda_target.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_target.backend.update(bank, counts, ptr, features, labels, order, denom, max_per_class, IGNORE)
    finally:
        if cuda_target.device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(bits(bank), bits(expected[0]))
    assert torch.equal(counts, expected[1])
    assert torch.equal(ptr, expected[2])
    # and the package's own PyTorch path (backends/ring_buffer.py) agrees bitwise too
    assert torch.equal(bits(package[0]), bits(expected[0]))
    assert torch.equal(package[1], expected[1]) and torch.equal(package[2], expected[2])


def test_cuda_kernel_repeated_updates_and_backend(cuda_target):
    """Several updates in a row through CudaBackend (ptr wraps repeatedly); deterministic."""
    bank, counts, ptr, features, labels, order, denom = make_case(
        cuda_target.device, 6, 9, 24, 2, 9, 11, torch.bfloat16, torch.float16, 0.4, 7
    )
    expected = [bank.clone(), counts.clone(), ptr.clone()]
    again = [bank.clone(), counts.clone(), ptr.clone()]
    backend = cuda_target.backend
    for step in range(4):
        perm = torch.randperm(labels.numel(), device=cuda_target.device) if step % 2 else None
        reference_update(*expected, features, labels, perm, denom, 7, IGNORE)
        backend.update(bank, counts, ptr, features, labels, perm, denom, 7, IGNORE)
        backend.update(*again, features, labels, perm, denom, 7, IGNORE)
    assert torch.equal(bits(bank), bits(expected[0]))
    assert torch.equal(bits(again[0]), bits(bank))
    assert torch.equal(counts, expected[1]) and torch.equal(ptr, expected[2])



def test_emulated_update_same_bits_in_any_thread_order():
    """Emulation only: threads and blocks in index order, reversed and shuffled write the same
    bank (each element has one writer; a race would make it depend on the order)."""
    from cuda_emulation import EmulatedCudaBackend

    emulated = EmulatedCudaBackend()
    bank, counts, ptr, features, labels, order, denom = make_case("cpu", 4, 1500, 70, 2, 41, 43, torch.bfloat16, torch.float32, 0.6, 5)
    results = []
    try:
        for seed in (0, 1, 2):
            emulated.ops.set_schedule(seed)
            state = [bank.clone(), counts.clone(), ptr.clone()]
            emulated.update(*state, features, labels, order, denom, -1, IGNORE)
            results.append(state)
    finally:
        emulated.ops.set_schedule(0)
    assert not torch.equal(bits(results[0][0]), bits(bank))
    for state in results[1:]:
        assert all(torch.equal(bits(a) if a.is_floating_point() else a, bits(b) if b.is_floating_point() else b)
                   for a, b in zip(results[0], state))

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernel_edge_cases():
    # empty input: a no-op
    bank, counts, ptr, features, labels, order, denom = make_case("cuda", 3, 4, 8, 1, 2, 2, torch.float32, torch.float32, 0.0, 1)
    before = [bank.clone(), counts.clone(), ptr.clone()]
    empty = features[:, :0]
    op()(bank, counts, ptr, empty, labels[:0], order[:0], denom[:0], -1, IGNORE)
    assert all(torch.equal(a, b) for a, b in zip((bank, counts, ptr), before))
    # ignore_index inside [0, K): that class is skipped
    labels = torch.zeros_like(labels)
    op()(bank, counts, ptr, features, labels, None, denom, -1, 0)
    assert all(torch.equal(a, b) for a, b in zip((bank, counts, ptr), before))
    # arguments on another device than bank's are refused before any launch
    with pytest.raises(RuntimeError, match="features must be on the same device as bank"):
        op()(bank, counts, ptr, features.cpu(), labels, None, denom, -1, IGNORE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("use_order", [True, False])
def test_cuda_opcheck(use_order):
    bank, counts, ptr, features, labels, order, denom = make_case("cuda", 4, 5, 16, 2, 3, 5, torch.bfloat16, torch.float32, 0.5, 3)
    args = (bank, counts, ptr, features, labels, order if use_order else None, denom, 3, IGNORE)
    torch.library.opcheck(op().default, args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.device_count() > 1, reason="needs two CUDA GPUs")
def test_cuda_kernel_on_non_current_device():
    bank, counts, ptr, features, labels, order, denom = make_case("cuda", 4, 5, 16, 2, 3, 5, torch.float32, torch.float32, 0.5, 3)
    moved = [t.to("cuda:1") for t in (bank, counts, ptr, features, labels, order, denom)]
    expected = [bank.clone(), counts.clone(), ptr.clone()]
    reference_update(*expected, features, labels, order, denom, -1, IGNORE)
    with torch.cuda.device(0):
        op()(*moved, -1, IGNORE)
    assert torch.equal(moved[0].cpu(), expected[0].cpu())
