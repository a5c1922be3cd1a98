"""The fused backends' targets, read from benchmark JSON, and which of them "auto" should prefer.

Targets of the Triton and CUDA issues, at each (C, dtype) of the results (meant for N = 131072,
K = 19, M = 4096, C in {256, 2048}, bf16 and fp32, as ``bench/gpu_check.sh`` runs them):

- forward + backward at least 3x faster than the per-class materializing baseline at C = 256
  and 1.5x at C = 2048 (``max-fwd_bwd`` and ``all-fwd_bwd``);
- forward at least 60% of the throughput of the per-class GEMMs alone (``class_gemm``, cuBLAS);
- extra memory beyond inputs and outputs under 64 bytes per target row: the loss forward's peak
  (``max-fwd``) minus its outputs, which are the per-row value (fp32) and slot (int64) that the
  loss keeps for its backward, 12 bytes per row.

Then, per (operation, dtype, C) where both fused backends ran, the fastest of "triton", "cuda"
and (where it ran too) "torch", whose cuBLAS GEMMs beat both at some fp32 shapes: the measured
rule for "auto".

    python -m bench.targets RESULTS.json [...] [--json out.json] [--write-rule PATH]

Where several files hold the same case the last one's row counts (e.g. Triton's fp32 at another
precision, ``COSSIM_FAST_TRITON_FP32_PRECISION``); each target row names the fp32 precision of
its backend's row. The files must come from one machine, device and timing mode, as
``bench.report`` requires (check eager and graph timings apart). A fused backend with no result
and no recorded reason in the files is not part of the run and has no rows. ``--dtypes`` keeps
only those dtypes.

``--write-rule PATH`` adds that rule for the results' GPU architecture (one per call) to a rule
file, the package's being ``cossim_fast/backends/auto_rule.json``, replacing its earlier
measurements of the same architecture, operation and dtype: "auto" then puts the fastest
backend first on that GPU (and uses the CUDA forward kernels there at all).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from bench import report
from cossim_fast.backends import auto_rule as rule_file

FUSED, CONTENDERS = rule_file.FUSED, rule_file.CONTENDERS  # the fused backends; what the rule chooses among
SPEEDUP_TARGET = {256: 3.0, 2048: 1.5}  # forward+backward vs the per-class baseline
GEMM_SHARE_TARGET = 0.6
EXTRA_BYTES_PER_ROW_TARGET = 64
MAX_OUTPUT_BYTES_PER_ROW = 4 + 8  # the max-mode forward keeps an fp32 value and an int64 slot per row


def _index(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(op, N, M, C, dtype) -> impl -> row."""
    table: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        table[(row["op"], row["N"], row["M"], row["C"], row["dtype"])][row["impl"]] = row
    return table


#: The targets: (name, op, baseline impl or None, goal per C or a constant, unit).
TARGETS = (
    ("fwd+bwd vs per-class", "max-fwd_bwd", "per_class", SPEEDUP_TARGET, "x"),
    ("fwd+bwd vs per-class", "all-fwd_bwd", "per_class", SPEEDUP_TARGET, "x"),
    # One GEMM per class against the class GEMMs alone; the "all" forward does two, so only "max".
    ("forward vs cuBLAS class GEMMs", "max-fwd", "class_gemm", GEMM_SHARE_TARGET, "of throughput"),
    ("extra memory per row", "max-fwd", None, EXTRA_BYTES_PER_ROW_TARGET, "B"),
)


def _value(target: str, mine: dict, baseline: dict | None, rows_n: int) -> float | None:
    if target == "extra memory per row":
        return None if mine.get("peak_mib") is None else mine["peak_mib"] * 2**20 / rows_n - MAX_OUTPUT_BYTES_PER_ROW
    return baseline["median_ms"] / mine["median_ms"]


def evaluate(rows: list[dict], missing: dict[str, str] | None = None) -> list[dict]:
    """One record per (fused backend, target, shape) of the run: measured against its goal, or
    ``met = None`` with the reason it could not be checked (a case skipped, failed, not run)."""
    table, missing = _index(rows), missing or {}
    cases = [fields for fields in map(_case_fields, missing) if fields]
    shapes = sorted({key[1:] for key in table} | {fields[2:] for fields in cases})
    ops = {key[0] for key in table} | {fields[0] for fields in cases}
    # A target whose baseline the run never tried, or the memory target of a run that measured
    # no memory (bench.run --timing graph, say), is not part of this run: left out, not "missing".
    impls_in_run = {impl for impls in table.values() for impl in impls} | {fields[1] for fields in cases}
    measured_memory = any(row.get("peak_mib") is not None for row in rows)
    backends = [backend for backend in FUSED if backend in impls_in_run]
    checks = []
    for rows_n, slots, dim, dtype in shapes:
        for target, op, baseline_impl, goal, unit in TARGETS:
            goal = goal.get(dim) if isinstance(goal, dict) else goal
            if op not in ops or goal is None or (baseline_impl and baseline_impl not in impls_in_run):
                continue
            if target == "extra memory per row" and not measured_memory:
                continue
            impls = table.get((op, rows_n, slots, dim, dtype), {})
            for backend in backends:
                # Which fp32 dots made the row (files measured at several precisions are combined).
                precision = impls.get(backend, {}).get("fp32_precision")
                shape = {"backend": backend, "op": op, "N": rows_n, "M": slots, "C": dim, "dtype": dtype,
                         "target": target, "goal": goal, "unit": unit, "fp32_precision": precision}
                needed = [backend] + ([baseline_impl] if baseline_impl else [])
                absent = [impl for impl in needed if impl not in impls]
                value = None if absent else _value(target, impls[backend], impls.get(baseline_impl), rows_n)
                if value is None:
                    reasons = [f"{impl}: {missing.get(_case_id(op, impl, rows_n, slots, dim, dtype), 'no result')}"
                               for impl in absent] or [f"{backend}: no peak memory recorded"]
                    checks.append(shape | {"value": None, "met": None, "why": "; ".join(reasons)})
                    continue
                met = value < goal if target == "extra memory per row" else value >= goal
                checks.append(shape | {"value": value, "met": met})
    return checks


def _case_id(op: str, impl: str, rows_n: int, slots: int, dim: int, dtype: str) -> str:
    return f"{op}-{impl}-N{rows_n}-M{slots}-C{dim}-{dtype}"  # as harness.Case.id


def _case_fields(case_id: str) -> tuple | None:
    """(op, impl, N, M, C, dtype) of a ``harness.Case.id`` (read from the end: ops hold dashes)."""
    try:
        *op, impl, rows_n, slots, dim, dtype = case_id.split("-")
        return "-".join(op), impl, int(rows_n[1:]), int(slots[1:]), int(dim[1:]), dtype
    except ValueError:
        return None


def missing_cases(documents: list[dict]) -> dict[str, str]:
    """Case id -> why it has no result (skipped, failed, not run in the time budget)."""
    why: dict[str, str] = {}
    for document in documents:
        for entry in document.get("skipped", []):
            why[entry["case"]] = f"skipped ({entry['reason']})"
        for entry in document.get("errors", []):
            why[entry["case"]] = f"failed ({entry['error'].splitlines()[0][:200] if entry['error'] else 'error'})"
        for case in document.get("not_run", []):
            why[case] = "not run (time budget spent)"
    return why


def auto_rule(rows: list[dict]) -> list[dict]:
    """Per (op, dtype, C, N, M) where both fused backends ran: the fastest contender, and the
    time of each (``torch_ms`` is None where the torch backend was not measured)."""
    rule = []
    for (op, rows_n, slots, dim, dtype), impls in sorted(_index(rows).items()):
        if all(name in impls for name in FUSED):
            times = {name: impls[name]["median_ms"] for name in CONTENDERS if name in impls}
            faster = min(times, key=times.get)
            rule.append({"op": op, "dtype": dtype, "C": dim, "N": rows_n, "M": slots, "faster": faster,
                         **{f"{name}_ms": times.get(name) for name in CONTENDERS}})
    return rule


def markdown(checks: list[dict], rule: list[dict]) -> str:
    lines = ["| backend | target | op | N | M | C | dtype | measured | goal | met |", "|---|---|---|---|---|---|---|---|---|---|"]
    for check in checks:
        if check["met"] is None:
            measured, met = "-", f"not measured: {check['why']}"
        else:
            measured, met = f"{check['value']:.2f} {check['unit']}", "yes" if check["met"] else "NO"
        backend = check["backend"] + (f" ({check['fp32_precision']})" if check.get("fp32_precision") else "")
        lines.append(
            f"| {backend} | {check['target']} | {check['op']} | {check['N']} | {check['M']} | {check['C']} | "
            f"{check['dtype']} | {measured} | {check['goal']} | {met} |"
        )
    if rule:
        lines += ["", "| op | dtype | C | N | M | triton ms | cuda ms | torch ms | fastest |", "|---|---|---|---|---|---|---|---|---|"]
        for item in rule:
            torch_ms = "-" if item.get("torch_ms") is None else f"{item['torch_ms']:.3f}"
            lines.append(
                f"| {item['op']} | {item['dtype']} | {item['C']} | {item['N']} | {item['M']} | "
                f"{item['triton_ms']:.3f} | {item['cuda_ms']:.3f} | {torch_ms} | {item['faster']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="benchmark JSON (bench.run or pytest-benchmark)")
    parser.add_argument("--json", help="also write the checks and the rule here")
    parser.add_argument(
        "--write-rule", metavar="PATH",
        help=f"add the measured rule for the results' GPU architecture to this rule file (the package's: {rule_file.RULE_FILE})",
    )
    parser.add_argument("--dtypes", help="only these dtypes, comma-separated (e.g. fp32)")
    args = parser.parse_args(argv)
    try:
        loaded = report.load(args.results)
    except ValueError as error:  # unreadable, or from different machines or timing modes
        parser.error(str(error))
    rows, machine, documents = loaded.rows, loaded.machine, loaded.documents
    missing = missing_cases(documents)
    if args.dtypes:
        wanted = set(args.dtypes.split(","))
        rows = [row for row in rows if row["dtype"] in wanted]
        missing = {case: why for case, why in missing.items() if (_case_fields(case) or ("",) * 6)[5] in wanted}
    checks, rule = evaluate(rows, missing), auto_rule(rows)
    if not checks and not rule:
        print("no results of the targets' operations in these files")
        return 1
    print(markdown(checks, rule))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"checks": checks, "auto_rule": rule}, handle, indent=1)
    if args.write_rule:
        path = Path(args.write_rule)
        if any(path.resolve() == Path(results).resolve() for results in args.results):
            parser.error(f"--write-rule {path}: that is one of the results files")
        archs = {report.machine_of(document).get("gpu_capability") for document in documents}
        if len(archs) != 1 or None in archs:
            parser.error(f"--write-rule: the results must come from one GPU architecture (gpu_capability: {sorted(map(str, archs))})")
        arch = archs.pop()
        entries = rule_file.entries_from_targets(rule, arch, machine.get("gpu", "?"), " ".join(args.results))
        if not entries:  # e.g. the cuda backend could not run: nothing to prefer, not a failed check
            print(f"--write-rule: no operation was measured for both triton and cuda; {path} not written")
            return 0
        try:
            rule_file.write(entries, path)
        except ValueError as error:
            parser.error(f"--write-rule: {error}")
        print(f"wrote {len(entries)} measurements for sm {arch} ({machine.get('gpu')}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
