"""Build of the optional compiled extension ``cossim_fast._C`` (metadata lives in pyproject.toml).

Environment switches:

- ``COSSIM_FAST_SKIP_EXTENSION=1``: build no extension (pure-Python install; the ``torch`` and
  ``triton`` backends still work).
- ``COSSIM_FAST_CUDA=auto|1|0`` (default ``auto``): ``auto`` compiles the CUDA kernels whenever
  torch is a CUDA build and a CUDA toolkit (nvcc) is found -- no GPU is needed at build time;
  ``1`` requires them and fails clearly otherwise; ``0`` builds the CPU-only extension.
- ``TORCH_CUDA_ARCH_LIST`` (default here ``"8.0;9.0+PTX"``), ``MAX_JOBS`` (parallel compile
  jobs), ``CUDA_HOME``: as for every torch extension.

Build against the torch you will run with: ``pip install -e . --no-build-isolation`` (an
isolated build would compile against whatever torch pip fetches into the build environment).

Known toolchain problem: on the GPU machine, an extension built with its default
``/opt/gcc/bin/g++`` (a g++ 13.3 wrapper) segfaults as soon as a TORCH_CHECK fails (unwinding
while c10::Error takes its backtrace); built with ``CC=gcc-12 CXX=g++-12`` it works.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _log(message: str) -> None:
    print(f"cossim_fast setup: {message}", flush=True)


def _fail(message: str) -> None:
    sys.exit(f"cossim_fast setup: error: {message}")


def _cuda_mode() -> str:
    mode = os.environ.get("COSSIM_FAST_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "1", "0"):
        _fail(f"COSSIM_FAST_CUDA must be auto, 1 or 0, got {mode!r}")
    return mode


def _locate_cuda_home() -> None:
    """Point CUDA_HOME at a real toolkit before torch.utils.cpp_extension guesses it.

    torch guesses ``dirname(dirname(which nvcc))``, which is wrong when ``nvcc`` on PATH is a
    wrapper script (e.g. /usr/local/bin/nvcc); prefer a directory that has bin/nvcc and headers.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime_api.h")
        ):
            os.environ["CUDA_HOME"] = home
            return


def _nvidia_include_dirs(torch_module) -> list[str]:
    """``site-packages/nvidia/*/include`` dirs of the pip CUDA packages (cublas_v2.h, cusparse.h...).

    torch's CUDA headers include library headers that a bare toolkit may lack. They are added as
    system include dirs, searched after the toolkit's own ``include`` (so the toolkit's runtime
    headers win where both have them).
    """
    roots = [os.path.dirname(os.path.dirname(torch_module.__file__))]
    try:
        import nvidia  # namespace package of the pip CUDA wheels

        roots += [os.path.dirname(path) for path in getattr(nvidia, "__path__", [])]
    except ImportError:
        pass
    found: list[str] = []
    for root in roots:
        for path in [os.path.join(root, "nvidia", "cu13", "include")] + sorted(
            glob.glob(os.path.join(root, "nvidia", "*", "include"))
        ):
            path = os.path.realpath(path)
            if os.path.isdir(path) and path not in found:
                found.append(path)
    return found


def _token(text: str) -> str:
    """A string passed as a bare ``-D`` token (the C++ side stringifies it): ``8.0;9.0+PTX`` -> ``8.0_9.0+PTX``."""
    parts = [re.sub(r"[^A-Za-z0-9.+]", "", part) for part in re.split(r"[;,\s]+", text)]
    return "_".join(part for part in parts if part) or "unknown"


def _extensions() -> tuple[list, dict]:
    if os.environ.get("COSSIM_FAST_SKIP_EXTENSION", "0").strip() == "1":
        _log("COSSIM_FAST_SKIP_EXTENSION=1: building no extension (pure-Python install)")
        return [], {}
    mode = _cuda_mode()
    if mode != "0":
        _locate_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        _fail(
            f"building the extension needs torch importable at build time ({error}); install torch first and "
            "use `pip install --no-build-isolation`, or set COSSIM_FAST_SKIP_EXTENSION=1"
        )

    why_not_cuda = None
    if mode == "0":
        why_not_cuda = "COSSIM_FAST_CUDA=0"
    elif getattr(torch.version, "hip", None):
        why_not_cuda = f"torch {torch.__version__} is a ROCm build (the kernels are CUDA only)"
    elif torch.version.cuda is None:
        why_not_cuda = f"torch {torch.__version__} is a CPU-only build"
    elif cpp_extension.CUDA_HOME is None or not os.path.isfile(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    ):
        why_not_cuda = f"no CUDA toolkit found (CUDA_HOME={cpp_extension.CUDA_HOME}; set CUDA_HOME to a toolkit with bin/nvcc)"
    if mode == "1" and why_not_cuda:
        _fail(f"COSSIM_FAST_CUDA=1 but the CUDA kernels cannot be built: {why_not_cuda}")
    with_cuda = why_not_cuda is None

    torch_version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    defines = [f"-DCOSSIM_FAST_TORCH_VERSION={_token(torch_version)}"]
    cxx_flags = ["-O3", *defines]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    max_jobs = os.environ.get("MAX_JOBS")
    if max_jobs is not None and not max_jobs.strip().isdigit():
        _fail(f"MAX_JOBS must be a positive integer, got {max_jobs!r}")
    jobs = f"MAX_JOBS={max_jobs}" if max_jobs else "MAX_JOBS unset (torch picks the number of jobs)"
    # Py_LIMITED_API extensions (no libtorch_python, one .abi3.so per platform) need torch >= 2.6.
    limited_api = tuple(int(x) for x in re.findall(r"\d+", torch_version)[:2]) >= (2, 6)

    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
        if not arch_list:
            arch_list = DEFAULT_ARCH_LIST
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        arch_define = f"-DCOSSIM_FAST_CUDA_ARCHS={_token(arch_list)}"
        system_includes = []
        for path in _nvidia_include_dirs(torch):
            system_includes += ["-isystem", path]
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        _log(
            f"building CUDA + CPU extension: torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"CUDA_HOME={cpp_extension.CUDA_HOME}, TORCH_CUDA_ARCH_LIST={arch_list!r}, {jobs}"
        )
        extension = cpp_extension.CUDAExtension(
            "cossim_fast._C",
            sources + cuda_sources,
            extra_compile_args={
                "cxx": [*cxx_flags, "-DWITH_CUDA", arch_define, *system_includes],
                # No -use_fast_math: the dictionary update must divide exactly like PyTorch.
                "nvcc": ["-O3", "-DWITH_CUDA", *defines, arch_define, *system_includes],
            },
            py_limited_api=limited_api,
        )
    else:
        _log(f"building CPU-only extension ({why_not_cuda}): torch {torch.__version__}, {jobs}")
        extension = cpp_extension.CppExtension(
            "cossim_fast._C", sources, extra_compile_args={"cxx": cxx_flags}, py_limited_api=limited_api
        )
    return [extension], {"build_ext": cpp_extension.BuildExtension}


os.chdir(ROOT)  # relative source paths, as setuptools wants them
_ext_modules, _cmdclass = _extensions()
setup(ext_modules=_ext_modules, cmdclass=_cmdclass)
