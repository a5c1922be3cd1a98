"""Backend selection: argument, then COSSIM_FAST_BACKEND, then auto; strict mode; warn-once fallback."""

import warnings

import pytest
import torch

import cossim_fast
from cossim_fast.backends import auto_rule, dispatch
from cases import make_bank, make_rows

BANK, COUNTS = make_bank(3, 5, 4, counts=[5, 5, 5])
FEATURES, LABELS = make_rows(7, 4, 3)


def chosen(backend="auto", device="cpu", op="max_forward", dtype=torch.float32):
    return dispatch.select(op, backend, torch.device(device), dtype).name


def test_auto_on_cpu_is_torch_and_explicit_wins():
    assert chosen() == "torch"
    assert chosen("reference") == "reference"


def test_environment_variable_applies_to_auto_only(monkeypatch):
    monkeypatch.setenv("COSSIM_FAST_BACKEND", "reference")
    assert chosen() == "reference"
    assert chosen("torch") == "torch"
    monkeypatch.setenv("COSSIM_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="COSSIM_FAST_BACKEND must be one of"):
        chosen()


def test_unavailable_backend_falls_back_with_one_warning_that_says_why():
    with pytest.warns(RuntimeWarning, match=r"cuda: .*cuda") as record:
        assert chosen("cuda") == "torch"
    assert "using 'torch'" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert chosen("cuda") == "torch"  # the second time is silent


def test_the_fallback_warning_names_the_callers_line():
    features, labels = torch.randn(4, 5), torch.zeros(4, dtype=torch.long)
    bank, counts = torch.nn.functional.normalize(torch.randn(2, 3, 5), dim=-1), torch.tensor([3, 3])
    with pytest.warns(RuntimeWarning, match="no backend 'cuda'") as record:
        cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend="cuda")  # through the custom op
    assert record[0].filename == __file__


def test_strict_mode_raises_instead_of_falling_back():
    cossim_fast.set_strict(True)
    with pytest.raises(cossim_fast.BackendUnavailableError, match="strict mode"):
        cossim_fast.max_cosine_similarity(FEATURES, LABELS, BANK, COUNTS, backend="cuda")
    assert chosen() == "torch"  # auto is never refused on the CPU


def test_import_failures_become_reasons(monkeypatch):
    monkeypatch.setitem(dispatch._MODULES, "triton", ("cossim_fast.no_such_module", "X"))
    dispatch.load_backend.cache_clear()
    try:
        reasons = dispatch.unsupported_reasons("triton", "max_forward", torch.device("cpu"), torch.float32)
        assert "failed to import" in reasons[0] and "no_such_module" in reasons[0]
        assert "triton" not in cossim_fast.available_backends("cpu")
    finally:
        dispatch.load_backend.cache_clear()


def test_available_backends_lists_what_runs_here():
    names = cossim_fast.available_backends()
    assert names[:2] == ["reference", "torch"]
    assert set(names) <= set(cossim_fast.BACKEND_NAMES)
    if not torch.cuda.is_available():
        assert "cuda" not in names


@pytest.mark.parametrize("op", ["max_forward", "update"])
def test_a_backend_must_take_every_dtype_of_the_call(op):
    # fp32 with a float64 partner: a backend without float64 kernels must not be chosen.
    # Triton runs on CUDA tensors, or on CPU tensors through its interpreter.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = dispatch.load_backend("triton")
    if isinstance(backend, str) or backend.unsupported_reasons(op, device, torch.float32):
        pytest.skip(f"triton does not run on {device} here")
    assert dispatch.select(op, "triton", device, torch.float32).name == "triton"
    with pytest.warns(RuntimeWarning, match=r"float32/torch.float64:\n  triton: dtype float64 is not supported"):
        assert dispatch.select(op, "triton", device, torch.float32, torch.float64).name == "torch"


def test_float64_bank_with_float32_features_falls_back_and_matches_the_reference():
    if isinstance(dispatch.load_backend("triton"), str):
        pytest.skip("triton is not importable here")
    bank = BANK.double()
    with pytest.warns(RuntimeWarning, match="float64 is not supported"):
        values, indices = cossim_fast.max_cosine_similarity(FEATURES, LABELS, bank, COUNTS, backend="triton")
    expected_values, expected_indices = cossim_fast.max_cosine_similarity(FEATURES, LABELS, bank, COUNTS, backend="reference")
    torch.testing.assert_close(values, expected_values)
    assert torch.equal(indices, expected_indices)


# --- the measured rule: which fused backend "auto" puts first on a GPU (auto_rule) -------------

def _entry(op, dim, rows, faster, arch="9.0", dtype="bfloat16"):
    return {"arch": arch, "op": op, "dtype": dtype, "C": dim, "N": rows, "faster": faster}


RULE = (
    _entry("max_forward", 256, 16384, "cuda"), _entry("max_forward", 256, 131072, "triton"),
    _entry("max_forward", 2048, 131072, "triton"), _entry("update", 2048, 131072, "cuda"),
)


def test_rule_takes_the_nearest_measured_shape():
    def preferred(dim, rows, op="max_forward", arch="9.0", dtype=torch.bfloat16):
        return auto_rule.preferred(op, arch, dtype, dim, rows, RULE)

    assert preferred(256, 16384) == "cuda" and preferred(200, 20000) == "cuda"
    assert preferred(256, 100000) == "triton" and preferred(1024, 8192) == "triton"  # C decides first
    assert preferred(256, None) in ("cuda", "triton")  # shape unknown: still a measured answer
    assert preferred(256, 16384, arch="8.0") is None and preferred(256, 16384, dtype=torch.float32) is None
    assert preferred(256, 16384, op="all_forward") is None


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device on which every backend can run, with RULE as its measurements."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "unsupported_reasons", lambda *args: [])
    monkeypatch.setattr(auto_rule, "capability", lambda device: "9.0")
    monkeypatch.setattr(auto_rule, "measurements", lambda path=None: RULE)


def test_auto_puts_the_measured_faster_backend_first(fake_gpu):
    cuda = torch.device("cuda")
    assert dispatch.select("max_forward", "auto", cuda, torch.bfloat16, dim=256, rows=16384).name == "cuda"
    assert dispatch.select("max_forward", "auto", cuda, torch.bfloat16, dim=2048, rows=131072).name == "triton"
    assert dispatch.select("max_forward", "triton", cuda, torch.bfloat16, dim=256, rows=16384).name == "triton"  # explicit wins


def test_auto_takes_the_torch_backend_where_it_measured_fastest(fake_gpu, monkeypatch):
    # cuBLAS's fp32 GEMMs beat both fused backends' exact fp32 dots at large C on an H200.
    monkeypatch.setattr(auto_rule, "measurements", lambda path=None: (_entry("max_forward", 2048, 131072, "torch", dtype="float32"),))
    cuda = torch.device("cuda")
    assert dispatch.select("max_forward", "auto", cuda, torch.float32, dim=2048, rows=131072).name == "torch"


def test_unmeasured_cuda_kernels_are_not_chosen_by_auto(fake_gpu):
    cuda = torch.device("cuda")
    # No measurement of all_forward (or of fp16) on this architecture: the default order, minus
    # the CUDA kernels that never ran here.
    assert dispatch.select("all_forward", "auto", cuda, torch.bfloat16, dim=256, rows=16384).name == "triton"
    assert dispatch.select("max_forward", "auto", cuda, torch.float16, dim=256, rows=16384).name == "triton"


def test_auto_left_with_torch_on_a_gpu_warns_once_and_strict_mode_allows_it(fake_gpu, monkeypatch):
    # No fused backend can run the input: "auto" takes torch and says why (strict mode forbids
    # only the fallback of an explicit request).
    monkeypatch.setattr(dispatch, "unsupported_reasons", lambda name, *args: [] if name == "torch" else [f"{name} cannot"])
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "_strict", True)
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="triton cannot.*\n.*cuda cannot|cuda cannot.*\n.*triton cannot"):
        assert dispatch.select("max_forward", "auto", cuda, torch.bfloat16, dim=256, rows=16384).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per message
        assert dispatch.select("max_forward", "auto", cuda, torch.bfloat16, dim=256, rows=16384).name == "torch"
    # Another reason for the same fallback is news: a dtype the first call did not have.
    monkeypatch.setattr(dispatch, "unsupported_reasons", lambda name, *args: [] if name == "torch" else [f"{name} refuses fp16"])
    with pytest.warns(RuntimeWarning, match="refuses fp16"):
        assert dispatch.select("max_forward", "auto", cuda, torch.float16, dim=256, rows=16384).name == "torch"


def test_available_backends_counts_a_backend_that_runs_on_any_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "unsupported_reasons", lambda name, op, device, dtype: [] if device.type == "cuda" or name == "torch" else ["cpu"])
    assert "cuda" in cossim_fast.available_backends() and "cuda" not in cossim_fast.available_backends("cpu")


def test_a_rerun_of_one_dtype_keeps_the_other_dtypes_entries(tmp_path):
    path = tmp_path / "auto_rule.json"
    auto_rule.write([_entry("max_forward", 256, 16384, "cuda", dtype="float32"), _entry("max_forward", 256, 16384, "cuda")], path)
    auto_rule.write([_entry("max_forward", 256, 16384, "triton")], path)  # bf16 remeasured
    entries = auto_rule.measurements(path)
    assert sorted((e["dtype"], e["faster"]) for e in entries) == [("bfloat16", "triton"), ("float32", "cuda")]


def test_rule_entries_replace_their_architecture_op_and_dtype(tmp_path):
    path = tmp_path / "auto_rule.json"
    auto_rule.write([_entry("max_forward", 256, 16384, "cuda", arch="8.0")], path)
    measured = [{"op": "max-fwd", "dtype": "bf16", "C": 256, "N": 131072, "M": 4096, "faster": "triton",
                 "triton_ms": 1.0, "cuda_ms": 2.0},
                {"op": "all-fwd_bwd", "dtype": "fp32", "C": 2048, "N": 131072, "M": 4096, "faster": "cuda",
                 "triton_ms": 3.0, "cuda_ms": 2.0},
                {"op": "max-fwd_bwd", "dtype": "bf16", "C": 256, "N": 131072, "M": 4096, "faster": "cuda",
                 "triton_ms": 3.0, "cuda_ms": 2.0}]
    auto_rule.write(auto_rule.entries_from_targets(measured, "9.0", "NVIDIA H100", "bench.json"), path)
    measured[0]["faster"] = "cuda"
    auto_rule.write(auto_rule.entries_from_targets(measured[:1], "9.0", "NVIDIA H100", "bench.json"), path)  # a rerun of bf16
    entries = auto_rule.measurements(path)
    assert sorted((e["arch"], e["op"], e["faster"]) for e in entries) == [
        ("8.0", "max_forward", "cuda"), ("9.0", "all_backward", "cuda"), ("9.0", "all_forward", "cuda"),
        ("9.0", "max_forward", "cuda"),  # replaced; the fp32 "all" entries of the first run are kept
    ]
    assert auto_rule.preferred("max_forward", "9.0", torch.bfloat16, 256, 131072, entries) == "cuda"
    not_a_rule = tmp_path / "bench.json"
    not_a_rule.write_text('{"benchmarks": []}')
    with pytest.raises(ValueError, match="not a rule file"):
        auto_rule.write(entries[:1], not_a_rule)
    assert {e["op"] for e in auto_rule.entries_from_targets(measured, "9.0", "x", "y")} == {
        "max_forward", "all_forward", "all_backward"}  # a max fwd+bwd time stands for no single op


def test_the_shipped_rule_file_is_readable():
    entries = auto_rule.measurements()
    assert isinstance(entries, tuple)
    for entry in entries:
        assert entry["faster"] in auto_rule.CONTENDERS and entry["arch"].count(".") == 1


def test_a_skipped_measured_winner_does_not_hand_over_to_the_slower_fused_backend(fake_gpu, monkeypatch):
    # Triton measured faster than cuda for fp32, but "auto" skips Triton's exact fp32 dots
    # (slower than cuBLAS): the torch backend, not the even slower cuda kernels, runs it.
    monkeypatch.setattr(auto_rule, "measurements", lambda path=None: (_entry("max_forward", 256, 16384, "triton", dtype="float32"),))
    cuda = torch.device("cuda")
    assert dispatch.select("max_forward", "auto", cuda, torch.float32, dim=256, rows=16384).name == "torch"
