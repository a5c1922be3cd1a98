"""Which backend "auto" prefers on a CUDA GPU: the measured rule, written down.

``auto_rule.json`` (beside this module) holds measurements: for a GPU architecture (compute
capability), an operation, a dtype and a measured shape (C, N), which of "triton", "cuda" and
"torch" (cuBLAS GEMMs in chunks, faster than both fused backends at some fp32 shapes) was
fastest there, as ``python -m bench.targets RESULTS.json --write-rule PATH`` found it on that
GPU (each entry also names the GPU, the results it came from and each contender's time). A
call takes the measurement of its architecture, operation and dtype nearest its shape: C first,
then N, both on a log scale. Where nothing was measured "auto" keeps its default order (``dispatch``), in
which the CUDA forward kernels are not chosen until a measurement prefers them.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import torch

RULE_FILE = Path(__file__).with_name("auto_rule.json")
FUSED = ("triton", "cuda")
CONTENDERS = (*FUSED, "torch")

#: Benchmark operation (``bench.harness``) -> the dispatcher's operations its time stands for
#: (the "all" backward is elementwise and only timed together with its forward).
BENCH_OPS = {
    "max-fwd": ("max_forward",), "max-bwd": ("max_backward",),
    "all-fwd_bwd": ("all_forward", "all_backward"), "update": ("update",),
}


@cache
def measurements(path: Path = RULE_FILE) -> tuple[dict, ...]:
    """The measured entries (read once per process)."""
    if not path.is_file():
        return ()
    return tuple(json.loads(path.read_text()).get("measurements", []))


def capability(device: torch.device) -> str | None:
    """The GPU architecture of ``device`` ("9.0"), or None without a CUDA device."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def _matching(op: str, arch: str | None, dtype: torch.dtype, entries: tuple[dict, ...] | None = None) -> list[dict]:
    dtype_name = str(dtype).removeprefix("torch.")
    return [
        entry for entry in (measurements() if entries is None else entries)
        if entry["arch"] == arch and entry["op"] == op and entry["dtype"] == dtype_name
    ]


def preferred(
    op: str, arch: str | None, dtype: torch.dtype, dim: int | None, rows: int | None, entries: tuple[dict, ...] | None = None
) -> str | None:
    """The backend measured fastest for ``op`` on architecture ``arch`` ("9.0") at the
    nearest measured shape, or None where nothing was measured."""
    candidates = _matching(op, arch, dtype, entries)
    if not candidates:
        return None

    def distance(entry: dict) -> tuple[float, float]:
        def log_gap(measured: int, wanted: int | None) -> float:
            return 0.0 if wanted is None else abs(math.log2(measured) - math.log2(max(wanted, 1)))

        return log_gap(entry["C"], dim), log_gap(entry["N"], rows)

    return min(candidates, key=distance)["faster"]


def measured(op: str, arch: str | None, dtype: torch.dtype) -> bool:
    """Whether both fused backends were measured (so ran) for ``op`` and ``dtype`` on ``arch``."""
    return bool(_matching(op, arch, dtype))


def entries_from_targets(rule: list[dict], arch: str, gpu: str, source: str) -> list[dict]:
    """Rule entries from ``bench.targets.auto_rule`` records (bench operations mapped to the
    dispatcher's; fwd+bwd composites other than "all" stand for no single operation)."""
    dtype_names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    return [
        {"arch": arch, "gpu": gpu, "source": source, "op": op, "bench_op": item["op"],
         "dtype": dtype_names.get(item["dtype"], item["dtype"]), "C": item["C"], "N": item["N"],
         "faster": item["faster"], **{f"{name}_ms": item.get(f"{name}_ms") for name in CONTENDERS}}
        for item in rule
        for op in BENCH_OPS.get(item["op"], ())
    ]


def write(entries: list[dict], path: Path = RULE_FILE) -> None:
    """Add ``entries`` to ``path``, replacing its earlier measurements of the same architecture,
    operation and dtype (a run of fp32 cases keeps the bf16 ones)."""
    if path.is_file() and "measurements" not in json.loads(path.read_text()):
        raise ValueError(f"{path} is not a rule file (no 'measurements'): not overwritten")
    replaced = {(entry["arch"], entry["op"], entry["dtype"]) for entry in entries}
    kept = [entry for entry in measurements(path) if (entry["arch"], entry["op"], entry["dtype"]) not in replaced]
    measurements.cache_clear()
    document = {
        "about": "Measured fastest backend per GPU architecture, operation, dtype and shape; "
                 "written by python -m bench.targets --write-rule (see cossim_fast/backends/auto_rule.py).",
        "measurements": kept + entries,
    }
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(document, indent=1) + "\n")
    temporary.replace(path)
