"""What the benchmarks measure: the cases, their inputs, the timed callables, skips and memory.

Shared by the pytest-benchmark suite (``bench/test_bench_ops.py``), the plain runner
(``python -m bench.run``, used by ``bench/gpu_check.sh``), the memory probe subprocesses and the
frontier. A case is one (operation, implementation, N, M, C, dtype) on one device.

Operations (``op``): the loss of METHOD.md 4 in each mode, timed as forward (loss with autograd
recording), backward (``loss.backward()`` of a forward done outside the timer) and both, and the
dictionary update of METHOD.md 5:
``max-fwd max-bwd max-fwd_bwd all-fwd all-bwd all-fwd_bwd update``.

Implementations (``impl``): every backend of the package by name (``reference``, ``torch``,
``triton``, ``cuda``), ``per_class`` (``bench/baselines.py``, the per-class materializing
baseline), ``class_gemm`` (the per-class GEMMs alone, forward ops only: cuBLAS on a GPU) and
``keops`` (pykeops LazyTensor argmax, ``max-fwd`` only, where pykeops is installed).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import importlib.metadata
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

import cossim_fast
from bench import baselines
from cossim_fast.backends import dispatch
from cossim_fast.contract import inputs

NUM_CLASSES = 19
THRESHOLD = 0.0  # random features: max mode selects every row, all mode about half the pairs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: op -> (loss mode or None, phase)
OPS = {
    "max-fwd": ("max", "fwd"),
    "max-bwd": ("max", "bwd"),
    "max-fwd_bwd": ("max", "fwd_bwd"),
    "all-fwd": ("all", "fwd"),
    "all-bwd": ("all", "bwd"),
    "all-fwd_bwd": ("all", "fwd_bwd"),
    "update": (None, "update"),
}

BASELINES = ("per_class", "class_gemm", "keops")
IMPLS = (*dispatch.BACKEND_NAMES, *BASELINES)
#: Implementations that only run some operations (the others are not generated at all).
IMPL_OPS = {"class_gemm": ("max-fwd", "all-fwd"), "keops": ("max-fwd",)}


@dataclass(frozen=True)
class Grid:
    N: tuple[int, ...]
    M: tuple[int, ...]
    C: tuple[int, ...]
    dtypes: tuple[str, ...]


GRIDS = {
    # This CPU (2 cores, one thread) in about 3 minutes; the reference's N x K*M fp32 matrix is at most 304 MiB.
    "cpu": Grid(N=(512, 2048), M=(256, 2048), C=(256,), dtypes=("fp32", "bf16")),
    # The reduced GPU grid of bench/gpu_check.sh: the shapes of the fused backends' targets
    # (N = 131072, M = 4096, C = 256 and 2048), and N = 16384 where the reference still fits.
    "gpu": Grid(N=(16384, 131072), M=(4096,), C=(256, 2048), dtypes=("bf16", "fp32")),
    # The full GPU grid of the benchmark issue (tens of minutes on one H100).
    "full": Grid(N=(8192, 32768, 131072), M=(256, 2048, 4096), C=(256, 2048), dtypes=("fp32", "bf16")),
}


@dataclass(frozen=True)
class Case:
    op: str
    impl: str
    N: int
    M: int
    C: int
    dtype: str
    device: str = "cpu"
    K: int = NUM_CLASSES
    threshold: float = THRESHOLD
    seed: int = 0

    @property
    def mode(self) -> str | None:
        return OPS[self.op][0]

    @property
    def phase(self) -> str:
        return OPS[self.op][1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def id(self) -> str:
        return f"{self.op}-{self.impl}-N{self.N}-M{self.M}-C{self.C}-{self.dtype}"

    @property
    def group(self) -> str:
        return f"{self.op} N={self.N} M={self.M} C={self.C} {self.dtype} {self.device}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Case:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def default_device() -> str:
    return os.environ.get("COSSIM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def _env_list(name: str, cast=str) -> tuple | None:
    value = os.environ.get(name, "").strip()
    return tuple(cast(v) for v in value.split(",") if v.strip()) if value else None


def grid_cases(grid: str | None = None, device: str | None = None, ops=None, impls=None) -> list[Case]:
    """Every case of a named grid, overridable by ``COSSIM_BENCH_{N,M,C,DTYPES,OPS,IMPLS}``
    (comma-separated lists). Grid default: ``COSSIM_BENCH_GRID``, else "cpu" or "gpu" by device."""
    device = device or default_device()
    grid = grid or os.environ.get("COSSIM_BENCH_GRID") or ("gpu" if device == "cuda" else "cpu")
    if grid not in GRIDS:
        raise ValueError(f"unknown benchmark grid {grid!r}; choose one of {tuple(GRIDS)}")
    base = GRIDS[grid]
    sizes_n = _env_list("COSSIM_BENCH_N", int) or base.N
    sizes_m = _env_list("COSSIM_BENCH_M", int) or base.M
    sizes_c = _env_list("COSSIM_BENCH_C", int) or base.C
    dtypes = _env_list("COSSIM_BENCH_DTYPES") or base.dtypes
    ops = tuple(ops or _env_list("COSSIM_BENCH_OPS") or OPS)
    impls = tuple(impls or _env_list("COSSIM_BENCH_IMPLS") or IMPLS)
    for name, values, known in (("dtype", dtypes, DTYPES), ("op", ops, OPS), ("impl", impls, IMPLS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            raise ValueError(f"unknown {name} {unknown}; choose from {tuple(known)}")
    cases = []
    for dtype in dtypes:
        for channels in sizes_c:
            for slots in sizes_m:
                for op in ops:
                    for rows in sizes_n:
                        for impl in impls:
                            if op in IMPL_OPS.get(impl, OPS):
                                cases.append(Case(op, impl, rows, slots, channels, dtype, device))
    return cases


# ----------------------------------------------------------------------------- inputs


@dataclass
class Problem:
    features: torch.Tensor  # N x C, requires_grad
    labels: torch.Tensor  # N, in [0, K)
    bank: torch.Tensor  # K x M x C, unit-norm rows, features' dtype
    counts: torch.Tensor  # K, all full


def random_rows(rows: int, channels: int, dtype: torch.dtype, generator: torch.Generator, device: str, *, unit: bool = False) -> torch.Tensor:
    """``rows x channels`` Gaussian rows (unit-norm if ``unit``) in ``dtype``, drawn in fp32 a
    block at a time, so making them needs no more memory than the result (plus one block)."""
    out = torch.empty(rows, channels, dtype=dtype, device=device)
    block = max(1, (16 * 2**20) // (4 * channels))
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        chunk = torch.randn(stop - start, channels, generator=generator, device=device)
        if unit:
            chunk = torch.nn.functional.normalize(chunk, dim=1)
        out[start:stop] = chunk
    return out


def make_problem(rows: int, slots: int, channels: int, dtype: str, device: str, classes: int = NUM_CLASSES, seed: int = 0) -> Problem:
    """Random inputs, drawn on the device itself (uniform labels, full buckets)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    features = random_rows(rows, channels, DTYPES[dtype], generator, device).requires_grad_(True)
    labels = torch.randint(0, classes, (rows,), generator=generator, device=device)
    bank = random_rows(classes * slots, channels, DTYPES[dtype], generator, device, unit=True).view(classes, slots, channels)
    counts = torch.full((classes,), slots, dtype=torch.int64, device=device)
    return Problem(features, labels, bank, counts)


_problem_cache: dict[tuple, Problem] = {}


def problem_for(case: Case, cached: bool = True) -> Problem:
    """The case's inputs; consecutive cases of one shape share them (one entry is kept)."""
    key = (case.N, case.M, case.C, case.dtype, case.device, case.K, case.seed)
    if not cached:
        return make_problem(case.N, case.M, case.C, case.dtype, case.device, case.K, case.seed)
    if key not in _problem_cache:
        _problem_cache.clear()
        gc.collect()
        _problem_cache[key] = make_problem(case.N, case.M, case.C, case.dtype, case.device, case.K, case.seed)
    return _problem_cache[key]


def clear_cache() -> None:
    _problem_cache.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- callables


@dataclass
class Prepared:
    """``target(*args)`` is what is timed; ``setup()`` (if any) runs before each call, untimed,
    and returns ``(args, kwargs)`` for it (pytest-benchmark's pedantic protocol)."""

    target: Callable
    setup: Callable | None
    flops: int | None  # nominal 2 * N_valid * M * C of the forward, None for backward/update
    n_valid: int
    #: ``target``'s work without its device synchronization, repeatable with no setup: what a
    #: CUDA graph can capture (None for the backward phase, which needs a fresh forward per call).
    body: Callable | None = None


def nominal_flops(case: Case) -> int:
    return 2 * case.N * case.M * case.C  # uniform labels in [0, K), full buckets: N_valid = N


def _prepared(body: Callable, device: str, flops: int | None, n_valid: int) -> Prepared:
    """A setup-free case: ``body`` timed with a device synchronization after it."""
    return Prepared(_synchronized(body, device), None, flops, n_valid, body)


def _synchronized(fn: Callable, device: str) -> Callable:
    if device != "cuda":
        return fn

    def run(*args, **kwargs):
        fn(*args, **kwargs)
        torch.cuda.synchronize()

    return run


def loss_function(case: Case, problem: Problem) -> Callable:
    """``features, labels -> loss`` of the case's implementation."""
    bank, counts, tau, mode = problem.bank, problem.counts, case.threshold, case.mode
    if case.impl == "per_class":
        return lambda f, y: baselines.cosine_similarity_loss(f, y, bank, counts, tau, mode=mode)
    return lambda f, y: cossim_fast.cosine_similarity_loss(f, y, bank, counts, tau, mode=mode, backend=case.impl)


def prepare(case: Case, cached: bool = True) -> Prepared:
    """The timed callable of a case (inputs are made here, outside any timer)."""
    problem = problem_for(case, cached)
    features, labels, device = problem.features, problem.labels, case.device
    flops = nominal_flops(case) if case.phase in ("fwd", "fwd_bwd") else None

    if case.phase == "update":
        dictionary = cossim_fast.FeatureDictionary(case.K, case.M, case.C, device=device, dtype=case.torch_dtype)
        source = features.detach()
        if case.impl == "per_class":
            def update():
                baselines.dictionary_update(dictionary.bank, dictionary.counts, dictionary.ptr, source, labels)
        else:
            def update():
                dictionary.update(source, labels, backend=case.impl)
        return _prepared(update, device, None, case.N)

    if case.impl == "class_gemm":
        gemms = baselines.PerClassGemms(features.detach(), labels, problem.bank, problem.counts)
        return _prepared(gemms, device, flops, case.N)
    if case.impl == "keops":
        detached = features.detach()

        def keops_forward():
            baselines.keops_max_cosine_similarity(detached, labels, problem.bank, problem.counts)

        return _prepared(keops_forward, device, flops, case.N)

    loss_of = loss_function(case, problem)
    if case.phase == "fwd":
        def forward():
            loss_of(features, labels)

        return _prepared(forward, device, flops, case.N)
    if case.phase == "fwd_bwd":
        def forward_backward():
            features.grad = None
            loss_of(features, labels).backward()

        return _prepared(forward_backward, device, flops, case.N)

    def setup():
        features.grad = None
        loss = loss_of(features, labels)
        if device == "cuda":
            torch.cuda.synchronize()
        return (loss,), {}

    def backward(loss):
        loss.backward()

    return Prepared(_synchronized(backward, device), setup, None, case.N)


def call_once(prepared: Prepared) -> None:
    args, kwargs = prepared.setup() if prepared.setup else ((), {})
    prepared.target(*args, **kwargs)


# ----------------------------------------------------------------------------- skips


def backend_ops(case: Case) -> list[str]:
    if case.phase == "update":
        return ["update"]
    ops = [f"{case.mode}_forward"]
    if case.phase in ("bwd", "fwd_bwd"):
        ops.append(f"{case.mode}_backward")
    return ops


def memory_limit_bytes(device: str) -> int:
    """What one case may use: ``COSSIM_BENCH_MEMORY_LIMIT_GIB``, else 70% of the available
    memory (CPU: MemAvailable; GPU: total minus what this process holds, 90%)."""
    if os.environ.get("COSSIM_BENCH_MEMORY_LIMIT_GIB"):
        return int(float(os.environ["COSSIM_BENCH_MEMORY_LIMIT_GIB"]) * 2**30)
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        return int(0.9 * total) - torch.cuda.memory_allocated()
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(0.7 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 8 * 2**30


def estimated_bytes(case: Case) -> int:
    """Rough peak of the materializing implementations (0 for the others).

    reference: the ``N x K*M`` fp32 similarity matrix (``N*K*M*4`` bytes), its class mask and the
    masked copy (x2.7; "all" mode adds the selection and its fp32 copy: x3.5).
    per_class: the largest class's ``n_k x M`` matrices (forward and the backward's gradient) and,
    in "all" mode, the selection masks of every class kept for the backward (``N*M`` bytes).
    """
    if case.phase == "update":
        return 0
    if case.impl == "reference":
        dense = case.N * case.K * case.M * 4
        return int(dense * (3.5 if case.mode == "all" else 2.7))
    if case.impl == "per_class":
        largest = int(1.3 * case.N / case.K) + 64
        return largest * case.M * 12 + (case.N * case.M if case.mode == "all" else 0)
    return 0


def executed_flops(case: Case) -> int:
    """Arithmetic actually performed by the case (the reference compares with all K classes)."""
    if case.phase == "update":
        return 0
    factor = case.K if case.impl == "reference" else 1
    return nominal_flops(case) * factor * (2 if case.mode == "all" else 1)


@cache
def _keops_error() -> str | None:
    try:
        importlib.import_module("pykeops.torch")
    except Exception as error:  # noqa: BLE001 - any failure means the column is skipped
        return f"pykeops is not usable here ({type(error).__name__}: {error})"
    return None


def skip_reason(case: Case) -> str | None:
    """Why this case is not run (None: it is)."""
    if case.device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    device = torch.device(case.device)
    if case.impl in dispatch.BACKEND_NAMES:
        if case.impl == "triton" and case.device == "cpu":
            return "triton on CPU runs only in Triton's interpreter, which is a test tool, not benchmarked"
        reasons = []
        for op in backend_ops(case):
            reasons += [r for r in dispatch.unsupported_reasons(case.impl, op, device, case.torch_dtype) if r not in reasons]
        if reasons:
            return f"backend {case.impl} cannot run {case.op} on {case.device} {case.dtype}: " + "; ".join(reasons)
    if case.impl == "keops" and _keops_error():
        return _keops_error()
    estimate = estimated_bytes(case)
    limit = memory_limit_bytes(case.device)
    if estimate > limit:
        dense = case.N * case.K * case.M * 4
        what = (
            f"reference would materialize N x K*M = {case.N} x {case.K * case.M} fp32 ({dense / 2**30:.1f} GiB)"
            if case.impl == "reference"
            else "per_class would materialize n_k x M matrices and masks"
        )
        return f"{what}: about {estimate / 2**30:.1f} GiB peak, over the {limit / 2**30:.1f} GiB limit (COSSIM_BENCH_MEMORY_LIMIT_GIB)"
    if case.device == "cpu":
        cap = float(os.environ.get("COSSIM_BENCH_CPU_MAX_GFLOP", "300")) * 1e9
        if executed_flops(case) > cap:
            return (
                f"{case.impl} would do {executed_flops(case) / 1e9:.0f} GFLOP per call, over the CPU cap of "
                f"{cap / 1e9:.0f} GFLOP (COSSIM_BENCH_CPU_MAX_GFLOP)"
            )
    return None


# ----------------------------------------------------------------------------- memory


def cuda_peak(case: Case) -> dict:
    """Peak CUDA memory of one call beyond what exists before it (inputs, autograd state of the
    forward for ``bwd``), after one warm-up call (compilation and autotuning not counted)."""
    prepared = prepare(case)
    call_once(prepared)
    problem_for(case).features.grad = None  # the warm-up's gradient: the measured call makes its own
    gc.collect()
    torch.cuda.synchronize()
    args, kwargs = prepared.setup() if prepared.setup else ((), {})
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    prepared.target(*args, **kwargs)
    peak = torch.cuda.max_memory_allocated() - before
    del args, kwargs
    return {"peak_mib": peak / 2**20, "peak_method": "torch.cuda.max_memory_allocated after reset, minus allocated before"}


def peak_request(case: Case) -> dict:
    """The memory probe's request for a CPU case, with this process's value-check setting: the
    child is a fresh process, and its peak must be measured as the timed calls run."""
    return {"kind": "case", "case": case.to_dict(), "check_values": inputs.value_checks_enabled()}


def measure_peak(case: Case, probe=None) -> dict:
    """``{"peak_mib", "peak_method"}``: GPU in this process, CPU in a fresh subprocess (``probe``:
    a ``bench.memprobe.MemoryProbe``; one is started if None). On failure ``peak_mib`` is None
    and ``peak_error`` says why. ``class_gemm`` has none: its normalized rows and its output are
    built before the call (it is the throughput line), so a peak would read as zero."""
    if case.impl == "class_gemm":
        return {"peak_mib": None, "peak_method": "not measured: class_gemm is a throughput line, built before the call"}
    if case.device == "cuda":
        return cuda_peak(case)
    from bench import memprobe

    probe = probe or memprobe.shared_probe()
    reply = probe.run(peak_request(case))
    if not reply.get("ok"):
        return {"peak_mib": None, "peak_method": probe.describe(), "peak_error": reply.get("error", "unknown")}
    return {"peak_mib": reply["peak_mib"], "peak_method": f"{reply['method']}, {probe.describe()}"}


# ----------------------------------------------------------------------------- records


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@cache
def machine_info() -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cossim_fast": cossim_fast.__version__,
        "extension": cossim_fast.extension_status(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def machine() -> dict:
    """``machine_info()`` plus this process's torch thread count."""
    return dict(machine_info(), torch_threads=torch.get_num_threads())


def percentile(data: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    ordered = sorted(data)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def fp32_precision(impl: str) -> str | None:
    """How the fused backend ``impl`` dots fp32 inputs in this process (None for the others)."""
    if impl == "triton":
        from cossim_fast.backends.triton.backend import fp32_precision as precision
    elif impl == "cuda":
        from cossim_fast.backends.cuda import fp32_precision as precision
    else:
        return None
    return precision()


def extra_info(case: Case, prepared: Prepared, seconds: list[float], memory: dict, timing: str = "eager") -> dict:
    """What every result records beside pytest-benchmark's own statistics. ``timing``: "eager"
    (wall time of the call, host path included) or "graph" (CUDA graph replays: device time)."""
    median = percentile(seconds, 50)
    info = case.to_dict()
    info.update(
        mode=case.mode,
        phase=case.phase,
        timing=timing,
        fp32_precision=fp32_precision(case.impl) if case.dtype == "fp32" else None,
        n_valid=prepared.n_valid,
        nominal_flops=prepared.flops,
        tflops=(prepared.flops / median / 1e12) if prepared.flops and median > 0 else None,
        median_ms=median * 1e3,
        p20_ms=percentile(seconds, 20) * 1e3,
        p80_ms=percentile(seconds, 80) * 1e3,
        rounds=len(seconds),
        value_checks=inputs.value_checks_enabled(),
        workspace_mb=os.environ.get("COSSIM_FAST_WORKSPACE_MB", "64"),
        machine=machine(),
    )
    info.update(memory)
    return info


def configure_for_benchmarks(check_values: bool = False) -> None:
    """Strict dispatch (a backend that cannot run is an error, never a silent fallback), by
    default no data-reading value checks (the baselines have none either), and the CPU thread
    count: ``COSSIM_BENCH_THREADS``, default 1.

    One thread by default because on a shared 2-core machine a second OpenMP thread waits a
    scheduler slice (~4 ms) at every parallel region whenever another process holds the other
    core: measured here, the torch backend's loss forward+backward at N=4096, M=1024 took 0.81 s
    with 2 threads and 0.031 s with 1 (the reference's big GEMM: 1.02 s and 0.89 s).
    """
    dispatch.set_strict(True)
    cossim_fast.set_value_checks(check_values)
    threads = int(os.environ.get("COSSIM_BENCH_THREADS", "1"))
    if threads > 0:
        torch.set_num_threads(threads)


def timing_defaults(device: str) -> tuple[int, int]:
    """``(rounds, warmup_rounds)``: ``COSSIM_BENCH_ROUNDS`` / ``COSSIM_BENCH_WARMUP`` override."""
    rounds, warmup = (10, 3) if device == "cuda" else (3, 1)
    rounds = int(os.environ.get("COSSIM_BENCH_ROUNDS", rounds))
    warmup = int(os.environ.get("COSSIM_BENCH_WARMUP", warmup))
    if rounds < 1 or warmup < 0:  # refused, as --rounds and --warmup are, not silently raised
        raise ValueError(f"COSSIM_BENCH_ROUNDS must be >= 1 and COSSIM_BENCH_WARMUP >= 0, got {rounds} and {warmup}")
    return rounds, warmup


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_path_env() -> dict:
    """The environment for child interpreters: this repository first on PYTHONPATH."""
    env = dict(os.environ)
    parts = [repo_root()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env



if __name__ == "__main__":  # python -m bench.harness: what the records will say about this machine
    import json

    print(json.dumps(machine(), indent=1))
    for package in ("matplotlib", "pytest-benchmark", "pykeops"):
        print(f"{package}: {_version(package) or 'not installed'}")
    print(f"available backends: {cossim_fast.available_backends()}")
