"""Backend selection: argument, then COSSIM_FAST_BACKEND, then auto; strict mode; warn-once fallback."""

import warnings

import pytest
import torch

import cossim_fast
from cossim_fast.backends import dispatch
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
    if isinstance(dispatch.load_backend("triton"), str):
        pytest.skip("triton is not importable here")
    assert dispatch.select(op, "triton", torch.device("cpu"), torch.float32).name == "triton"
    with pytest.warns(RuntimeWarning, match=r"float32/torch.float64:\n  triton: dtype float64 is not supported"):
        assert dispatch.select(op, "triton", torch.device("cpu"), torch.float32, torch.float64).name == "torch"


def test_float64_bank_with_float32_features_falls_back_and_matches_the_reference():
    if isinstance(dispatch.load_backend("triton"), str):
        pytest.skip("triton is not importable here")
    bank = BANK.double()
    with pytest.warns(RuntimeWarning, match="float64 is not supported"):
        values, indices = cossim_fast.max_cosine_similarity(FEATURES, LABELS, bank, COUNTS, backend="triton")
    expected_values, expected_indices = cossim_fast.max_cosine_similarity(FEATURES, LABELS, bank, COUNTS, backend="reference")
    torch.testing.assert_close(values, expected_values)
    assert torch.equal(indices, expected_indices)
