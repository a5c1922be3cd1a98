"""Fast checks of the benchmark tools themselves (no timing): the per-class baseline computes
what the reference computes, the frontier search brackets a known frontier, and the report
reads what the runner writes.

    python -m pytest bench/test_baselines.py
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import cossim_fast
from bench import baselines, frontier, harness, report
from bench import run as bench_run


def _problem(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(5, 37, 16, generator=generator), dim=2).to(dtype)
    counts = torch.tensor([37, 0, 5, 20, 37])
    features = torch.randn(300, 16, generator=generator).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 5, (300,), generator=generator)
    labels[::7] = 255
    return features, labels, bank, counts


def test_per_class_max_matches_reference():
    features, labels, bank, counts = _problem()
    values, indices = baselines.max_cosine_similarity(features, labels, bank, counts)
    ref_values, ref_indices = cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend="reference")
    assert torch.equal(indices, ref_indices)
    assert torch.equal(torch.isinf(values), torch.isinf(ref_values))
    found = ref_indices >= 0
    torch.testing.assert_close(values[found], ref_values[found], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["max", "all"])
@pytest.mark.parametrize("reduction", ["mean", "class_mean"])
def test_per_class_loss_and_gradient_match_reference(mode, reduction):
    features, labels, bank, counts = _problem()
    loss = baselines.cosine_similarity_loss(features, labels, bank, counts, 0.1, mode=mode, reduction=reduction)
    (grad,) = torch.autograd.grad(loss, features)
    ref = cossim_fast.cosine_similarity_loss(features, labels, bank, counts, 0.1, mode=mode, reduction=reduction, backend="reference")
    (ref_grad,) = torch.autograd.grad(ref, features)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)


def test_per_class_loss_with_nothing_selected_is_zero_and_connected():
    features, labels, bank, counts = _problem()
    loss = baselines.cosine_similarity_loss(features, labels, bank, counts, 1.5)
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(features.grad) == 0


def test_per_class_bf16_is_close_to_reference():
    features, labels, bank, counts = _problem(torch.bfloat16)
    values, _ = baselines.max_cosine_similarity(features, labels, bank, counts)
    ref_values, ref_indices = cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend="reference")
    found = ref_indices >= 0
    torch.testing.assert_close(values[found], ref_values[found], atol=2e-2, rtol=0)


def test_per_class_update_is_bitwise_the_package_update():
    dictionary = cossim_fast.FeatureDictionary(5, 9, 16)
    bank, counts, ptr = dictionary.bank.clone(), dictionary.counts.clone(), dictionary.ptr.clone()
    generator = torch.Generator().manual_seed(1)
    for rows in (50, 400, 3):
        source = torch.randn(rows, 16, generator=generator)
        labels = torch.randint(0, 5, (rows,), generator=generator)
        labels[::5] = 255
        dictionary.update(source, labels, backend="reference", max_per_class=30)
        baselines.dictionary_update(bank, counts, ptr, source, labels, max_per_class=30)
        assert torch.equal(dictionary.bank, bank) and torch.equal(dictionary.counts, counts) and torch.equal(dictionary.ptr, ptr)


def test_per_class_gemms_count_the_valid_work():
    features, labels, bank, counts = _problem()
    gemms = baselines.PerClassGemms(features.detach(), labels, bank, counts)
    gemms()
    valid_counts = counts[labels.clamp(max=4)] * (labels != 255)
    assert gemms.flops == 2 * 16 * int(valid_counts.sum())


def test_every_grid_case_prepares_and_runs_on_a_small_size():
    harness.configure_for_benchmarks(False)
    try:
        for case in harness.grid_cases("cpu", "cpu"):
            small = harness.Case(case.op, case.impl, 64, 8, 16, case.dtype, "cpu")
            if harness.skip_reason(small):
                continue
            harness.call_once(harness.prepare(small))
    finally:
        cossim_fast.set_strict(False)
        cossim_fast.set_value_checks(True)
        harness.clear_cache()


def test_graphable_body_is_the_timed_work_of_every_phase_but_backward():
    harness.configure_for_benchmarks(False)
    try:
        for op in harness.OPS:
            prepared = harness.prepare(harness.Case(op, "torch", 64, 8, 16, "fp32", "cpu"), cached=False)
            if op.endswith("-bwd"):
                assert prepared.body is None and prepared.setup is not None
                with pytest.raises(ValueError, match="backward phase"):
                    bench_run.graph_replay_seconds(prepared, rounds=1, warmup=0)
            else:
                assert prepared.setup is None and prepared.body is prepared.target  # on CPU: no synchronization
                prepared.body()
    finally:
        cossim_fast.set_strict(False)
        cossim_fast.set_value_checks(True)


def test_graph_timing_needs_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_run.main(["--device", "cpu", "--ops", "max-fwd", "--impls", "torch", "--timing", "graph",
                        "--json", str(tmp_path / "out.json")])
    assert "--timing graph needs CUDA tensors" in capsys.readouterr().err


@pytest.mark.parametrize("argument, value, expected", [("--rounds", "0", ">= 1, got 0"), ("--rounds", "-2", ">= 1, got -2"),
                                                      ("--warmup", "-1", ">= 0, got -1"), ("--rounds", "two", ">= 1, got 'two'")])
def test_runner_refuses_a_count_out_of_range(tmp_path, capsys, monkeypatch, argument, value, expected):
    # Once "--rounds 0" ran the default rounds: a small grid, so that a regression ends quickly.
    for name, size in (("N", "64"), ("M", "8"), ("C", "16"), ("DTYPES", "fp32")):
        monkeypatch.setenv(f"COSSIM_BENCH_{name}", size)
    try:
        with pytest.raises(SystemExit):
            bench_run.main(["--device", "cpu", "--ops", "update", "--impls", "torch", "--no-memory", argument, value,
                            "--json", str(tmp_path / "out.json")])
    finally:
        cossim_fast.set_strict(False)
        cossim_fast.set_value_checks(True)
    assert f"argument {argument}: expected an integer {expected}" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("name, value", [("COSSIM_BENCH_ROUNDS", "0"), ("COSSIM_BENCH_WARMUP", "-1")])
def test_round_counts_from_the_environment_out_of_range_are_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"COSSIM_BENCH_ROUNDS must be >= 1 and COSSIM_BENCH_WARMUP >= 0"):
        harness.timing_defaults("cpu")


def test_cpu_memory_probe_runs_with_the_value_checks_of_the_run():
    # The probe's child is a fresh process: it must be told, or it measures with the checks off
    # while the record says value_checks true (bench.run --check-values, --bench-check-values).
    from bench import memprobe

    class Recording:
        def __init__(self, probe):
            self.probe, self.replies = probe, []

        def run(self, request):
            self.replies.append(self.probe.run(request))
            return self.replies[-1]

        def describe(self):
            return self.probe.describe()

    probe = Recording(memprobe.MemoryProbe("fork"))
    case = harness.Case("max-fwd", "torch", 64, 8, 16, "fp32")
    try:
        for check_values in (True, False):
            harness.configure_for_benchmarks(check_values)
            assert harness.measure_peak(case, probe)["peak_mib"] is not None, probe.replies[-1]
            assert probe.replies[-1]["value_checks"] is check_values
    finally:
        probe.probe.close()
        cossim_fast.set_strict(False)
        cossim_fast.set_value_checks(True)


def test_reference_over_memory_limit_is_skipped_with_its_size(monkeypatch):
    monkeypatch.setenv("COSSIM_BENCH_MEMORY_LIMIT_GIB", "1")
    reason = harness.skip_reason(harness.Case("max-fwd", "reference", 131072, 4096, 256, "fp32"))
    assert reason and "131072 x 77824" in reason and "GiB" in reason


def test_frontier_search_brackets_a_linear_frontier():
    budget = 100 * 2**20
    spec = frontier.StepSpec("torch", 1024, 256, 19, "fp32", "max", 0.0, "cpu")

    def measure(rows):  # peak = 10 MiB + 1 KiB per row: frontier at 92160 rows
        peak = 10 * 2**20 + rows * 1024
        return {"fits": peak <= budget, "peak_bytes": peak}

    result = frontier.search(spec, measure, budget, start_n=4096, step=256, tol=0.05, max_n=2**26, deadline=math.inf, lower_bound=lambda rows: 0)
    assert result.largest_n <= 92160 < result.smallest_failing_n
    assert result.smallest_failing_n <= result.largest_n * 1.05 + 256
    assert len(result.probes) <= 8


def test_frontier_search_steps_past_a_prediction_that_rounds_down_to_a_fitting_n():
    # Exactly linear, 311296 bytes per row (the reference at M = 4096): 3328 rows fit 1000 MiB,
    # 3584 do not. The prediction rounded down to the step once landed on 3072, which had fitted,
    # and the search stopped there.
    budget = 1000 * 2**20
    spec = frontier.StepSpec("reference", 4096, 256, 19, "fp32", "max", 0.0, "cpu")

    def measure(rows):
        return {"fits": rows * 311296 <= budget, "peak_bytes": rows * 311296}

    for start in (4096, 1024):
        result = frontier.search(spec, measure, budget, start_n=start, step=256, tol=0.05, max_n=2**26,
                                 deadline=math.inf, lower_bound=lambda rows: 0)
        assert (result.largest_n, result.smallest_failing_n) == (3328, 3584), start


def test_a_cpu_probe_that_fails_for_another_reason_than_memory_raises(monkeypatch):
    spec = frontier.StepSpec("torch", 1024, 256, 19, "fp32", "max", 0.0, "cpu")
    measurer = frontier.CpuMeasurer(spec, 2**30, 60)
    replies = iter([
        {"ok": False, "error": "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"},
        {"ok": False, "error": "ValueError: threshold must not be NaN"},
    ])
    monkeypatch.setattr(measurer.probe, "run", lambda request: next(replies))
    assert measurer(4096)["fits"] is False
    with pytest.raises(RuntimeError, match="the probe at N=4096 failed, not for memory: ValueError"):
        measurer(4096)


def test_class_gemm_reports_no_peak_rather_than_zero():
    # Its rows and output exist before the call: a measured peak would read "no memory needed".
    memory = harness.measure_peak(harness.Case("max-fwd", "class_gemm", 64, 16, 8, "fp32"))
    assert memory["peak_mib"] is None and "throughput line" in memory["peak_method"]


def test_train_step_shares_n_among_the_batch():
    spec = frontier.StepSpec("torch", 16, 0, 19, "fp32", "max", 0.0, "cpu", "train", batch=2)
    step = frontier.TrainStep(spec)
    assert step.feature_size(2 * 8 * 16) == (8, 16) and step.images(2 * 8 * 16) == "2 x 128x64"
    step.build(2 * 4 * 8)()  # two 64x32 source and two target images: one iteration runs


def test_train_step_frontier_records_the_n_it_ran():
    # The search asks for multiples of 256; the step builds whole h x 2h feature maps: asked for
    # 4,864 it runs 784x392 images, 98 x 49 = 4,802 pixels, and that N is what the result says.
    spec = frontier.StepSpec("torch", 1024, 128, 19, "fp32", "max", 0.0, "cpu", "train")
    step = frontier.TrainStep(spec)
    assert step.rows_run(4864) == 4802 and step.images(4864) == step.images(4802) == "1 x 784x392"
    assert frontier.TrainStep(dataclasses.replace(spec, batch=2)).rows_run(4864) == 2 * 35 * 70

    def measure(rows):  # 1000 bytes per pixel that ran: up to 5,000 pixels fit
        return {"fits": step.rows_run(rows) * 1000 <= 5_000_000, "peak_bytes": step.rows_run(rows) * 1000}

    result = frontier.search(spec, measure, 5_000_000, start_n=4096, step=256, tol=0.05, max_n=2**26,
                             deadline=math.inf, lower_bound=lambda rows: 0)
    assert (result.largest_n, result.smallest_failing_n) == (4802, 5202)  # 784x392 fits, 816x408 does not
    assert result.peak_bytes == 4802 * 1000
    for probe in result.probes:
        assert probe["N"] == step.rows_run(probe["requested_n"]) != probe["requested_n"]
    assert "4,802" in frontier._table([result]) and "(1 x 784x392 images)" in frontier._table([result])
    # The loss step runs the N asked for: no requested_n.
    loss = frontier.search(dataclasses.replace(spec, step="loss"), measure, 5_000_000, start_n=4096, step=256, tol=0.05,
                           max_n=2**26, deadline=math.inf, lower_bound=lambda rows: 0)
    assert all("requested_n" not in probe and probe["N"] % 256 == 0 for probe in loss.probes)


def test_report_reads_runner_output(tmp_path):
    case = harness.Case("max-fwd", "torch", 64, 8, 16, "fp32")
    harness.configure_for_benchmarks(False)
    try:
        entry = bench_run.run_case(case, rounds=2, warmup=0, measure_memory=False)
        ref = bench_run.run_case(harness.Case("max-fwd", "reference", 64, 8, 16, "fp32"), rounds=2, warmup=0, measure_memory=False)
    finally:
        cossim_fast.set_strict(False)
        cossim_fast.set_value_checks(True)
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"machine_info": harness.machine_info(), "benchmarks": [entry, ref]}))
    assert report.main([str(path), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| max-fwd | 64 | 8 | 16 | fp32 | torch |" in text and "1.00x" in text


def test_targets_and_auto_rule():
    from bench import targets

    def row(op, impl, ms, dim=256, peak=None):
        return {"op": op, "impl": impl, "N": 131072, "M": 4096, "C": dim, "dtype": "bf16", "median_ms": ms, "peak_mib": peak}

    rows = [
        row("max-fwd_bwd", "per_class", 30.0), row("max-fwd_bwd", "triton", 6.0), row("max-fwd_bwd", "cuda", 12.0),
        row("max-fwd", "class_gemm", 1.0), row("max-fwd", "triton", 2.0, peak=3.0), row("max-fwd", "cuda", 1.25),
        row("max-fwd_bwd", "per_class", 30.0, dim=2048), row("max-fwd_bwd", "triton", 25.0, dim=2048),
    ]
    checks = {(c["backend"], c["target"], c["C"]): c for c in targets.evaluate(rows)}
    speed = checks[("triton", "fwd+bwd vs per-class", 256)]
    assert speed["value"] == 5.0 and speed["met"]
    assert not checks[("cuda", "fwd+bwd vs per-class", 256)]["met"]  # 2.5x < 3x
    assert not checks[("triton", "fwd+bwd vs per-class", 2048)]["met"]  # 1.2x < 1.5x
    assert checks[("cuda", "forward vs cuBLAS class GEMMs", 256)]["value"] == 0.8
    assert not checks[("triton", "forward vs cuBLAS class GEMMs", 256)]["met"]  # 0.5 < 0.6
    memory = checks[("triton", "extra memory per row", 256)]
    assert memory["value"] == 3.0 * 2**20 / 131072 - 12 and memory["met"]  # 12 B/row
    rule = {(r["op"], r["C"]): r["faster"] for r in targets.auto_rule(rows)}
    assert rule == {("max-fwd_bwd", 256): "triton", ("max-fwd", 256): "cuda"}
    # The torch backend contends where it was measured too, never alone.
    with_torch = rows + [row("max-fwd", "torch", 1.1), row("max-fwd", "torch", 0.5, dim=2048), row("max-fwd_bwd", "torch", 7.0)]
    rule = {(r["op"], r["C"]): (r["faster"], r["torch_ms"]) for r in targets.auto_rule(with_torch)}
    assert rule == {("max-fwd_bwd", 256): ("triton", 7.0), ("max-fwd", 256): ("torch", 1.1)}
    assert "| triton | fwd+bwd vs per-class |" in targets.markdown(targets.evaluate(rows), targets.auto_rule(rows))
    # What could not be checked says so, with the reason the run recorded.
    missing = {"max-fwd_bwd-cuda-N131072-M4096-C2048-bf16": "not run (time budget spent)"}
    checks = {(c["backend"], c["target"], c["C"]): c for c in targets.evaluate(rows, missing)}
    assert checks[("cuda", "fwd+bwd vs per-class", 2048)]["met"] is None
    assert checks[("cuda", "fwd+bwd vs per-class", 2048)]["why"] == "cuda: not run (time budget spent)"
    assert checks[("triton", "forward vs cuBLAS class GEMMs", 2048)]["why"] == "triton: no result; class_gemm: no result"
    assert checks[("cuda", "extra memory per row", 256)]["why"] == "cuda: no peak memory recorded"
    assert ("triton", "fwd+bwd vs per-class", 256) in checks and all(c["op"] != "all-fwd_bwd" for c in checks.values())
    assert "not measured: cuda: not run" in targets.markdown(list(checks.values()), [])
    # A run without the per-class baseline, without memory and without cuda (graph timing of
    # Triton, say): only what it measured, no rows of "not measured".
    graphed = [row("max-fwd", "class_gemm", 1.0), row("max-fwd", "triton", 2.0), row("max-fwd_bwd", "triton", 6.0)]
    assert {(c["backend"], c["target"]) for c in targets.evaluate(graphed)} == {("triton", "forward vs cuBLAS class GEMMs")}
    # A backend measured at another fp32 precision says so in its rows.
    tf32x3 = [row("max-fwd", "class_gemm", 1.0) | {"dtype": "fp32"}, row("max-fwd", "triton", 2.0) | {"dtype": "fp32", "fp32_precision": "tf32x3"}]
    assert "| triton (tf32x3) | forward vs cuBLAS class GEMMs |" in targets.markdown(targets.evaluate(tf32x3), [])


def test_targets_keep_the_dtypes_asked_for(tmp_path, capsys):
    from bench import targets

    def result(impl, ms, dtype):
        extra = {"op": "max-fwd", "impl": impl, "N": 16, "M": 8, "C": 256, "dtype": dtype, "median_ms": ms}
        return {"extra_info": extra, "stats": {}}

    path = tmp_path / "results.json"
    path.write_text(json.dumps({"benchmarks": [result(i, 1.0, d) for i in ("triton", "class_gemm") for d in ("bf16", "fp32")],
                                "not_run": ["max-fwd-triton-N16-M8-C2048-bf16"]}))
    assert targets.main([str(path), "--dtypes", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "| fp32 |" in out and "bf16" not in out


def test_targets_write_rule_from_results_files(tmp_path):
    from bench import targets
    from cossim_fast.backends import auto_rule

    def result(impl, ms):
        extra = {"op": "max-fwd", "impl": impl, "N": 131072, "M": 4096, "C": 256, "dtype": "bf16", "median_ms": ms}
        return {"extra_info": extra, "stats": {}}

    machine = {"gpu": "NVIDIA H100 80GB HBM3", "gpu_capability": "9.0"}
    results = tmp_path / "bench.json"
    results.write_text(json.dumps({"machine_info": machine, "benchmarks": [result("triton", 1.0), result("cuda", 0.8)]}))
    rule = tmp_path / "auto_rule.json"
    assert targets.main([str(results), "--write-rule", str(rule)]) == 0
    (entry,) = auto_rule.measurements(rule)
    assert (entry["arch"], entry["op"], entry["dtype"], entry["faster"], entry["gpu"]) == (
        "9.0", "max_forward", "bfloat16", "cuda", "NVIDIA H100 80GB HBM3")
    with pytest.raises(SystemExit):  # would overwrite a results file
        targets.main([str(results), "--write-rule", str(results)])
    other = tmp_path / "bench_a100.json"
    other.write_text(json.dumps({"machine_info": dict(machine, gpu_capability="8.0"), "benchmarks": []}))
    with pytest.raises(SystemExit):  # two GPU architectures in one rule
        targets.main([str(results), str(other), "--write-rule", str(rule)])


def test_autotune_check_names_the_fastest_candidate_timed_alone():
    from bench import autotune_check

    result = {"default_ms": 2.0, "candidate_ms": {"a": 2.0, "b": 1.6, "c": "unfit: OutOfResources"}}
    assert autotune_check.fastest(result) == "b (1.25x)"
