"""The benchmark grid without pytest-benchmark, writing its JSON after every case.

Same cases, inputs, timing protocol and ``extra_info`` as ``bench/test_bench_ops.py``, and a JSON
file in pytest-benchmark's layout (``machine_info``, ``benchmarks[].{name, group, stats,
extra_info}``) that ``bench/report.py`` reads. Because the file is rewritten after each case and
``--time-budget`` stops starting new cases, a run cut short by a timeout still leaves its
results: this is what ``bench/gpu_check.sh`` uses.

    python -m bench.run --grid gpu --json out.json [--time-budget 150] [--ops ...] [--impls ...]

``--timing graph`` (CUDA only) times replays of a CUDA graph of each call instead: the device's
time alone, without the host path (argument checks, dispatch, launches), which the default
``eager`` timing includes as a user's training step does. The two side by side say how much of
a call is host time; the backward phase, which needs a fresh forward per call, is not graphed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

import torch

from bench import harness


def time_case(prepared: harness.Prepared, rounds: int, warmup: int) -> list[float]:
    """Seconds per call (the target synchronizes the GPU itself), after ``warmup`` calls."""
    seconds = []
    for index in range(warmup + rounds):
        args, kwargs = prepared.setup() if prepared.setup else ((), {})
        start = time.perf_counter()
        prepared.target(*args, **kwargs)
        elapsed = time.perf_counter() - start
        del args, kwargs
        if index >= warmup:
            seconds.append(elapsed)
    return seconds


def graph_replay_seconds(prepared: harness.Prepared, rounds: int, warmup: int) -> list[float]:
    """Seconds per replay of a CUDA graph of ``prepared.body`` (CUDA events), after ``warmup``
    replays; the body runs a few times eagerly on a side stream first, as capture requires."""
    if prepared.body is None:
        raise ValueError("this case has no setup-free body to capture (the backward phase)")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            prepared.body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        prepared.body()
    for _ in range(warmup):
        graph.replay()
    seconds = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    del graph
    return seconds


def stats_of(seconds: list[float]) -> dict:
    """pytest-benchmark's statistics names (seconds), raw data included."""
    mean = sum(seconds) / len(seconds)
    variance = sum((s - mean) ** 2 for s in seconds) / max(1, len(seconds) - 1)
    q1, q3 = harness.percentile(seconds, 25), harness.percentile(seconds, 75)
    return {
        "min": min(seconds),
        "max": max(seconds),
        "mean": mean,
        "stddev": variance**0.5,
        "median": harness.percentile(seconds, 50),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "rounds": len(seconds),
        "iterations": 1,
        "data": seconds,
    }


def write_json(path: str, document: dict) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as out:
        json.dump(document, out, indent=1)
    os.replace(temporary, path)


def run_case(case: harness.Case, rounds: int, warmup: int, measure_memory: bool, timing: str = "eager") -> dict:
    memory = harness.measure_peak(case) if measure_memory else {"peak_mib": None, "peak_method": "not measured"}
    prepared = harness.prepare(case)
    if timing == "graph":
        seconds = graph_replay_seconds(prepared, rounds, warmup)
    else:
        seconds = time_case(prepared, rounds, warmup)
    info = harness.extra_info(case, prepared, seconds, memory, timing)
    del prepared
    return {
        "group": case.group,
        "name": f"test_bench[{case.id}]",
        "fullname": f"bench/run.py::{case.id}",
        "params": {"bench_case": case.id},
        "param": case.id,
        "extra_info": info,
        "stats": stats_of(seconds),
    }


def _count(least: int):
    """An argparse type: an integer of at least ``least`` (a zero or negative count is an error,
    never the default in disguise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=tuple(harness.GRIDS), default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(harness.OPS)}")
    parser.add_argument("--impls", default=None, help=f"comma-separated subset of {','.join(harness.IMPLS)}")
    parser.add_argument("--json", required=True, help="output file (pytest-benchmark layout)")
    parser.add_argument("--rounds", type=_count(1), default=None,
                        help="timed calls per case, >= 1 (default: COSSIM_BENCH_ROUNDS, else CPU 3, GPU 10)")
    parser.add_argument("--warmup", type=_count(0), default=None,
                        help="untimed calls before them, >= 0 (default: COSSIM_BENCH_WARMUP, else CPU 1, GPU 3)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds after which no new case starts")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--check-values", action="store_true",
                        help="keep the package's value checks on, in the timed calls and the CPU memory probe (default: off)")
    parser.add_argument("--timing", choices=("eager", "graph"), default="eager",
                        help="eager: wall time of each call (default); graph: CUDA graph replays (device time)")
    args = parser.parse_args(argv)

    def split(value: str | None) -> tuple[str, ...] | None:
        return tuple(v for v in value.split(",") if v) if value else None

    cases = harness.grid_cases(args.grid, args.device, ops=split(args.ops), impls=split(args.impls))
    device = cases[0].device if cases else (args.device or harness.default_device())
    default_rounds, default_warmup = harness.timing_defaults(device)
    rounds = default_rounds if args.rounds is None else args.rounds
    warmup = default_warmup if args.warmup is None else args.warmup
    if args.timing == "graph" and device != "cuda":
        parser.error(f"--timing graph needs CUDA tensors (--device cuda), not {device}")
    harness.configure_for_benchmarks(args.check_values)

    started = time.monotonic()
    document = {
        "machine_info": harness.machine(),
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": "bench.run",
        "timing": args.timing,
        "benchmarks": [],
        "skipped": [],
        "errors": [],
        "not_run": [],
    }
    print(f"{len(cases)} cases on {device}; machine: {json.dumps(harness.machine())}", flush=True)
    for number, case in enumerate(cases, 1):
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            document["not_run"] = [c.id for c in cases[number - 1 :]]
            print(f"time budget of {args.time_budget:.0f} s spent: {len(cases) - number + 1} cases not run", flush=True)
            break
        reason = harness.skip_reason(case)
        if reason is None and args.timing == "graph" and case.phase == "bwd":
            reason = "a CUDA graph of the backward phase alone would replay it without a fresh forward"
        if reason:
            document["skipped"].append({"case": case.id, "reason": reason})
            print(f"[{number}/{len(cases)}] {case.id}: SKIPPED {reason}", flush=True)
            continue
        try:
            entry = run_case(case, rounds, warmup, not args.no_memory, args.timing)
        except Exception as error:  # noqa: BLE001 - one broken case must not end the run
            message = f"{type(error).__name__}: {error}"
            document["errors"].append({"case": case.id, "error": message[:2000], "traceback": traceback.format_exc()[-3000:]})
            print(f"[{number}/{len(cases)}] {case.id}: ERROR {message[:500]}", flush=True)
            if isinstance(error, torch.cuda.OutOfMemoryError):
                harness.clear_cache()
        else:
            document["benchmarks"].append(entry)
            info = entry["extra_info"]
            peak = "n/a" if info.get("peak_mib") is None else f"{info['peak_mib']:.1f} MiB"
            tflops = "" if info.get("tflops") is None else f", {info['tflops']:.2f} TFLOP/s"
            print(f"[{number}/{len(cases)}] {case.id}: {info['median_ms']:.3f} ms (p20 {info['p20_ms']:.3f}, p80 {info['p80_ms']:.3f}), peak {peak}{tflops}", flush=True)
        write_json(args.json, document)
    document["elapsed_s"] = time.monotonic() - started
    write_json(args.json, document)
    print(f"wrote {args.json}: {len(document['benchmarks'])} results, {len(document['skipped'])} skipped, {len(document['errors'])} errors", flush=True)
    return 1 if document["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
