"""The CPU figures of the benchmark issue, as a plain pytest test with a clear assert.

At N = 16384, K = 19, M = 1024, C = 256, fp32, loss forward + backward: the "torch" backend's
peak memory beyond its inputs must be at most 10% of "reference"'s, at no more than 1.3x its
time. The per-class baseline is measured beside them (reported, not asserted).

Every peak comes from a fresh interpreter per implementation (``bench/memprobe.py``, spawn
mode). The times come from one more fresh interpreter that runs the implementations in turn,
round after round, so a load change on this shared machine hits all of them alike; the median
per implementation is compared.

    python -m pytest bench/test_cpu_figures.py -s      (about two minutes on 2 cores)

``COSSIM_BENCH_FIGURES_JSON=path`` also writes the figures to a JSON file.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

N, K, M, C = 16384, 19, 1024, 256
IMPLS = ("reference", "torch", "per_class")
ROUNDS = 5
MEMORY_RATIO, TIME_RATIO = 0.10, 1.3

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")]


def interleaved_times(mode: str, rounds: int) -> dict:
    """In a fresh process: per implementation, the seconds of each loss forward + backward."""
    from bench import harness

    harness.configure_for_benchmarks(False)
    prepared = {impl: harness.prepare(harness.Case(f"{mode}-fwd_bwd", impl, N, M, C, "fp32")) for impl in IMPLS}
    for impl in IMPLS:
        harness.call_once(prepared[impl])  # warm-up
    seconds = {impl: [] for impl in IMPLS}
    for _ in range(rounds):
        for impl in IMPLS:
            start = time.perf_counter()
            prepared[impl].target()
            seconds[impl].append(time.perf_counter() - start)
    return {"seconds": seconds, "machine": harness.machine()}


def measure(mode: str) -> dict:
    from bench import harness, memprobe

    probe = memprobe.MemoryProbe("spawn")
    figures = {"mode": mode, "N": N, "K": K, "M": M, "C": C, "dtype": "fp32"}
    for impl in IMPLS:
        case = harness.Case(f"{mode}-fwd_bwd", impl, N, M, C, "fp32")
        reply = probe.run({"case": case.to_dict(), "timeout": 900})
        assert reply.get("ok"), f"peak memory of {impl} could not be measured: {reply.get('error')}\n{reply.get('traceback', '')}"
        figures[impl] = {"peak_mib": reply["peak_mib"]}
    reply = probe.run({"function": "bench.test_cpu_figures:interleaved_times", "kwargs": {"mode": mode, "rounds": ROUNDS}, "timeout": 1800})
    assert reply.get("ok"), f"timing failed: {reply.get('error')}\n{reply.get('traceback', '')}"
    figures["machine"] = reply["machine"]
    for impl in IMPLS:
        data = reply["seconds"][impl]
        figures[impl].update(
            median_ms=harness.percentile(data, 50) * 1e3,
            p20_ms=harness.percentile(data, 20) * 1e3,
            p80_ms=harness.percentile(data, 80) * 1e3,
        )
    return figures


def describe(figures: dict) -> str:
    reference = figures["reference"]
    machine = figures["machine"]
    lines = [
        (
            f"loss {figures['mode']} forward+backward, N={N} K={K} M={M} C={C} fp32 on {machine['cpu']} "
            f"({machine['cpu_count']} cores, {machine['torch_threads']} torch thread(s), torch {machine['torch']})"
        ),
        f"{'impl':<10} {'peak MiB':>9} {'vs ref':>7} {'median ms':>10} {'p20-p80 ms':>17} {'vs ref':>7}",
    ]
    for impl in IMPLS:
        row = figures[impl]
        lines.append(
            f"{impl:<10} {row['peak_mib']:>9.1f} {row['peak_mib'] / reference['peak_mib']:>6.1%} {row['median_ms']:>10.1f} "
            f"{row['p20_ms']:>8.1f}-{row['p80_ms']:<8.1f} {row['median_ms'] / reference['median_ms']:>6.2f}x"
        )
    return "\n".join(lines)


@pytest.mark.parametrize("mode", ["max", "all"])
def test_torch_backend_memory_and_time_against_reference(mode, record_property):
    figures = measure(mode)
    text = describe(figures)
    print("\n" + text)
    record_property("figures", json.dumps(figures))
    path = os.environ.get("COSSIM_BENCH_FIGURES_JSON")
    if path:
        existing = {}
        if os.path.exists(path):
            with open(path) as handle:
                existing = json.load(handle)
        existing[mode] = figures
        with open(path, "w") as out:
            json.dump(existing, out, indent=1)
    reference, fused = figures["reference"], figures["torch"]
    dense_mib = N * K * M * 4 / 2**20
    assert reference["peak_mib"] > dense_mib, f"the reference should show its {dense_mib:.0f} MiB N x K*M matrix\n{text}"
    assert fused["peak_mib"] <= MEMORY_RATIO * reference["peak_mib"], (
        f"torch backend peak {fused['peak_mib']:.1f} MiB is over {MEMORY_RATIO:.0%} of the reference's "
        f"{reference['peak_mib']:.1f} MiB\n{text}"
    )
    assert fused["median_ms"] <= TIME_RATIO * reference["median_ms"], (
        f"torch backend median {fused['median_ms']:.1f} ms is over {TIME_RATIO}x the reference's "
        f"{reference['median_ms']:.1f} ms\n{text}"
    )
