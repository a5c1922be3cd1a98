"""Checks of ``bench.report`` and ``bench.targets`` (no timing): the committed results still give
their committed tables, files from different machines or timings are refused, cases without a
result are listed, small ratios keep their digits, unreadable files are clear errors.

    python -m pytest bench/test_report.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import harness, report, targets

RESULTS = Path(__file__).parent / "results"
#: The committed GPU runs whose report/ and targets.log were made from bench.json + bench_cuda.json.
GPU_RUNS = ("2026-11-27-h200", "2026-11-27-h200-run2")


def _table_rows(text: str) -> list[list[str]]:
    return [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and not line.startswith("| op ")]


def _files(run: str) -> list[str]:
    return [str(RESULTS / run / "bench.json"), str(RESULTS / run / "bench_cuda.json")]


def _document(rows: list[dict], machine: dict | None = None, timing: str = "eager", **lists) -> dict:
    """A bench.run file of ``rows`` (extra_info fields), on this machine by default."""
    benchmarks = [{"extra_info": {"N": 64, "M": 8, "C": 16, "dtype": "fp32", "device": "cpu", "timing": timing} | row,
                   "stats": {}} for row in rows]
    return {"machine_info": machine or harness.machine(), "timing": timing, "benchmarks": benchmarks, **lists}


def _write(path: Path, document: dict) -> str:
    path.write_text(json.dumps(document))
    return str(path)


@pytest.mark.parametrize("run", GPU_RUNS)
def test_committed_results_give_their_committed_tables(run, tmp_path):
    assert report.main([*_files(run), "--out", str(tmp_path), "--no-plots"]) == 0
    committed = _table_rows((RESULTS / run / "report" / "report.md").read_text())
    made = _table_rows((tmp_path / "report.md").read_text())
    assert len(made) == len(committed)
    for old, new in zip(committed, made):
        assert new[:10] == old[:10]  # the case, times, TFLOP/s and peak of every row
        for old_ratio, new_ratio in zip(old[10:], new[10:]):  # the ratios, now with more digits when small
            if old_ratio.strip() == "-":
                assert new_ratio.strip() == "-"
            else:
                assert abs(float(old_ratio.strip()[:-1]) - float(new_ratio.strip()[:-1])) <= 0.005 + 1e-9, (old, new)


@pytest.mark.parametrize("run", GPU_RUNS)
def test_committed_results_give_their_committed_targets(run, capsys):
    assert targets.main(_files(run)) == 0
    checks = capsys.readouterr().out.split("\n\n")[0]
    assert checks == (RESULTS / run / "targets.log").read_text().split("\n\n")[0]


def test_results_of_another_machine_are_refused(tmp_path, capsys):
    # A CPU run of the update (this machine, no GPU) beside the H200's files: its rows would
    # replace the H200's, and the ratios would divide a CPU time by a GPU time.
    cpu_rows = [{"op": "update", "impl": impl, "N": 16384, "M": 4096, "C": 256, "dtype": "bf16", "median_ms": 20.0}
                for impl in ("torch", "per_class")]
    cpu = _write(tmp_path / "cpu_update.json", _document(cpu_rows, dict(harness.machine(), gpu=None)))
    for main, extra in ((report.main, ["--out", str(tmp_path / "mixed"), "--no-plots"]), (targets.main, [])):
        with pytest.raises(SystemExit):
            main([*_files(GPU_RUNS[0]), cpu, *extra])
        error = capsys.readouterr().err
        assert "different machines, devices or timing modes" in error
        assert "GPU: NVIDIA H200 in" in error and f"none in {cpu}" in error
        assert f"device: cuda in {_files(GPU_RUNS[0])[0]}" in error and f"cpu in {cpu}" in error
    assert not (tmp_path / "mixed" / "report.md").exists()


def test_results_of_another_timing_are_refused(tmp_path, capsys):
    row = {"op": "max-fwd", "impl": "torch", "median_ms": 1.0}
    eager = _write(tmp_path / "eager.json", _document([row]))
    graph = _write(tmp_path / "graph.json", _document([row], timing="graph"))
    with pytest.raises(SystemExit):
        report.main([eager, graph, "--out", str(tmp_path), "--no-plots"])
    assert f"timing: eager in {eager}; graph in {graph}" in capsys.readouterr().err
    # Files of one machine and timing make one table (the later file's row wins), as before.
    later = _write(tmp_path / "later.json", _document([row | {"median_ms": 2.0}]))
    loaded = report.load([eager, later])
    assert [r["median_ms"] for r in loaded.rows] == [1.0, 2.0] and len(report.by_case(loaded.rows)) == 1


def test_report_lists_the_cases_without_a_result(tmp_path):
    measured = [{"op": "max-fwd", "impl": "torch", "median_ms": 1.0}]
    first = _write(tmp_path / "a.json", _document(
        measured,
        skipped=[{"case": "max-fwd-triton-N64-M8-C16-fp32", "reason": "triton on CPU is not benchmarked"}],
        errors=[{"case": "max-fwd-per_class-N64-M8-C16-fp32", "error": "RuntimeError: boom\nmore lines"}],
        not_run=["max-fwd-reference-N64-M8-C16-fp32", "max-fwd-class_gemm-N64-M8-C16-fp32"],
    ))
    # A case one file did not reach and another measured has its result: it is not "not run".
    second = _write(tmp_path / "b.json", _document([{"op": "max-fwd", "impl": "class_gemm", "median_ms": 0.5}]))
    assert report.main([first, second, "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Skipped (1):" in text and "triton on CPU is not benchmarked: 1 case(s), e.g. `max-fwd-triton-N64-M8-C16-fp32`" in text
    assert "Failed (1):" in text and "- `max-fwd-per_class-N64-M8-C16-fp32`: RuntimeError: boom\n" in text
    assert "Not run (1: the run's time budget was spent before them):" in text
    assert "- `max-fwd-reference-N64-M8-C16-fp32`" in text and "- `max-fwd-class_gemm" not in text


def test_report_lists_the_committed_runs_not_run_cases(tmp_path):
    assert report.main([*_files(GPU_RUNS[0]), "--out", str(tmp_path), "--no-plots"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "Not run (28: " in text  # 26 cases of bench.json, 2 of bench_cuda.json
    assert "- `max-bwd-triton-N131072-M4096-C2048-fp32`" in text and "- `update-cuda-N131072-M4096-C2048-fp32`" in text


def test_pytest_benchmark_json_keeps_the_skip_reasons(tmp_path):
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "results.json"
    grid = {"COSSIM_BENCH_N": "64", "COSSIM_BENCH_M": "8", "COSSIM_BENCH_C": "16", "COSSIM_BENCH_DTYPES": "fp32"}
    env = harness.python_path_env() | grid
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/test_bench_ops.py", "--bench-device", "cpu",
         "--bench-ops", "max-fwd", "--bench-impls", "torch,triton", "--bench-no-memory", f"--benchmark-json={out}"],
        cwd=harness.repo_root(), env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads(out.read_text())
    assert [entry["case"] for entry in document["skipped"]] == ["max-fwd-triton-N64-M8-C16-fp32"] and document["errors"] == []
    assert report.main([str(out), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Skipped (1):" in text and "triton on CPU runs only in Triton's interpreter" in text


def test_a_failed_benchmark_case_is_recorded_for_the_json():
    from bench import conftest

    case = harness.Case("max-fwd", "torch", 64, 8, 16, "fp32")
    item = SimpleNamespace(callspec=SimpleNamespace(params={"bench_case": case}), config=SimpleNamespace(stash=pytest.Stash()))
    failed = SimpleNamespace(skipped=False, failed=True, longreprtext="Traceback ...\nRuntimeError: boom")
    call = SimpleNamespace(excinfo=SimpleNamespace(typename="RuntimeError", value=RuntimeError("boom")))
    hook = conftest.pytest_runtest_makereport(item, call)
    next(hook)
    with pytest.raises(StopIteration):
        hook.send(SimpleNamespace(get_result=lambda: failed))
    output: dict = {}
    conftest.pytest_benchmark_update_json(item.config, [], output)
    assert output["skipped"] == [] and [(e["case"], e["error"]) for e in output["errors"]] == [(case.id, "RuntimeError: boom")]


@pytest.mark.parametrize(
    "content, what", [("", "is empty"), ('{"benchmarks": [', "is not valid JSON"), ("[]", "holds a JSON list, not an object")]
)
def test_an_unreadable_results_file_is_a_clear_error(tmp_path, capsys, content, what):
    bad = tmp_path / "bench.json"
    bad.write_text(content)
    for main, extra in ((report.main, ["--out", str(tmp_path / "out")]), (targets.main, [])):
        with pytest.raises(SystemExit):
            main([str(bad), *extra])
        error = capsys.readouterr().err
        assert f"results file {bad} {what}" in error and "bench.run" in error
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")])
    assert f"cannot read results file {tmp_path / 'missing.json'}" in capsys.readouterr().err


def test_small_ratios_keep_two_significant_digits():
    assert report._ratio(0.476, 12177) == "0.000039x"  # triton's memory against the reference's
    assert report._ratio(0.330, 12177) == "0.000027x"
    assert report._ratio(19.3, 146) == "0.13x" and report._ratio(27.3, 5.58) == "4.89x" and report._ratio(1, 1) == "1.00x"
    assert report._ratio(0.00996, 1) == "0.010x" and report._ratio(0.0996, 1) == "0.10x"
    assert report._ratio(0, 146) == "0.00x" and report._ratio(1, 0) == "-" and report._ratio(None, 1) == "-"


def test_the_header_shows_what_the_files_disagree_on(tmp_path):
    row = {"op": "max-fwd", "impl": "torch", "median_ms": 1.0}
    first = _document([row]) | {"datetime": "2026-11-27T11:51:51+00:00"}
    second = _document([row | {"impl": "reference"}], dict(harness.machine(), torch="9.9"))
    second["datetime"] = "2026-11-27T11:52:55+00:00"
    loaded = report.load([_write(tmp_path / "a.json", first), _write(tmp_path / "b.json", second)])
    assert loaded.machine["torch"] == f"{harness.machine()['torch']} / 9.9"
    assert loaded.machine["date"] == "2026-11-27T11:51:51+00:00 to 2026-11-27T11:52:55+00:00"
