"""The Triton forward's default tiles against the autotuned ones, at the targets' shapes (GPU only).

For each shape: the median time of the forward with the default candidate of its tile space,
then with autotuning on (the first call tunes; timed after it), the candidate chosen and the
speed-up. Then every candidate on its own, timed as the default is (10 runs, not the
autotuner's 3), so that one run shows the whole space. A default that loses clearly to another
candidate is the next default to change.

    python -m bench.autotune_check [--N 131072,16384] [--M 4096] [--C 256,2048] [--dtype bf16] [--json out.json]

At training sizes (N of about 16k rows) the slot-split candidates of the "max" mode are the ones
to watch: they exist for grids too small to fill the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

from bench import harness


def median_ms(fn, repeats: int = 10) -> float:
    from cossim_fast.backends.triton.tiles import cuda_event_time

    return cuda_event_time(fn, repeats) * 1e3


@contextlib.contextmanager
def forced(config):
    """Every Triton forward launches ``config`` (as bench.resources does)."""
    from cossim_fast.backends.triton import backend

    original = backend.forward_config
    backend.forward_config = lambda *args: config
    try:
        yield
    finally:
        backend.forward_config = original


def check(rows: int, slots: int, dim: int, dtype: str, mode: str) -> dict:
    from cossim_fast.backends.triton import backend, tiles

    problem = harness.make_problem(rows, slots, dim, dtype, "cuda")
    features, labels = problem.features.detach().unsqueeze(0), problem.labels
    triton = backend.TritonBackend()
    if mode == "max":
        def forward():
            triton.max_forward(features, labels, problem.bank, problem.counts, -1)
    else:
        def forward():
            triton.all_forward(features, labels, problem.bank, problem.counts, harness.THRESHOLD, -1)
    precision = backend.dot_precision(features.dtype, problem.bank.dtype)
    candidates = tiles.space(mode, dim, sixteen_bit=precision is None)
    tiles.set_autotune(False)
    default_ms = median_ms(forward)
    tiles.set_autotune(True)
    tiles.clear_autotune_choices()
    try:
        tuned_ms = median_ms(forward)
        (chosen,) = tiles.autotune_choices().values()
    finally:
        tiles.set_autotune(False)
    each_ms = {}
    for config in candidates:
        try:
            with forced(config):
                each_ms[str(config)] = median_ms(forward)
        except tiles.UNFIT as error:  # more shared memory than this GPU has, say
            each_ms[str(config)] = f"unfit: {type(error).__name__}"
    return {
        "mode": mode, "N": rows, "M": slots, "C": dim, "dtype": dtype, "candidates": len(candidates),
        "default": str(candidates[0]), "chosen": str(chosen), "default_ms": default_ms, "tuned_ms": tuned_ms,
        "speedup": default_ms / tuned_ms, "candidate_ms": each_ms,
    }


def fastest(result: dict) -> str:
    """The candidate with the lowest time of its own, and its speed-up over the default's."""
    timed = {name: ms for name, ms in result["candidate_ms"].items() if isinstance(ms, float)}
    name = min(timed, key=timed.get)
    return f"{name} ({result['default_ms'] / timed[name]:.2f}x)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.autotune_check", description=__doc__.splitlines()[0])
    parser.add_argument("--N", default="131072,16384", help="target rows, comma-separated (the targets' N first)")
    parser.add_argument("--M", type=int, default=4096)
    parser.add_argument("--C", default="256,2048")
    parser.add_argument("--dtype", default="bf16", choices=tuple(harness.DTYPES))
    parser.add_argument("--modes", default="max,all")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (autotuning times candidates with CUDA events)")
    harness.configure_for_benchmarks(False)
    results = []
    print("| mode | N | C | dtype | default | default ms | chosen | tuned ms | speed-up | fastest alone |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    shapes = [(int(n), int(c)) for n in args.N.split(",") for c in args.C.split(",")]
    for rows, dim in shapes:
        for mode in args.modes.split(","):
            result = check(rows, args.M, dim, args.dtype, mode)
            results.append(result)
            print(f"| {mode} | {rows} | {dim} | {args.dtype} | {result['default']} | {result['default_ms']:.3f} | "
                  f"{result['chosen']} | {result['tuned_ms']:.3f} | {result['speedup']:.2f}x | {fastest(result)} |", flush=True)
            if args.json:
                with open(args.json, "w") as handle:
                    json.dump({"machine": harness.machine(), "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
