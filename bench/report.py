"""Benchmark JSON -> one markdown table and PNG plots of time and peak memory against N.

    python -m bench.report results.json [more.json ...] --out DIR [--print] [--print-ops ...]

Reads pytest-benchmark JSON (``--benchmark-json``) or ``python -m bench.run`` output. Writes
``DIR/report.md`` (per case and implementation: median, p20/p80, TFLOP/s, peak MiB, and the
ratios to "reference" and to the per-class baseline side by side) and, with matplotlib,
``DIR/time_<op>.png`` and ``DIR/memory_<op>.png`` (one panel per M, C, dtype; one line per
implementation). ``--print`` also prints a compact time/memory table to stdout. The report also
lists the cases without a result: skipped (with the reason), failed, and not run (bench.run's
time budget).

Several files are combined into one table (e.g. ``bench.json`` and ``bench_cuda.json`` of one
``gpu_check.sh`` run), one row per case and implementation, a later file's row replacing an
earlier one's. Files measured on another machine (CPU model or GPU), device or timing mode are
refused: their rows would replace each other's and the ratios would compare across machines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field

#: What a time means, by how it was taken (bench.run --timing).
TIMING_NOTES = {
    "eager": "Timing: eager, the wall time of each call, its host path (checks, dispatch, launches) included.",
    "graph": "Timing: CUDA graph replays, the device's time alone (no host path).",
}
IMPL_ORDER = ("reference", "per_class", "class_gemm", "keops", "torch", "triton", "cuda")
OP_ORDER = ("max-fwd", "max-bwd", "max-fwd_bwd", "all-fwd", "all-bwd", "all-fwd_bwd", "update")


def _percentile(data: list[float], q: float) -> float:
    ordered = sorted(data)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def machine_of(document: dict) -> dict:
    """The machine a results document was measured on (bench.run's or pytest-benchmark's layout)."""
    info = document.get("machine_info", {})
    return info.get("cossim_fast_bench", info)


def read_document(path: str) -> dict:
    """One results file as JSON; ``ValueError`` naming the file when it is missing, empty or not
    a JSON object (a run killed before its first write, a redirect of the wrong output)."""
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError as error:
        raise ValueError(f"cannot read results file {path}: {error.strerror or error}") from None
    expected = "expected the JSON of pytest-benchmark (--benchmark-json) or python -m bench.run"
    if not text.strip():
        raise ValueError(f"results file {path} is empty: {expected}")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"results file {path} is not valid JSON ({error}): {expected}") from None
    if not isinstance(document, dict):
        raise ValueError(f"results file {path} holds a JSON {type(document).__name__}, not an object: {expected}")
    return document


def case_id(row: dict) -> str:
    """The ``harness.Case.id`` of a row (how skipped, failed and not-run cases are named)."""
    return f"{row['op']}-{row['impl']}-N{row['N']}-M{row['M']}-C{row['C']}-{row['dtype']}"


#: What must be the same for every row of one report, with how to read it from a row and its
#: file's machine: a case measured twice under different values would have one row replace the
#: other, and the ratios would compare a CPU with a GPU, or eager with graph timing.
#: None: not recorded (a hand-made file), which agrees with anything.
ORIGIN = {
    "CPU": lambda row, machine: machine.get("cpu"),
    "GPU": lambda row, machine: (machine["gpu"] or "none") if "gpu" in machine else None,
    "device": lambda row, machine: row.get("device"),
    "timing": lambda row, machine: row.get("timing"),
}


def _check_one_origin(origins: dict[str, dict[str, list[str]]]) -> None:
    """``origins``: what (ORIGIN's keys) -> value -> files. Raises ValueError when the files
    disagree on any of them."""
    differences = []
    for what, files_of in origins.items():
        if len(files_of) > 1:
            sides = "; ".join(f"{value!s} in {', '.join(files)}" for value, files in files_of.items())
            differences.append(f"{what}: {sides}")
    if differences:
        raise ValueError(
            "these results come from different machines, devices or timing modes and cannot share one "
            "table (a case's rows would replace each other and the ratios would compare across them): "
            + " | ".join(differences)
            + ". Report each machine, device and timing mode separately."
        )


def _merge_machines(machines: list[dict]) -> dict:
    """One machine description for the header: a value the files disagree on (a version, say)
    shows every value, in file order."""
    merged: dict = {}
    for key in dict.fromkeys(key for machine in machines for key in machine):
        values = list(dict.fromkeys(json.dumps(m[key], sort_keys=True) for m in machines if key in m))
        values = [json.loads(value) for value in values]
        merged[key] = values[0] if len(values) == 1 else " / ".join(map(str, values))
    return merged


@dataclass
class Results:
    """What a set of results files holds: one flat row per benchmark result, the machine, and
    the cases without a result (``skipped``: ``{"case", "reason"}``; ``errors``: ``{"case",
    "error"}``; ``not_run``: case ids), those with a result in any file left out."""

    rows: list[dict]
    machine: dict
    skipped: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    documents: list[dict] = field(default_factory=list)


def load(paths: list[str]) -> Results:
    """The rows of every file (ValueError, naming the files, when one cannot be read or when
    they come from different machines, devices or timing modes)."""
    rows, machines, dates, documents = [], [], [], []
    skipped, errors, not_run = [], [], []
    origins: dict[str, dict[str, list[str]]] = {what: {} for what in ORIGIN}
    for path in paths:
        document = read_document(path)
        documents.append(document)
        machine = dict(machine_of(document))
        file_rows = []
        for bench in document.get("benchmarks", []):
            extra, stats = bench.get("extra_info", {}), bench.get("stats", {})
            if "op" not in extra or "impl" not in extra:
                continue  # not one of ours
            data = stats.get("data") or []
            median_ms = extra.get("median_ms", stats.get("median", float("nan")) * 1e3)
            row = {key: extra.get(key) for key in ("op", "impl", "N", "M", "C", "dtype", "device", "peak_mib", "tflops", "rounds")}
            row["timing"] = extra.get("timing", "eager")
            row["fp32_precision"] = extra.get("fp32_precision")
            row["median_ms"] = median_ms
            row["p20_ms"] = extra.get("p20_ms", _percentile(data, 20) * 1e3 if data else None)
            row["p80_ms"] = extra.get("p80_ms", _percentile(data, 80) * 1e3 if data else None)
            if extra.get("machine"):
                machine.update({k: v for k, v in extra["machine"].items() if k not in machine})
            file_rows.append(row)
        # A file without results still says its machine (and bench.run's its timing).
        for row in file_rows or [{"timing": document.get("timing")}]:
            for what, read in ORIGIN.items():
                value = read(row, machine)
                if value is not None:
                    files = origins[what].setdefault(str(value), [])
                    if path not in files:
                        files.append(path)
        rows += file_rows
        machines.append(machine)
        if document.get("datetime"):
            dates.append(document["datetime"])
        skipped += document.get("skipped", [])
        errors += document.get("errors", [])
        not_run += document.get("not_run", [])
    _check_one_origin(origins)
    merged = _merge_machines(machines)
    if dates:
        merged["date"] = min(dates) if min(dates) == max(dates) else f"{min(dates)} to {max(dates)}"
    measured = {case_id(row) for row in rows}  # e.g. a case cut by one file's budget, run by another
    return Results(
        rows,
        merged,
        [entry for entry in skipped if entry.get("case") not in measured],
        [entry for entry in errors if entry.get("case") not in measured],
        list(dict.fromkeys(case for case in not_run if case not in measured)),
        documents,
    )


def _case_key(row: dict) -> tuple:
    op_rank = OP_ORDER.index(row["op"]) if row["op"] in OP_ORDER else len(OP_ORDER)
    return (row["dtype"], row["M"], row["C"], op_rank, row["op"], row["N"])


def _impl_rank(impl: str) -> int:
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        magnitude = math.floor(math.log10(abs(value)))
        decimals = max(0, digits - 1 - magnitude)
        return f"{value:.{decimals}f}"
    return str(value)


def _ratio(value, base) -> str:
    """``value / base`` to two decimals, and below 0.1 to two significant digits: the fused
    backends' memory is a few millionths of the reference's, which two decimals show as 0.00x."""
    if value is None or base is None or base == 0:
        return "-"
    ratio = float(f"{value / base:.2g}")  # rounded first: 0.00996 reads 0.010x, not 0.0100x
    if ratio == 0 or abs(ratio) >= 0.1:
        return f"{value / base:.2f}x"
    return f"{ratio:.{1 - math.floor(math.log10(abs(ratio)))}f}x"


def by_case(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        cases[_case_key(row)][row["impl"]] = row
    return dict(sorted(cases.items()))


def markdown(results: Results) -> str:
    rows, machine = results.rows, results.machine
    lines = ["# cossim_fast benchmark", ""]
    if machine:
        gpu = machine.get("gpu") or "none"
        lines.append(
            f"Machine: CPU {machine.get('cpu')} ({machine.get('cpu_count')} cores, {machine.get('torch_threads')} torch "
            f"thread(s)), GPU {gpu}; torch {machine.get('torch')}, triton {machine.get('triton')}, CUDA {machine.get('cuda')}, "
            f"Python {machine.get('python')}; compiled extension: {machine.get('extension')}."
        )
        if machine.get("date"):
            lines.append(f"Date: {machine['date']}.")
        lines.append("")
    timings = {row.get("timing", "eager") for row in rows}
    lines += [
        " ".join(TIMING_NOTES[timing] for timing in sorted(timings) if timing in TIMING_NOTES),
        "",
        (
            "Times in ms (median, p20-p80 over the rounds); peak = memory beyond the inputs during one call "
            "(GPU: max_memory_allocated; CPU: peak RSS of a fresh process); TFLOP/s = 2*N_valid*M*C (the useful "
            "work of one forward: each row against its own class's bucket) over the median, for fwd_bwd "
            "too (so the figure is the step's throughput, not the hardware's rate; the reference executes "
            "K times that work). Ratios: this implementation over `reference` and over `per_class`."
        ),
        "",
        "| op | N | M | C | dtype | impl | median ms | p20-p80 ms | TFLOP/s | peak MiB | time / ref | mem / ref | time / per_class | mem / per_class |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for impls in by_case(rows).values():
        reference, per_class = impls.get("reference"), impls.get("per_class")
        for impl in sorted(impls, key=_impl_rank):
            row = impls[impl]
            spread = "-" if row["p20_ms"] is None else f"{_fmt(row['p20_ms'])}-{_fmt(row['p80_ms'])}"
            lines.append(
                f"| {row['op']} | {row['N']} | {row['M']} | {row['C']} | {row['dtype']} | {impl} | {_fmt(row['median_ms'])} | "
                f"{spread} | {_fmt(row['tflops'])} | {_fmt(row['peak_mib'])} | "
                f"{_ratio(row['median_ms'], reference and reference['median_ms'])} | "
                f"{_ratio(row['peak_mib'], reference and reference['peak_mib'])} | "
                f"{_ratio(row['median_ms'], per_class and per_class['median_ms'])} | "
                f"{_ratio(row['peak_mib'], per_class and per_class['peak_mib'])} |"
            )
    if results.skipped:
        lines += ["", f"Skipped ({len(results.skipped)}):", ""]
        reasons = defaultdict(list)
        for entry in results.skipped:
            reasons[entry.get("reason", "?")].append(entry.get("case", "?"))
        for reason, cases in reasons.items():
            lines.append(f"- {reason}: {len(cases)} case(s), e.g. `{cases[0]}`")
    if results.errors:
        lines += ["", f"Failed ({len(results.errors)}):", ""]
        for entry in results.errors:
            first = (entry.get("error") or "error").splitlines()[0][:300]
            lines.append(f"- `{entry.get('case', '?')}`: {first}")
    if results.not_run:
        lines += ["", f"Not run ({len(results.not_run)}: the run's time budget was spent before them):", ""]
        lines += [f"- `{case}`" for case in results.not_run]
    return "\n".join(lines) + "\n"


def compact(rows: list[dict], ops: tuple[str, ...] | None = None) -> str:
    """One line per case: ``impl time ms / peak MiB`` for every implementation."""
    cases = by_case(rows)
    impls = sorted({row["impl"] for row in rows}, key=_impl_rank)
    header = f"{'op':<12} {'N':>7} {'M':>5} {'C':>5} {'dtype':<5} " + " ".join(f"{impl:>20}" for impl in impls)
    out = [header, "-" * len(header)]
    for by_impl in cases.values():
        first = next(iter(by_impl.values()))
        if ops and first["op"] not in ops:
            continue
        cells = []
        for impl in impls:
            row = by_impl.get(impl)
            cells.append(f"{'-':>20}" if row is None else f"{_fmt(row['median_ms']):>9}ms/{_fmt(row['peak_mib']):>6}MiB")
        out.append(f"{first['op']:<12} {first['N']:>7} {first['M']:>5} {first['C']:>5} {first['dtype']:<5} " + " ".join(cells))
    out.append("(each cell: median time / peak memory beyond the inputs)")
    return "\n".join(out)


def plots(rows: list[dict], out_dir: str) -> list[str]:
    """``time_<op>.png`` and ``memory_<op>.png``; [] (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    ops = sorted({row["op"] for row in rows}, key=lambda op: OP_ORDER.index(op) if op in OP_ORDER else 99)
    for op in ops:
        op_rows = [row for row in rows if row["op"] == op]
        panels = sorted({(row["M"], row["C"], row["dtype"]) for row in op_rows})
        for metric, label in (("median_ms", "time (ms)"), ("peak_mib", "peak memory beyond inputs (MiB)")):
            columns = min(3, len(panels))
            lines_of = math.ceil(len(panels) / columns)
            figure, axes = plt.subplots(lines_of, columns, figsize=(5 * columns, 3.8 * lines_of), squeeze=False)
            for axis, (slots, channels, dtype) in zip(axes.flat, panels):
                for impl in sorted({row["impl"] for row in op_rows}, key=_impl_rank):
                    points = sorted(
                        (row for row in op_rows if (row["M"], row["C"], row["dtype"], row["impl"]) == (slots, channels, dtype, impl)),
                        key=lambda row: row["N"],
                    )
                    points = [row for row in points if row[metric] is not None and row[metric] > 0]
                    if not points:
                        continue
                    x = [row["N"] for row in points]
                    y = [row[metric] for row in points]
                    if metric == "median_ms" and all(row["p20_ms"] is not None for row in points):
                        low = [row["median_ms"] - row["p20_ms"] for row in points]
                        high = [row["p80_ms"] - row["median_ms"] for row in points]
                        axis.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=impl)
                    else:
                        axis.plot(x, y, marker="o", label=impl)
                axis.set_xscale("log", base=2)
                axis.set_yscale("log")
                axis.set_title(f"{op}  M={slots} C={channels} {dtype}", fontsize=9)
                axis.set_xlabel("N (target rows)")
                axis.set_ylabel(label)
                axis.grid(True, which="both", alpha=0.3)
                if axis.get_legend_handles_labels()[0]:
                    axis.legend(fontsize=7)
            for axis in list(axes.flat)[len(panels) :]:
                axis.set_visible(False)
            figure.tight_layout()
            name = os.path.join(out_dir, f"{'time' if metric == 'median_ms' else 'memory'}_{op}.png")
            figure.savefig(name, dpi=110)
            plt.close(figure)
            written.append(name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark or bench.run JSON files")
    parser.add_argument("--out", required=True, help="output folder (report.md and PNGs)")
    parser.add_argument("--print", action="store_true", help="also print a compact table")
    parser.add_argument("--print-ops", default=None, help="ops in the printed table (comma-separated; default all)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    try:
        results = load(args.json)
    except ValueError as error:
        parser.error(str(error))
    rows = results.rows
    os.makedirs(args.out, exist_ok=True)
    report = os.path.join(args.out, "report.md")
    with open(report, "w") as handle:
        handle.write(markdown(results))
    written = [] if args.no_plots else plots(rows, args.out)
    print(f"{len(rows)} results -> {report}" + (f" and {len(written)} plots" if written else ""))
    if args.print:
        ops = tuple(op for op in args.print_ops.split(",") if op) if args.print_ops else None
        print(compact(rows, ops))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
