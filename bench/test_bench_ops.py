"""The benchmark grid: every implementation against "reference" and the per-class baseline.

One test per case (operation x implementation x N x M x C x dtype; see ``bench/harness.py``).
Results go to pytest-benchmark (``--benchmark-json out.json``) with ``extra_info`` holding the
peak memory, the achieved TFLOP/s, p20/p80 and the machine; ``python -m bench.report out.json``
turns them into a table and plots.
"""

import pytest

from bench import harness

pytest.importorskip("pytest_benchmark")


def test_bench(bench_case, benchmark, bench_settings):
    reason = harness.skip_reason(bench_case)
    if reason:
        pytest.skip(reason)
    if bench_settings["measure_memory"]:
        memory = harness.measure_peak(bench_case)
    else:
        memory = {"peak_mib": None, "peak_method": "not measured (--bench-no-memory)"}
    prepared = harness.prepare(bench_case)
    rounds, warmup = harness.timing_defaults(bench_case.device)
    benchmark.group = bench_case.group
    benchmark.pedantic(prepared.target, setup=prepared.setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    seconds = list(benchmark.stats.stats.data) if benchmark.stats else []
    if seconds:
        benchmark.extra_info.update(harness.extra_info(bench_case, prepared, seconds, memory))
    else:  # --benchmark-disable: ran once, nothing timed
        benchmark.extra_info.update(bench_case.to_dict(), **memory)
