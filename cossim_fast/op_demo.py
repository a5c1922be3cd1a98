"""Operator demo: the cosine-similarity loss and its backward on every available backend.

Builds random target features and a dictionary filled from random source features, then runs
loss + backward per backend in a fresh subprocess (so each peak-memory reading is its own),
with the same number of CPU threads for each (so their times compare), and prints values, the
median time of ``--repeats`` runs and the peak memory beyond the inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch

import cossim_fast


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def map_side(rows: int, batch: int) -> int:
    """H = W of the B x C x H x W map closest to ``rows`` rows (so B * H * W may differ from it)."""
    return int(round((rows / batch) ** 0.5))


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad options before any work, as argparse does (not as tracebacks of every child)."""
    for option in ("batch", "classes", "slots", "dim", "repeats"):
        if getattr(args, option) < 1:
            parser.error(f"argument --{option}: expected a positive integer, got {getattr(args, option)}")
    if args.threads < 0:
        parser.error(f"argument --threads: expected 0 (torch's default) or more, got {args.threads}")
    if args.rows < args.batch:  # fewer could round to an empty map
        parser.error(f"argument --rows: expected at least one row per image (--batch {args.batch}), got {args.rows}")
    if math.isnan(args.threshold):
        parser.error("argument --threshold: expected a cosine similarity, e.g. 0.1, got nan")
    if not 0 <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        parser.error(f"argument --seed: expected an integer in [0, 2**64), got {args.seed}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"argument --device: expected cpu, cuda or cuda:INDEX, got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"argument --device: expected cpu, cuda or cuda:INDEX, got {args.device!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            parser.error(f"argument --device: {args.device} is not available (torch sees no CUDA GPU); use --device cpu")
        if device.index is not None and device.index >= count:
            parser.error(f"argument --device: {args.device} is not available (torch sees {count} CUDA GPU(s))")


def run_backend(backend: str, args: argparse.Namespace) -> dict:
    """One backend, in this process: loss + backward on the demo problem, timed and measured."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    dictionary = cossim_fast.FeatureDictionary(args.classes, args.slots, args.dim, device=device)
    source = torch.randn(args.classes * args.slots, args.dim, generator=generator).to(device)
    source_labels = torch.arange(args.classes).repeat_interleave(args.slots).to(device)
    dictionary.update(source, source_labels)
    height = width = map_side(args.rows, args.batch)
    features = torch.randn(args.batch, args.dim, height, width, generator=generator).to(device).requires_grad_(True)
    labels = torch.randint(0, args.classes, (args.batch, height, width), generator=generator).to(device)
    loss_fn = cossim_fast.CosineSimilarityLoss(args.threshold, mode=args.mode, backend=backend, dictionary=dictionary)
    loss_fn(features[:1, :, :2, :2], labels[:1, :2, :2]).backward()  # warm-up, not measured
    features.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = _peak_mib(device)
    times = []
    for _ in range(args.repeats):
        features.grad = None
        start = time.perf_counter()
        loss = loss_fn(features, labels)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    return {
        "backend": backend,
        "loss": loss.item(),
        "selected": loss_fn.last_selected_fraction.item(),
        "grad_norm": features.grad.norm().item(),
        "ms": seconds * 1e3,
        "extra_mib": _peak_mib(device) - before,
        "rows": args.batch * height * width,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cossim-fast op-demo", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192, help="target rows N (B maps of C x H x W, H = W: rounded to the nearest such N)")
    parser.add_argument("--batch", type=int, default=2, help="images B of the map")
    parser.add_argument("--classes", type=int, default=19, help="classes K")
    parser.add_argument("--slots", type=int, default=1024, help="dictionary slots per class M")
    parser.add_argument("--dim", type=int, default=256, help="feature channels C")
    parser.add_argument("--threshold", type=float, default=0.1, help="cosine threshold of the loss")
    parser.add_argument("--mode", choices=("max", "all"), default="max", help="loss mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the tensors live")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for each backend (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per backend (the median is shown)")
    parser.add_argument("--backend", help=argparse.SUPPRESS)  # internal: run one backend, print JSON
    args = parser.parse_args(argv)
    _check_options(parser, args)
    if args.backend:
        print(json.dumps(run_backend(args.backend, args)))
        return 0

    print(f"cossim_fast {cossim_fast.__version__}, torch {torch.__version__}, device {args.device}")
    print(f"compiled extension: {cossim_fast.extension_status()}")
    side = map_side(args.rows, args.batch)
    rows = args.batch * side * side  # the rows used: the square maps round --rows
    rounded = "" if rows == args.rows else f" (--rows {args.rows} rounded to {args.batch} maps of {side} x {side})"
    print(f"problem: N={rows} rows{rounded}, K={args.classes}, M={args.slots}, C={args.dim}, mode={args.mode}, tau={args.threshold}")
    results = []
    for backend in cossim_fast.available_backends(args.device):
        child = [sys.executable, "-m", "cossim_fast.op_demo", *(argv if argv is not None else sys.argv[1:]), "--backend", backend]
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  {backend}: failed\n{done.stderr.strip()}")
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if not results:
        print("cossim-fast op-demo: error: every backend failed (their errors are above)", file=sys.stderr)
        return 1
    reference = next((r for r in results if r["backend"] == "reference"), results[0])
    against = f"memory vs {reference['backend']}"  # reference, unless it failed
    print(f"\n{'backend':<10} {'loss':>10} {'selected':>9} {'time ms':>10} {'extra MiB':>10} {against:>20}")
    for r in results:
        ratio = r["extra_mib"] / reference["extra_mib"] if reference["extra_mib"] > 0 else float("nan")
        print(f"{r['backend']:<10} {r['loss']:>10.6f} {r['selected']:>9.3f} {r['ms']:>10.1f} {r['extra_mib']:>10.1f} {ratio:>19.1%}")
    worst = max(abs(r["loss"] - reference["loss"]) for r in results)
    print(f"\nlargest loss difference from {reference['backend']}: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
