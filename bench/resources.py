"""Compile-time resources of every kernel for one GPU architecture, with no GPU needed.

Registers per thread, spilled bytes and shared memory decide a kernel's occupancy; spills are
what a tile choice gets wrong first. Both backends' kernels are compiled here for the target:

- CUDA (``csrc/cuda/*.cu``): nvcc ``--resource-usage`` with the extension's include paths and
  defines, per kernel: registers, spill stores/loads, static shared memory, stack.
- Triton: every launch configuration the backend can pick (the tile space of
  ``cossim_fast.backends.triton.tiles``, the backward and update rules) is compiled with
  ``triton.compile`` for the target, and Triton's own ptxas reports registers and spills;
  shared memory is Triton's (dynamic) allocation.

    python -m bench.resources [--arch 90] [--only cuda|triton] [--json out.json]

Triton's interpreter must be off (it replaces the kernels by Python functions): this module
refuses to run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Resources:
    """One compiled kernel (``variant`` says which launch configuration) on one architecture."""

    backend: str
    kernel: str
    variant: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    stack_bytes: int


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")
_ENTRY = re.compile(r"(?:Compiling entry function|Function properties for) '?([A-Za-z0-9_]+)'?")


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
    """Per mangled kernel name: registers, spills, stack and static shared memory from ``ptxas -v``."""
    found: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = found.setdefault(entry.group(1), {})
        if current is None:
            continue
        if match := _SPILLS.search(line):
            current.update(stack=int(match[1]), spill_stores=int(match[2]), spill_loads=int(match[3]))
        if match := _REGISTERS.search(line):
            current["registers"] = int(match[1])
            smem = _SMEM.search(line)
            current["shared"] = int(smem[1]) if smem else 0
    return found


def _demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {name: name for name in names}
    return dict(zip(names, out.splitlines()))


def _pip_cuda_include_dirs() -> list[str]:
    """``nvidia/*/include`` of the pip CUDA wheels, which torch's headers need (as in setup.py)."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted({path for root in nvidia.__path__ for path in glob.glob(os.path.join(root, "*", "include"))})


_TYPE_NAMES = {
    "c10::Half": "fp16", "c10::BFloat16": "bf16", "float": "fp32",
    "Mode0": "max", "Mode1": "all", "Path0": "wmma-16bit", "Path1": "wmma-tf32", "Path2": "fp32-fma",
}


def _kernel_and_variant(demangled: str) -> tuple[str, str]:
    """``void ns::(anonymous namespace)::k<(ns::Mode)0, c10::Half>(...)`` -> ``k``, ``Mode0, fp16``."""
    text = demangled.removeprefix("void ").replace("(anonymous namespace)::", "")
    text = re.sub(r"\((?:[\w:]+::)?(\w+)\)(-?\d+)", r"\1\2", text)  # enum template arguments
    head = text.split("(")[0]
    name, _, args = head.partition("<")
    args = [_TYPE_NAMES.get(arg.strip(), arg.strip()) for arg in args.removesuffix(">").split(",") if arg.strip()]
    return name.split("::")[-1], ", ".join(args)


def cuda_resources(arch: int) -> list[Resources]:
    """Compile ``csrc/cuda/*.cu`` for ``sm_<arch>`` with ``--resource-usage``."""
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if os.path.isfile(os.path.join(home, "bin", "nvcc")):
        os.environ["CUDA_HOME"] = home  # before torch guesses it (and warns) at import
    import torch.utils.cpp_extension as cpp_extension

    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        home = cpp_extension.CUDA_HOME or home
    nvcc = os.path.join(home, "bin", "nvcc")
    includes = [f"-I{path}" for path in cpp_extension.include_paths(device_type="cuda")]
    includes += [arg for path in _pip_cuda_include_dirs() for arg in ("-isystem", path)]
    results = []
    for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        with tempfile.TemporaryDirectory() as tmp:
            command = [
                nvcc, "-std=c++20", "-O3", f"-arch=sm_{arch}", "--resource-usage", "-DWITH_CUDA",
                *cpp_extension.COMMON_NVCC_FLAGS,
                "-DTORCH_EXTENSION_NAME=_C", *includes, "-c", source, "-o", os.path.join(tmp, "k.o"),
            ]
            done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source}:\n{done.stderr[-4000:]}")
        parsed = parse_ptxas(done.stdout + done.stderr)
        names = _demangle(sorted(parsed))
        for mangled, info in sorted(parsed.items()):
            if "registers" not in info:
                continue
            kernel, variant = _kernel_and_variant(names[mangled])
            results.append(Resources(
                "cuda", kernel, variant, arch, info["registers"], info.get("spill_stores", 0), info.get("spill_loads", 0),
                info["shared"], info.get("stack", 0),
            ))
    return results


@contextlib.contextmanager
def captured_launches(*kernels):
    """Record the arguments of every launch of ``kernels`` instead of running them."""
    calls: list[tuple] = []
    for kernel in kernels:
        kernel.run = lambda *args, grid, warmup, _kernel=kernel, **kwargs: calls.append((_kernel, args, kwargs))
    try:
        yield calls
    finally:
        for kernel in kernels:
            del kernel.run


def compile_launch(kernel, args: tuple, kwargs: dict, arch: int) -> dict[str, int]:
    """Compile one recorded launch for ``sm_<arch>`` as Triton's launcher would specialize it.

    Arguments are specialized as at a real launch (16-byte alignment, integers equal to 1 made
    constants); registers and spills come from Triton's ptxas, shared memory from Triton.
    """
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
    bound = dict(zip(kernel.arg_names, args)) | kwargs
    signature, constants, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = bound[name]
        if name in kwargs:
            kind, spec = "constexpr", None
        else:
            kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constants[name] = value
        elif spec == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", arch, 32), options=options
    )
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as handle:
            handle.write(compiled.asm["ptx"])
        done = subprocess.run(
            [get_ptxas(arch).path, "-v", f"-arch=sm_{arch}{suffix}", ptx, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    (info,) = parse_ptxas(done.stderr + done.stdout).values()
    return {
        "registers": info["registers"], "spill_stores": info.get("spill_stores", 0),
        "spill_loads": info.get("spill_loads", 0), "shared_bytes": compiled.metadata.shared,
        "stack_bytes": info.get("stack", 0),
    }


#: Representative ``C`` per regime of the tile spaces (resident up to 64/128/256, streamed beyond).
TRITON_DIMS = {("max", True): (128, 256, 2048), ("max", False): (64, 2048), ("all", True): (128, 2048), ("all", False): (64, 2048)}


def triton_launches() -> list[tuple[str, object, tuple, dict]]:
    """(variant, kernel, args, kwargs) of every launch configuration the Triton backend can pick.

    The backend itself is called on small CPU tensors of each regime's ``C`` with launches
    recorded instead of run, so what is compiled is exactly what the backend launches.
    """
    import torch

    from cossim_fast.backends.triton import backend, backward, max_similarity, ring_buffer, thresholded_sum, tiles

    kernels = (max_similarity._max_forward_kernel, max_similarity._merge_splits_kernel, thresholded_sum._thresholded_sum_kernel,
               backward._row_gradient_kernel, ring_buffer._ring_buffer_kernel)
    triton = backend.TritonBackend()
    launches = []

    def record(variant: str, call) -> None:
        with captured_launches(*kernels) as calls:
            call()
        launches.extend((variant, kernel, args, kwargs) for kernel, args, kwargs in calls)

    for (mode, sixteen_bit), dims in TRITON_DIMS.items():
        for dim in dims:
            features, labels, bank, counts = _inputs(dim, torch.bfloat16 if sixteen_bit else torch.float32)
            for precision in (None,) if sixteen_bit else backend.FP32_PRECISIONS:
                for config in tiles.space(mode, dim, sixteen_bit):
                    name = f"C={dim} {'bf16' if sixteen_bit else 'fp32 ' + precision}: {config}"
                    original = backend.forward_config, backend.fp32_precision()
                    backend.forward_config = lambda *args, config=config: config
                    backend.set_fp32_precision(precision or "ieee")
                    try:
                        if mode == "max":
                            record(name, lambda: triton.max_forward(features, labels, bank, counts, -1))
                        else:
                            record(name, lambda: triton.all_forward(features, labels, bank, counts, 0.5, -1))
                    finally:
                        backend.forward_config = original[0]
                        backend.set_fp32_precision(original[1])
    for dim in (256, 2048):
        for dtype in (torch.bfloat16, torch.float32):
            features, labels, bank, counts = _inputs(dim, dtype)
            rows = labels.numel()
            name = f"C={dim} {str(dtype).removeprefix('torch.')}"
            values, indices = torch.zeros(rows), torch.zeros(rows, dtype=torch.int64)
            record(f"max {name}", lambda: triton.max_backward(values, features, labels, bank, values, indices))
            record(f"all {name}", lambda: triton.all_backward(values, features, values, torch.zeros(rows, dim)))
            denom = torch.ones(rows)
            record(name, lambda: triton.update(bank, counts.clone(), counts.clone(), features, labels, None, denom, -1, -1))
    # The int64-offset variants (offsets.py) that huge inputs compile: default tiles, backward, update.
    with _wide_offsets():
        for dim, dtype in ((256, torch.bfloat16), (2048, torch.bfloat16), (2048, torch.float32)):
            features, labels, bank, counts = _inputs(dim, dtype)
            name = f"C={dim} {str(dtype).removeprefix('torch.')} int64 offsets"
            record(f"max {name}", lambda: triton.max_forward(features, labels, bank, counts, -1))
            record(f"all {name}", lambda: triton.all_forward(features, labels, bank, counts, 0.5, -1))
            rows = labels.numel()
            values, indices = torch.zeros(rows), torch.zeros(rows, dtype=torch.int64)
            record(f"max {name}", lambda: triton.max_backward(values, features, labels, bank, values, indices))
            record(f"all {name}", lambda: triton.all_backward(values, features, values, torch.zeros(rows, dim)))
            denom = torch.ones(rows)
            record(name, lambda: triton.update(bank, counts.clone(), counts.clone(), features, labels, None, denom, -1, -1))
    return launches


@contextlib.contextmanager
def _wide_offsets():
    """Every Triton launch inside takes its int64-offset variant, as for tensors past 2**31 elements."""
    from cossim_fast.backends.triton import backward, max_similarity, ring_buffer, thresholded_sum

    modules = (backward, max_similarity, ring_buffer, thresholded_sum)
    saved = [module.needs_int64 for module in modules]
    for module in modules:
        module.needs_int64 = lambda *args: True
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            module.needs_int64 = original


def _inputs(dim: int, dtype):
    import torch

    classes, slots, rows = 19, 256, 64
    features = torch.zeros(1, rows, dim, dtype=dtype)
    bank = torch.zeros(classes, slots, dim, dtype=dtype)
    return features, torch.arange(rows) % classes, bank, torch.full((classes,), slots)


_LAUNCHES: list = []  # read by the forked compile workers


def triton_resources(arch: int, jobs: int = 0) -> list[Resources]:
    """Compile every launch configuration of the Triton backend for ``sm_<arch>`` (in parallel)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    _LAUNCHES[:] = triton_launches()
    context = multiprocessing.get_context("fork")  # workers inherit the recorded launches
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count(), mp_context=context) as pool:
        compiled = list(pool.map(_compile_recorded, range(len(_LAUNCHES)), [arch] * len(_LAUNCHES)))
    return [
        Resources("triton", kernel.__name__, variant, arch, **info)
        for (variant, kernel, _, _), info in zip(_LAUNCHES, compiled)
    ]


def _compile_recorded(index: int, arch: int) -> dict[str, int]:
    _, kernel, args, kwargs = _LAUNCHES[index]
    return compile_launch(kernel, args, dict(kwargs), arch)


#: Shared memory one block may use, per architecture (CUDA programming guide, compute capabilities).
SHARED_LIMIT_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def problems(rows: list[Resources], allowed_spills: dict[str, int] | None = None) -> list[str]:
    """What would make a kernel slow or unlaunchable: register spills (beyond ``allowed_spills``,
    bytes per kernel name), too much shared memory."""
    found = []
    allowed_spills = allowed_spills or {}
    for row in rows:
        name = f"{row.backend} {row.kernel} [{row.variant}] sm_{row.arch}"
        if max(row.spill_stores, row.spill_loads) > allowed_spills.get(row.kernel, 0):
            found.append(f"{name}: spills {row.spill_stores}/{row.spill_loads} bytes")
        limit = SHARED_LIMIT_BYTES.get(row.arch)
        if limit is not None and row.shared_bytes > limit:
            found.append(f"{name}: {row.shared_bytes} bytes of shared memory, over the {limit} of sm_{row.arch}")
    return found


def markdown(rows: list[Resources]) -> str:
    lines = [
        "| backend | kernel | variant | sm | registers | spill st/ld (B) | shared (KiB) | stack (B) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.backend} | `{row.kernel}` | {row.variant} | {row.arch} | {row.registers} | "
            f"{row.spill_stores}/{row.spill_loads} | {row.shared_bytes / 1024:.1f} | {row.stack_bytes} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--only", choices=("cuda", "triton"), help="one backend's kernels only")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument(
        "--allow-spills", action="append", default=[], metavar="KERNEL:BYTES",
        help="accept up to BYTES of spills in KERNEL (repeatable); any other spill is a problem",
    )
    parser.add_argument("--jobs", type=int, default=0, help="parallel Triton compiles (default: all cores)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is on: the Triton kernels would not be compiled (unset it)")
    rows: list[Resources] = []
    if args.only in (None, "cuda"):
        rows += cuda_resources(args.arch)
    if args.only in (None, "triton"):
        rows += triton_resources(args.arch, args.jobs)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(row) for row in rows], handle, indent=1)
    allowed = {}
    for item in args.allow_spills:
        kernel, _, size = item.rpartition(":")
        if not kernel or not size.isdigit():
            parser.error(f"--allow-spills takes KERNEL:BYTES, got {item!r}")
        allowed[kernel] = int(size)
    found = problems(rows, allowed)
    for line in found:
        print(f"problem: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
