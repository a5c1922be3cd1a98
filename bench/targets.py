"""The fused backends' targets, read from benchmark JSON, and which of them "auto" should prefer.

Targets of the Triton and CUDA issues, at each (C, dtype) of the results (meant for N = 131072,
K = 19, M = 4096, C in {256, 2048}, bf16 and fp32, as ``bench/gpu_check.sh`` runs them):

- forward + backward at least 3x faster than the per-class materializing baseline at C = 256
  and 1.5x at C = 2048 (``max-fwd_bwd`` and ``all-fwd_bwd``);
- forward at least 60% of the throughput of the per-class GEMMs alone (``class_gemm``, cuBLAS);
- extra memory beyond inputs and outputs under 64 bytes per target row: the loss forward's peak
  (``max-fwd``) minus its outputs, which are the per-row value (fp32) and slot (int64) that the
  loss keeps for its backward, 12 bytes per row.

Then, per (operation, dtype, C), the faster of "triton" and "cuda": the measured rule for "auto".

    python -m bench.targets RESULTS.json [...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from bench import report

FUSED = ("triton", "cuda")
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


def evaluate(rows: list[dict]) -> list[dict]:
    """One record per (fused backend, target, shape) that the results allow to check."""
    table = _index(rows)
    checks = []
    for (op, rows_n, slots, dim, dtype), impls in sorted(table.items()):
        for backend in FUSED:
            mine = impls.get(backend)
            if mine is None:
                continue
            shape = {"backend": backend, "op": op, "N": rows_n, "M": slots, "C": dim, "dtype": dtype}
            baseline = impls.get("per_class")
            if op.endswith("fwd_bwd") and baseline and dim in SPEEDUP_TARGET:
                value = baseline["median_ms"] / mine["median_ms"]
                checks.append(shape | {"target": "fwd+bwd vs per-class", "value": value,
                                       "goal": SPEEDUP_TARGET[dim], "unit": "x", "met": value >= SPEEDUP_TARGET[dim]})
            gemm = impls.get("class_gemm")
            if op.endswith("-fwd") and gemm:
                value = gemm["median_ms"] / mine["median_ms"]
                checks.append(shape | {"target": "forward vs cuBLAS class GEMMs", "value": value,
                                       "goal": GEMM_SHARE_TARGET, "unit": "of throughput", "met": value >= GEMM_SHARE_TARGET})
            if op == "max-fwd" and mine.get("peak_mib") is not None:
                value = mine["peak_mib"] * 2**20 / rows_n - MAX_OUTPUT_BYTES_PER_ROW
                checks.append(shape | {"target": "extra memory per row", "value": value,
                                       "goal": EXTRA_BYTES_PER_ROW_TARGET, "unit": "B", "met": value < EXTRA_BYTES_PER_ROW_TARGET})
    return checks


def auto_rule(rows: list[dict]) -> list[dict]:
    """Per (op, dtype, C, N, M) where both ran: the faster fused backend and by how much."""
    rule = []
    for (op, rows_n, slots, dim, dtype), impls in sorted(_index(rows).items()):
        if all(name in impls for name in FUSED):
            triton_ms, cuda_ms = impls["triton"]["median_ms"], impls["cuda"]["median_ms"]
            faster = "cuda" if cuda_ms < triton_ms else "triton"
            rule.append({"op": op, "dtype": dtype, "C": dim, "N": rows_n, "M": slots, "faster": faster,
                         "triton_ms": triton_ms, "cuda_ms": cuda_ms})
    return rule


def markdown(checks: list[dict], rule: list[dict]) -> str:
    lines = ["| backend | target | op | N | M | C | dtype | measured | goal | met |", "|---|---|---|---|---|---|---|---|---|---|"]
    for check in checks:
        lines.append(
            f"| {check['backend']} | {check['target']} | {check['op']} | {check['N']} | {check['M']} | {check['C']} | "
            f"{check['dtype']} | {check['value']:.2f} {check['unit']} | {check['goal']} | {'yes' if check['met'] else 'NO'} |"
        )
    if rule:
        lines += ["", "| op | dtype | C | N | M | triton ms | cuda ms | faster |", "|---|---|---|---|---|---|---|---|"]
        for item in rule:
            lines.append(
                f"| {item['op']} | {item['dtype']} | {item['C']} | {item['N']} | {item['M']} | "
                f"{item['triton_ms']:.3f} | {item['cuda_ms']:.3f} | {item['faster']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="benchmark JSON (bench.run or pytest-benchmark)")
    parser.add_argument("--json", help="also write the checks and the rule here")
    args = parser.parse_args(argv)
    rows, _, _ = report.load(args.results)
    checks, rule = evaluate(rows), auto_rule(rows)
    if not checks and not rule:
        print("no fused-backend results with a baseline to compare in these files")
        return 1
    print(markdown(checks, rule))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"checks": checks, "auto_rule": rule}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
