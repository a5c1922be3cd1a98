"""The memory frontier: the largest N whose step fits a memory budget, per implementation and M.

    python -m bench.frontier [--device cpu|cuda] [--budget-mib B] [--M 1024,4096,16384] [--C 256]
                             [--impls reference,per_class,torch,triton,cuda] [--step loss] [--json out.json]

The step (``--step``) is what must fit, inputs included. ``loss``: target features ``N x C``
(requiring grad) and labels, a full ``K x M x C`` dictionary, the cosine-similarity loss and its
backward (the features' gradient included). Steps are entries of ``STEPS``: a step is a class
with ``build(N) -> callable`` and ``lower_bound_bytes(N)``. ``train``: one iteration of the trainer's recipe with its model
(``--model``, default the small DeepLab-v2) at one source and one target 2:1 image whose feature
maps hold N pixels: what "train at higher resolution under a memory limit" means in numbers.

How "fits" is decided:
- GPU: in this process, ``torch.cuda.set_per_process_memory_fraction`` caps the caching allocator's
  reserved memory at the budget plus what was reserved before plus an eighth for segment rounding
  (at least 64 MiB), so going well over raises OutOfMemoryError; a step fits when it finishes and
  ``max_memory_allocated`` beyond the start is within the budget.
- CPU: each probe runs in a fresh process (``bench/memprobe.py``); it fits when its peak resident
  memory beyond the interpreter's own (VmHWM after a reset, inputs included) is within the
  budget. An RLIMIT_DATA cap well above the budget keeps a runaway probe from eating the machine.

Search: from ``--start-n``, halve until a probe fits, then extrapolate linearly in N from the
measured peaks (peak ~ a + b*N for every implementation) and bracket the frontier until the
largest fitting and smallest failing N are within ``--tol``. A probe that is certain to fail
(its lower bound, e.g. the reference's ``N*K*M*4`` bytes, exceeds the budget) is not run.

The search asks for multiples of ``--round-to``; a step may run a nearby N (``rows_run``: the
train step's images are whole 2:1 feature maps, ``B x h x 2h`` pixels). Every N printed or
written (``largest_n``, ``smallest_failing_n``, each probe's ``N``) is the N that ran; a probe
whose asked-for N differs records it as ``requested_n``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

DEFAULT_BUDGET_MIB = {"cpu": 512, "cuda": 16384}
DEFAULT_IMPLS = ("reference", "per_class", "torch", "triton", "cuda")


@dataclass(frozen=True)
class StepSpec:
    impl: str
    M: int
    C: int
    K: int
    dtype: str
    mode: str
    threshold: float
    device: str
    step: str = "loss"
    model: str = "deeplabv2_small"
    activation_checkpointing: bool = False
    batch: int = 1  # train step: images per domain, N pixels shared among them
    ce_bands: int = 1  # train step: the source cross-entropy in this many bands (train.ce_bands)


class LossStep:
    """Loss + backward of one batch of target features against a full dictionary."""

    def __init__(self, spec: StepSpec) -> None:
        from bench import harness

        self.spec = spec
        self.dtype = harness.DTYPES[spec.dtype]

    def rows_run(self, rows: int) -> int:
        """The N the step runs when asked for ``rows``: that many target rows."""
        return rows

    def lower_bound_bytes(self, rows: int) -> int:
        """Bytes the step cannot do without: features, gradient, dictionary, and the matrices
        the materializing implementations build by design."""
        spec, element = self.spec, torch.finfo(self.dtype).bits // 8
        needed = 2 * rows * spec.C * element + spec.K * spec.M * spec.C * element
        if spec.impl == "reference":
            needed += rows * spec.K * spec.M * 4
        elif spec.impl == "per_class":
            needed += (rows // spec.K) * spec.M * element
        return needed

    def build(self, rows: int):
        """Allocate the inputs and return the step (runs loss + backward once)."""
        import cossim_fast
        from bench import baselines

        spec = self.spec
        from bench import harness

        problem = harness.make_problem(rows, spec.M, spec.C, spec.dtype, spec.device, spec.K)
        features, labels, bank, counts = problem.features, problem.labels, problem.bank, problem.counts
        del problem
        if spec.impl == "per_class":
            def loss_of():
                return baselines.cosine_similarity_loss(features, labels, bank, counts, spec.threshold, mode=spec.mode)
        else:
            def loss_of():
                return cossim_fast.cosine_similarity_loss(
                    features, labels, bank, counts, spec.threshold, mode=spec.mode, backend=spec.impl
                )

        def step():
            loss_of().backward()

        return step


class TrainStep:
    """One training iteration of the trainer's recipe at ``batch`` source and ``batch`` target
    images whose feature maps hold N pixels together (2:1 images at output stride 8): source
    forward + CE + backward, the dictionary update, target forward + pseudo-labels + the cosine
    loss + backward."""

    def __init__(self, spec: StepSpec) -> None:
        from bench import harness

        self.spec = spec
        self.dtype = harness.DTYPES[spec.dtype]

    def feature_size(self, rows: int) -> tuple[int, int]:
        """Height and width of each image's feature map."""
        height = max(2, round(math.sqrt(rows / self.spec.batch / 2)))
        return height, 2 * height

    def rows_run(self, rows: int) -> int:
        """The feature pixels of the images built for ``rows``: whole ``h x 2h`` maps, so N rounds
        to ``B * 2h^2`` (4,864 asked for runs 784x392 images: 4,802 pixels)."""
        height, width = self.feature_size(rows)
        return self.spec.batch * height * width

    def images(self, rows: int) -> str:
        height, width = self.feature_size(rows)
        return f"{self.spec.batch} x {8 * width}x{8 * height}"

    def lower_bound_bytes(self, rows: int) -> int:
        spec = self.spec
        needed = spec.K * spec.M * spec.C * 4
        if spec.impl == "reference":
            needed += self.rows_run(rows) * spec.K * spec.M * 4
        return needed

    def build(self, rows: int):
        import cossim_fast
        from bench import baselines
        from cossim_fast.models import build_model
        from cossim_fast.training.source_loss import upsampled_cross_entropy
        from cossim_fast.training.target_losses import downsample_labels, pseudo_labels

        spec = self.spec
        device = torch.device(spec.device)
        model = build_model(spec.model, spec.K, activation_checkpointing=spec.activation_checkpointing).to(device).train()
        dictionary = cossim_fast.FeatureDictionary(spec.K, spec.M, model.feature_channels, device=device)
        full = torch.nn.functional.normalize(torch.randn(spec.K, spec.M, model.feature_channels, device=device), dim=2)
        dictionary.bank.copy_(full)
        dictionary.counts.fill_(spec.M)
        del full
        height, width = self.feature_size(rows)
        expected_rows = self.rows_run(rows)
        source = torch.randn(spec.batch, 3, 8 * height, 8 * width, device=device)
        target = torch.randn(spec.batch, 3, 8 * height, 8 * width, device=device)
        labels = torch.randint(0, spec.K, (spec.batch, 8 * height, 8 * width), device=device)
        autocast = torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

        def step():
            with autocast:
                out = model(source)
                upsampled_cross_entropy(out.logits, labels, ignore_index=255, bands=spec.ce_bands).backward()
            dictionary.update(out.features.detach().float(), downsample_labels(labels, out.features.shape[-2:]), max_per_class=64)
            with autocast:
                out_t = model(target)
                got = out_t.features.shape[0] * out_t.features.shape[-2] * out_t.features.shape[-1]
                if got != expected_rows:  # the N recorded must be the N the loss saw
                    raise RuntimeError(
                        f"model {spec.model}'s target features hold {got} pixels, not the N = {expected_rows} the "
                        f"frontier records for {spec.batch} x {8 * width}x{8 * height} images (is its output stride 8?)"
                    )
                pseudo = pseudo_labels(out_t.logits, 0.0, None)
                if spec.impl == "per_class":
                    rows_t = out_t.features.permute(0, 2, 3, 1).reshape(-1, out_t.features.shape[1])
                    loss = baselines.cosine_similarity_loss(
                        rows_t, pseudo.reshape(-1), dictionary.bank, dictionary.counts, spec.threshold, mode=spec.mode
                    )
                else:
                    loss = dictionary.loss(out_t.features, pseudo, spec.threshold, mode=spec.mode, backend=spec.impl)
            loss.backward()

        return step


#: The steps whose frontier can be measured.
STEPS = {"loss": LossStep, "train": TrainStep}


def make_step(spec: StepSpec):
    return STEPS[spec.step](spec)


def unsupported(spec: StepSpec) -> str | None:
    from bench import harness
    from cossim_fast.backends import dispatch

    if spec.impl == "per_class":
        return None
    if spec.impl not in dispatch.BACKEND_NAMES:
        return f"unknown implementation {spec.impl!r}"
    if spec.impl == "triton" and spec.device == "cpu":
        return "triton on CPU runs only in Triton's interpreter (not measured)"
    reasons = []
    for op in (f"{spec.mode}_forward", f"{spec.mode}_backward"):
        reasons += dispatch.unsupported_reasons(spec.impl, op, torch.device(spec.device), harness.DTYPES[spec.dtype])
    return "; ".join(dict.fromkeys(reasons)) or None


# ----------------------------------------------------------------------------- one probe


def child_probe(spec: dict, rows: int) -> dict:
    """In a fresh CPU process: peak resident memory of the step at ``rows``, inputs included."""
    from bench import harness
    from bench.memprobe import PeakMeter

    harness.configure_for_benchmarks(False)
    step_spec = StepSpec(**spec)
    step = make_step(step_spec)
    tiny = StepSpec(**dict(spec, M=min(step_spec.M, 16)))
    make_step(tiny).build(min(rows, 64))()  # warm-up: lazy initialization is not part of the step
    gc.collect()
    meter = PeakMeter()
    meter.start()
    started = time.perf_counter()
    step.build(rows)()
    seconds = time.perf_counter() - started
    return {"peak_bytes": meter.stop(), "seconds": seconds, "method": meter.method}


def _memory_failure(error: str) -> bool:
    """Whether a CPU probe's error is running out of memory (its data limit, or the OOM killer),
    as opposed to a bug, which must not pass for a small frontier."""
    signs = ("MemoryError", "can't allocate memory", "out of memory", "Cannot allocate memory", "killed by signal 9")
    return any(sign in error for sign in signs)


class CpuMeasurer:
    def __init__(self, spec: StepSpec, budget: int, probe_timeout: float) -> None:
        from bench import memprobe

        self.spec, self.budget, self.timeout = spec, budget, probe_timeout
        self.rows_run = make_step(spec).rows_run
        self.probe = memprobe.shared_probe()

    def __call__(self, rows: int) -> dict:
        reply = self.probe.run(
            {
                "function": "bench.frontier:child_probe",
                "kwargs": {"spec": asdict(self.spec), "rows": rows},
                "timeout": self.timeout,
                "data_limit_bytes": 3 * self.budget + 2**30,
            }
        )
        if not reply.get("ok"):
            error = reply.get("error", "unknown error")
            if not reply.get("timeout") and not _memory_failure(error):
                raise RuntimeError(f"the probe at N={self.rows_run(rows)} failed, not for memory: {error}")
            return {"fits": False, "peak_bytes": None, "timeout": bool(reply.get("timeout")), "error": error}
        return {"fits": reply["peak_bytes"] <= self.budget, "peak_bytes": reply["peak_bytes"], "seconds": reply["seconds"]}


class CudaMeasurer:
    def __init__(self, spec: StepSpec, budget: int, probe_timeout: float) -> None:
        from bench import harness

        harness.configure_for_benchmarks(False)
        self.spec, self.budget, self.timeout = spec, budget, probe_timeout
        self.step = make_step(spec)
        self.total = torch.cuda.get_device_properties(0).total_memory
        self.step.build(256)()  # warm-up: compilation and autotuning happen here, not in a probe
        torch.cuda.synchronize()

    def __call__(self, rows: int) -> dict:
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        # The fraction caps reserved memory (whole segments, fragmentation included); "fits" is
        # judged on allocated memory below, so the cap leaves the allocator some room above it.
        cap = torch.cuda.memory_reserved() + self.budget + max(64 * 2**20, self.budget // 8)
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / self.total))
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            self.step.build(rows)()
            torch.cuda.synchronize()
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            text = str(error)
            if not isinstance(error, torch.cuda.OutOfMemoryError) and "out of memory" not in text.lower() and "ALLOC_FAILED" not in text:
                raise
            outcome = {"fits": False, "peak_bytes": None, "error": f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"}
        else:
            peak = torch.cuda.max_memory_allocated() - base
            outcome = {"fits": peak <= self.budget, "peak_bytes": peak, "seconds": time.perf_counter() - started}
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        gc.collect()
        torch.cuda.empty_cache()
        return outcome


# ----------------------------------------------------------------------------- the search


@dataclass
class Frontier:
    """One search's outcome; every N is one the step ran (``rows_run``), not the one asked for."""

    spec: StepSpec
    budget_bytes: int
    largest_n: int | None = None
    peak_bytes: int | None = None
    smallest_failing_n: int | None = None
    note: str = ""
    probes: list[dict] = field(default_factory=list)


def _round(rows: float, step: int) -> int:
    return max(step, int(rows // step) * step)


def search(
    spec: StepSpec, measure, budget: int, *, start_n: int, step: int, tol: float, max_n: int, deadline: float, lower_bound=None
) -> Frontier:
    """Largest fitting N for ``measure(N) -> {"fits", "peak_bytes", ...}`` (``lower_bound(N)``:
    bytes the step needs for sure; default the step's own). The search asks for multiples of
    ``step``; the result and the probes hold the N the step ran for each (``rows_run``)."""
    result = Frontier(spec, budget)
    bound = lower_bound or make_step(spec).lower_bound_bytes
    rows_run = make_step(spec).rows_run
    fitting: list[tuple[int, int]] = []  # (N, peak) of probes that fit
    low, high = None, None

    def probe(rows: int) -> bool:
        nonlocal low, high
        ran = {"N": rows_run(rows)} | ({"requested_n": rows} if rows_run(rows) != rows else {})
        if bound(rows) > budget:
            result.probes.append(ran | {"fits": False, "skipped": "lower bound over budget", "lower_bound_bytes": bound(rows)})
            high = rows if high is None else min(high, rows)
            return False
        outcome = measure(rows)
        result.probes.append(ran | outcome)
        if outcome["fits"]:
            low = rows if low is None else max(low, rows)
            fitting.append((rows, outcome["peak_bytes"]))
            if rows == low:
                result.peak_bytes = outcome["peak_bytes"]
            return True
        if outcome.get("timeout"):
            result.note = f"a probe at N={rows_run(rows)} ran past the probe timeout: the frontier is at least the N shown"
            raise TimeoutError
        high = rows if high is None else min(high, rows)
        return False

    try:
        rows = _round(start_n, step)
        while not probe(rows):
            if rows <= step:
                result.note = f"does not fit even at N={rows_run(step)}"
                result.smallest_failing_n = rows_run(step)
                return result
            rows = _round(rows // 2, step)
        while True:
            if high is not None and (high <= low * (1 + tol) or high - low <= step):
                break
            if low >= max_n:
                result.note = f"reached --max-n {max_n}"
                break
            if time.monotonic() > deadline:
                result.note = "time budget spent: the frontier is at least the N shown"
                break
            predicted = None
            points = sorted(fitting)[-2:]
            if len(points) == 2 and points[1][1] > points[0][1]:
                (n1, p1), (n2, p2) = points
                predicted = n2 + (budget - p2) * (n2 - n1) / (p2 - p1)
            elif points and points[-1][1] > 0:
                predicted = points[-1][0] * budget / points[-1][1]
            if high is None:
                guess = predicted * (1 - tol / 2) if predicted else 2 * low
                candidate = min(max(guess, low * (1 + tol)), low * 8)
            else:
                inner_low, inner_high = low + 0.1 * (high - low), high - 0.1 * (high - low)
                guess = predicted * (1 - tol / 4) if predicted else math.sqrt(low * high)
                candidate = guess if inner_low <= guess <= inner_high else math.sqrt(low * high)
            # Rounded down to the step it may land on N that fitted: the next step up is then the
            # probe (its own N is the one left to decide), unless it is the failing N itself.
            candidate = min(max(_round(candidate, step), low + step), max_n)
            if candidate <= low or (high is not None and candidate >= high):
                break
            probe(candidate)
    except TimeoutError:
        pass
    result.largest_n = None if low is None else rows_run(low)
    result.smallest_failing_n = None if high is None else rows_run(high)
    return result


# ----------------------------------------------------------------------------- the command


def _images(result: Frontier) -> str:
    """For the train step: the images the largest fitting N stands for."""
    if result.spec.step != "train" or not result.largest_n:
        return ""
    return f"({TrainStep(result.spec).images(result.largest_n)} images)"


def _table(results: list[Frontier]) -> str:
    lines = [
        f"{'M':>6} {'impl':<10} {'largest N':>11} {'peak MiB':>9} {'probes':>6} {'N / reference':>14} {'N / per_class':>14}  note",
        "-" * 90,
    ]
    by_m: dict[int, dict[str, Frontier]] = {}
    for result in results:
        by_m.setdefault(result.spec.M, {})[result.spec.impl] = result
    def ratio(result: Frontier, base: Frontier | None) -> str:
        if not base or not base.largest_n or result.largest_n is None:
            return "-"
        return f"{result.largest_n / base.largest_n:.1f}x"

    for slots, impls in by_m.items():
        for impl, result in impls.items():
            largest = "-" if result.largest_n is None else f"{result.largest_n:,}"
            note = " ".join(part for part in (_images(result), result.note) if part)
            peak = "-" if result.peak_bytes is None else f"{result.peak_bytes / 2**20:.0f}"
            lines.append(
                f"{slots:>6} {impl:<10} {largest:>11} {peak:>9} {len(result.probes):>6} {ratio(result, impls.get('reference')):>14} {ratio(result, impls.get('per_class')):>14}  {note}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frontier", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-mib", type=float, default=None, help="memory budget (default: 512 on CPU, 16384 on GPU)")
    parser.add_argument("--M", default="1024,4096,16384", help="dictionary slots per class, comma-separated")
    parser.add_argument("--C", type=int, default=256)
    parser.add_argument("--K", type=int, default=19)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--mode", choices=("max", "all"), default="max")
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS))
    parser.add_argument("--step", choices=tuple(STEPS), default="loss", help="what must fit: the loss step, or a training iteration of the trainer's model")
    parser.add_argument("--model", default="deeplabv2_small", help="the trainer model of --step train (its feature channels replace --C)")
    parser.add_argument("--batch", type=int, default=1, help="--step train: images per domain (N is shared among them)")
    parser.add_argument("--ce-bands", type=int, default=1, help="--step train: the source cross-entropy in this many bands (train.ce_bands)")
    parser.add_argument(
        "--activation-checkpointing", action="store_true",
        help="--step train: the model recomputes its backbone blocks in the backward (model.activation_checkpointing)",
    )
    parser.add_argument("--start-n", type=int, default=4096)
    parser.add_argument("--round-to", type=int, default=256, help="N is a multiple of this")
    parser.add_argument("--tol", type=float, default=0.05, help="stop when the bracket is within this fraction")
    parser.add_argument("--max-n", type=int, default=2**26)
    parser.add_argument("--probe-timeout", type=float, default=300.0, help="seconds per CPU probe")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run")
    parser.add_argument("--json", default=None, help="write the results (with every probe) here")
    args = parser.parse_args(argv)
    if (args.activation_checkpointing or args.batch != 1 or args.ce_bands != 1) and args.step != "train":
        parser.error("--activation-checkpointing, --batch and --ce-bands apply to --step train (the loss step has no model)")
    if min(args.batch, args.ce_bands) < 1:
        parser.error(f"--batch and --ce-bands must be >= 1, got {args.batch} and {args.ce_bands}")

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    from bench import harness

    harness.configure_for_benchmarks(False)
    if args.step == "train":
        from cossim_fast.models import build_model

        args.C = build_model(args.model, args.K).feature_channels
    budget = int((args.budget_mib or DEFAULT_BUDGET_MIB[args.device]) * 2**20)
    impls = [impl for impl in args.impls.split(",") if impl]
    slots_list = [int(m) for m in args.M.split(",") if m]
    started = time.monotonic()
    deadline = started + args.time_budget if args.time_budget else math.inf
    print(
        f"memory frontier of the '{args.step}' step{' (activation checkpointing)' if args.activation_checkpointing else ''}"
        f"{f' (cross-entropy in {args.ce_bands} bands)' if args.ce_bands > 1 else ''} "
        f"on {args.device}: budget {budget / 2**20:.0f} MiB, "
        f"K={args.K}, C={args.C}, {args.dtype}, mode={args.mode}; machine: {json.dumps(harness.machine())}",
        flush=True,
    )
    results, skipped = [], []
    for slots in slots_list:
        for impl in impls:
            spec = StepSpec(
                impl, slots, args.C, args.K, args.dtype, args.mode, args.threshold, args.device, args.step, args.model,
                args.activation_checkpointing, args.batch, args.ce_bands,
            )
            reason = unsupported(spec)
            if reason:
                skipped.append({"M": slots, "impl": impl, "reason": reason})
                print(f"M={slots} {impl}: skipped ({reason})", flush=True)
                continue
            if time.monotonic() > deadline:
                skipped.append({"M": slots, "impl": impl, "reason": "time budget spent"})
                print(f"M={slots} {impl}: not run (time budget spent)", flush=True)
                continue
            try:
                measurer = (CudaMeasurer if args.device == "cuda" else CpuMeasurer)(spec, budget, args.probe_timeout)
                result = search(
                    spec, measurer, budget, start_n=args.start_n, step=args.round_to, tol=args.tol, max_n=args.max_n, deadline=deadline
                )
            except Exception as error:  # noqa: BLE001 - one failing implementation must not end the run
                skipped.append({"M": slots, "impl": impl, "reason": f"error: {type(error).__name__}: {error}"[:500]})
                print(f"M={slots} {impl}: error {type(error).__name__}: {error}", flush=True)
                continue
            results.append(result)
            shown = "-" if result.largest_n is None else f"{result.largest_n:,}"
            print(f"M={slots} {impl}: largest N {shown} {_images(result)} ({len(result.probes)} probes) {result.note}", flush=True)
            if args.json:
                _write(args.json, args, budget, results, skipped)
    print()
    print(_table(results))
    for entry in skipped:
        print(f"skipped M={entry['M']} {entry['impl']}: {entry['reason']}")
    if args.json:
        _write(args.json, args, budget, results, skipped)
    return 0


def _write(path: str, args, budget: int, results: list[Frontier], skipped: list[dict]) -> None:
    from bench import harness

    document = {
        "machine_info": harness.machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "budget_bytes": budget,
        "results": [asdict(r) for r in results],
        "skipped": skipped,
    }
    with open(path, "w") as out:
        json.dump(document, out, indent=1)


if __name__ == "__main__":
    sys.exit(main())
