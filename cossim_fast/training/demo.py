"""The demo and the seed study: train variants of the recipe on the synthetic benchmark.

``cossim-fast demo`` generates the synthetic data, trains source-only and with the cosine
loss on the same schedule (one process per run, as many at once as there are cores), scores
each on the target val split and on held-out source images, and prints one table. With
``--variants`` and ``--seeds`` it is the study behind the README's results table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: The variants compared; each is a list of config overrides on top of the shipped
#: "synthetic" config (whose cosine settings were chosen by the sweep in the README).
VARIANTS = {
    "source-only": ["cosine.enabled=false"],
    "cosine-max": ["cosine.mode=max"],
    "cosine-all": ["cosine.mode=all"],
    "minent": ["cosine.enabled=false", "entropy.weight=0.1"],
    "cosine+minent": ["cosine.mode=max", "entropy.weight=0.1"],
}
DEMO_VARIANTS = ["source-only", "cosine-max"]
#: Config keys the demo sets for each run itself, with the demo option that controls each:
#: a --set of one would be silently overridden.
DEMO_KEYS = {"seed": "--seeds", "output_dir": "--output", "train.threads": "--jobs (runs at once, one thread each)"}


def run_one(config_name: str, overrides: list[str], source_val: str) -> dict:
    """Train one run in this process; return its scores, peak memory and time."""
    import torch

    from cossim_fast import configs
    from cossim_fast.data import GTA5Dataset
    from cossim_fast.training import Trainer, evaluate, load_config

    started = time.perf_counter()
    trainer = Trainer(load_config(configs.resolve(config_name), overrides), resume=None, progress=False)
    result = trainer.train()
    protocol = trainer.config.data.protocols[0]
    source = GTA5Dataset(source_val, resize=tuple(trainer.config.data.source.size), resize_label=False)
    source_matrix = evaluate(trainer.model, source, trainer.device)
    peak = max(row.get("peak_mib", 0.0) for row in trainer.history)
    del torch
    return {
        "target_miou": 100 * result[f"mIoU{protocol}"],
        "source_miou": 100 * source_matrix.miou(protocol),
        "peak_mib": peak,
        "seconds": time.perf_counter() - started,
        "selected": next((row["selected"] for row in reversed(trainer.history) if "selected" in row), None),
    }


class DemoRunError(RuntimeError):
    """One of the demo's runs failed; its log says why."""


def _launch(job: dict, log_dir: Path) -> dict:
    command = [sys.executable, "-m", "cossim_fast.training.demo", "--child", json.dumps(job)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = log_dir / f"{job['variant']}_seed{job['seed']}.log"
    with open(log, "w") as stream:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stream, text=True, env=env)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
        raise DemoRunError(f"run {job['variant']} seed {job['seed']} failed ({tail[0] if tail else 'no output'}); see {log}")
    return {**job, **json.loads(done.stdout.strip().splitlines()[-1])}


def _table(results: list[dict], variants: list[str]) -> str:
    """Mean (± sample deviation over seeds) per variant; with several seeds, each seed's too."""
    per_seed = len({r["seed"] for r in results}) > 1
    seeds_column = " target mIoU per seed |" if per_seed else ""
    lines = [
        f"| variant | target val mIoU | source val mIoU |{seeds_column} peak MiB | time per run (s) |",
        "|---|---|---|---|---|" + ("---|" if per_seed else ""),
    ]
    for variant in variants:
        rows = [r for r in results if r["variant"] == variant]
        target = [r["target_miou"] for r in rows]
        source = [r["source_miou"] for r in rows]
        spread = f" ± {statistics.stdev(target):.1f}" if len(target) > 1 else ""
        seeds = f" {', '.join(f'{t:.1f}' for t in target)} |" if per_seed else ""
        lines.append(
            f"| {variant} | {statistics.mean(target):.1f}{spread} | {statistics.mean(source):.1f} |{seeds} "
            f"{max(r['peak_mib'] for r in rows):.0f} | {statistics.mean(r['seconds'] for r in rows):.0f} |"
        )
    return "\n".join(lines)


def _override_keys(override: str) -> list[str]:
    """The dotted config keys a ``--set`` value writes, enclosing ones too (``train={threads: 1}``
    writes ``train`` and ``train.threads``)."""
    from cossim_fast.training.config import parse_override

    def walk(values: dict, prefix: str) -> list[str]:
        keys = []
        for key, value in values.items():
            keys.append(f"{prefix}{key}")
            if isinstance(value, dict):
                keys += walk(value, f"{prefix}{key}.")
        return keys

    return walk(parse_override(override), "")


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad options up front: before the data is generated and the runs start."""
    from cossim_fast.training import ConfigError, load_config

    if args.iterations is not None and args.iterations < 1:
        parser.error(f"argument --iterations: expected a positive number of iterations, got {args.iterations}")
    if args.jobs < 1:
        parser.error(f"argument --jobs: expected at least 1 run at once, got {args.jobs}")
    for seed in args.seeds:
        try:  # the config's own range check
            load_config(None, [f"seed={seed}"])
        except ConfigError as error:
            parser.error(f"argument --seeds: {error}")
    # Repeats would train into the same run folder and log, and count twice in the means.
    for option, values in (("--seeds", args.seeds), ("--variants", args.variants)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            parser.error(f"argument {option}: expected distinct values, got {', '.join(repeated)} more than once")
    for override in args.set:
        for key in _override_keys(override):
            if key in DEMO_KEYS:
                parser.error(f"argument --set {override}: the demo sets {key} for each run; use {DEMO_KEYS[key]}")
    output = Path(args.output)
    if any(folder.exists() and not folder.is_dir() for folder in (output, *output.parents)):
        parser.error(f"argument --output: expected a folder, but {args.output} is (or is inside) a file")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cossim-fast demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="synthetic", help="base config, a shipped name or a YAML file (default: synthetic)")
    parser.add_argument("--variants", nargs="+", default=DEMO_VARIANTS, choices=list(VARIANTS), help="the runs to compare (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per variant and seed (default: %(default)s)")
    parser.add_argument("--iterations", type=int, help="override train.iterations (default: the config's)")
    parser.add_argument("--output", default="runs/demo", help="folder of the runs, the results table and plots (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at once, one thread each (default: %(default)s, the CPU count)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run, e.g. cosine.weight=0.05 (not seed, output_dir, train.threads: see --seeds, --output, --jobs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(run_one(job["config"], job["overrides"], job["source_val"])))
        return 0

    from cossim_fast import configs
    from cossim_fast.training import load_config

    _check_options(parser, args)
    iterations = [] if args.iterations is None else [f"train.iterations={args.iterations}"]
    common = [*args.set, *iterations]
    base = load_config(configs.resolve(args.config), common)  # a ConfigError now, not in every run
    synthetic = base.data.synthetic
    print(f"generating the synthetic data under {synthetic.root} (skipped if present) ...", flush=True)
    paths = synthetic.generate()
    output = Path(args.output)
    (output / "logs").mkdir(parents=True, exist_ok=True)
    jobs = [
        {"variant": variant, "seed": seed, "config": args.config, "source_val": str(paths["source_val"]),
         "overrides": [*common, *VARIANTS[variant], f"seed={seed}", "train.threads=1", f"output_dir={output / f'{variant}_seed{seed}'}"]}
        for seed in args.seeds for variant in args.variants
    ]
    print(f"training {len(jobs)} runs, {args.jobs} at a time; logs in {output / 'logs'}", flush=True)
    started = time.perf_counter()
    results = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for result in pool.map(lambda job: _launch(job, output / "logs"), jobs):
            results.append(result)
            print(f"  {result['variant']:<14} seed {result['seed']}: target val mIoU {result['target_miou']:.1f}, "
                  f"source val mIoU {result['source_miou']:.1f} ({result['seconds']:.0f} s)", flush=True)
    table = _table(results, args.variants)
    (output / "results.json").write_text(json.dumps(results, indent=1))
    (output / "results.md").write_text(table + "\n")
    print(f"\n{table}\n\nwall time {time.perf_counter() - started:.0f} s; per-run curves, overlays and checkpoints under {output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
