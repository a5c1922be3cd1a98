"""Soft import of the compiled extension ``cossim_fast._C`` (never raises).

Importing ``cossim_fast._C`` loads the shared object, whose static registrations define the ops
``torch.ops.cossim_fast.ring_buffer_update``, ``torch.ops.cossim_fast.extension_info`` and the
cosine-similarity ops ``cuda_max_forward``, ``cuda_all_forward``, ``cuda_max_backward`` and
``cuda_all_backward``.
When that is impossible (the package was installed with ``COSSIM_FAST_SKIP_EXTENSION=1``, the
import failed, or the extension was built for another CUDA or torch version) ``load_error``
says why, ``is_loaded()`` is False and the pure-PyTorch backends serve every call.

This module also holds the fake (meta) kernels of the C++ ops: the C++ library names it with
``m.set_python_module("cossim_fast._extension")``, so torch.compile and FakeTensorMode find them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re

import torch

#: Prefix of ``load_error`` when no compiled extension was installed at all.
NOT_BUILT = "not built"

#: Why the extension is unavailable, or None when it is loaded and usable.
load_error: str | None = None
#: Why the fake kernels could not be registered (torch.compile / FakeTensorMode then fail), or None.
fake_error: str | None = None

_info: str = ""
_imported = False


def _fields(info: str) -> dict[str, str]:
    """``"cuda=13000;archs=8.0,9.0+PTX;torch=2.14"`` -> ``{"cuda": "13000", ...}``."""
    fields = {}
    for item in info.split(";"):
        key, sep, value = item.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _cuda_text(code: str) -> str:
    """CUDART_VERSION as ``major.minor`` (``13000`` -> ``13.0``, ``12080`` -> ``12.8``)."""
    try:
        value = int(code)
    except ValueError:
        return code
    return f"{value // 1000}.{value % 1000 // 10}"


def _major_minor(version: str | None) -> str | None:
    if not version:
        return None
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2])


def _load() -> str | None:
    global _info, _imported
    try:
        spec = importlib.util.find_spec("cossim_fast._C")
    except Exception as error:  # noqa: BLE001 - never raise from import
        return f"{NOT_BUILT}: looking for cossim_fast._C failed: {type(error).__name__}: {error}"
    if spec is None:
        return (
            f"{NOT_BUILT}: no compiled cossim_fast._C is installed (installed with "
            "COSSIM_FAST_SKIP_EXTENSION=1, or never built: `pip install -e . --no-build-isolation`)"
        )
    try:
        importlib.import_module("cossim_fast._C")
    except Exception as error:  # noqa: BLE001
        return f"import of cossim_fast._C failed: {type(error).__name__}: {error}"
    _imported = True
    try:
        _info = str(torch.ops.cossim_fast.extension_info())
    except Exception as error:  # noqa: BLE001
        return f"cossim_fast._C imported but extension_info() failed: {type(error).__name__}: {error}"

    fields = _fields(_info)
    built_cuda = fields.get("cuda", "none")
    if built_cuda != "none":
        built = _cuda_text(built_cuda)
        if torch.version.cuda is None:
            return f"cossim_fast._C was built for CUDA {built} but torch {torch.__version__} has no CUDA"
        if _major_minor(built) != _major_minor(torch.version.cuda):
            return (
                f"cossim_fast._C was built for CUDA {built} but torch {torch.__version__} uses CUDA "
                f"{torch.version.cuda}; rebuild it: pip install -e . --no-build-isolation"
            )
    built_torch = fields.get("torch")
    if built_torch not in (None, "unknown") and built_torch != _major_minor(torch.__version__):
        return (
            f"cossim_fast._C was built for torch {built_torch} but torch {torch.__version__} is running; "
            "rebuild it: pip install -e . --no-build-isolation"
        )
    return None


def _register_fakes() -> str | None:
    """Fake (meta) kernels of the C++ ops: shapes only, for torch.compile and FakeTensorMode."""
    try:

        @torch.library.register_fake("cossim_fast::ring_buffer_update")
        def _ring_buffer_update_fake(
            bank, counts, ptr, features, labels, order, denom, max_per_class, ignore_index
        ) -> None:
            return None

        # The cosine-similarity ops (csrc/cosine_similarity.h): outputs are fp32 whatever the
        # input dtype; the gradients have the features' dtype and are (N, C) contiguous. An
        # extension built before these ops existed lacks them (has_cosine_ops() says so).
        if not has_cosine_ops():
            return None

        @torch.library.register_fake("cossim_fast::cuda_max_forward")
        def _cuda_max_forward_fake(features, labels, bank, counts, rows, bounds, tile_rows, fp32_precision):
            num_rows = labels.shape[0]
            return features.new_empty(num_rows, dtype=torch.float32), labels.new_empty(num_rows)

        @torch.library.register_fake("cossim_fast::cuda_all_forward")
        def _cuda_all_forward_fake(features, labels, bank, counts, rows, bounds, tile_rows, threshold, fp32_precision):
            num_rows = labels.shape[0]
            return (
                labels.new_empty(num_rows),
                features.new_empty(num_rows, dtype=torch.float32),
                features.new_empty(num_rows, features.shape[2], dtype=torch.float32),
            )

        @torch.library.register_fake("cossim_fast::cuda_max_backward")
        def _cuda_max_backward_fake(grad_values, features, labels, bank, values, indices):
            return features.new_empty(labels.shape[0], features.shape[2])

        @torch.library.register_fake("cossim_fast::cuda_all_backward")
        def _cuda_all_backward_fake(grad_ssum, features, ssum, dsum):
            return features.new_empty(dsum.shape[0], features.shape[2])

    except Exception as error:  # noqa: BLE001 - e.g. registered twice after a module reload
        return f"{type(error).__name__}: {error}"
    return None


#: The cosine-similarity ops of the extension (csrc/cosine_similarity.h).
COSINE_OPS = ("cuda_max_forward", "cuda_all_forward", "cuda_max_backward", "cuda_all_backward")


def has_cosine_ops() -> bool:
    """Whether the imported extension registers the cosine-similarity ops as this package calls
    them (False for an older build: before the ops, or before the forwards took class bounds)."""
    return (
        _imported
        and all(hasattr(torch.ops.cossim_fast, name) for name in COSINE_OPS)
        and "bounds" in str(torch.ops.cossim_fast.cuda_max_forward.default._schema)
    )


load_error = _load()
if _imported:
    fake_error = _register_fakes()


def is_loaded() -> bool:
    """Whether ``cossim_fast._C`` is loaded and matches the running torch and CUDA."""
    return load_error is None


def has_cuda_kernels() -> bool:
    """Whether the loaded extension was compiled with its CUDA kernels (not a CPU-only build)."""
    return is_loaded() and _fields(_info).get("cuda", "none") != "none"


def describe() -> str:
    """:func:`info` in words: ``loaded: CUDA 13.0 kernels for sm_80, sm_90 (+PTX); built for
    torch 2.14``, ``loaded: CPU-only build (...)``, or ``not loaded: <why>``."""
    if not is_loaded():
        return f"not loaded: {load_error}"
    fields = _fields(_info)
    built = f"built for torch {fields.get('torch', '?')}"
    if fields.get("cuda", "none") == "none":
        return f"loaded: CPU-only build, no CUDA kernels (torch was not a CUDA build when it was compiled); {built}"
    version = int(fields["cuda"])
    return f"loaded: CUDA {version // 1000}.{version % 1000 // 10} kernels for {architectures()}; {built}"


def architectures() -> str:
    """The GPU architectures the CUDA kernels were built for, e.g. ``sm_80, sm_90 (+PTX)``."""
    archs = [arch for arch in _fields(_info).get("archs", "").split(",") if arch]
    return ", ".join("sm_" + arch.replace(".", "").replace("+PTX", " (+PTX)") for arch in archs) or "the default architectures"


def runs_on(capability: tuple[int, int]) -> bool | None:
    """Whether the CUDA kernels have code for a GPU of this compute capability: a cubin of the
    same major version at or below its minor (only that exact one for an ``a`` arch-specific
    cubin), or PTX at or below it, which the driver compiles. None when the build does not list
    its architectures in a form read here (then no one is refused)."""
    return _runs_on(_info, tuple(capability))


@functools.cache  # asked by the dispatcher on every CUDA call
def _runs_on(info: str, capability: tuple[int, int]) -> bool | None:
    archs = [arch for arch in _fields(info).get("archs", "").split(",") if arch]
    if not archs:
        return None
    for arch in archs:
        match = re.fullmatch(r"(\d+)\.(\d+)(a?)(\+PTX)?", arch)
        if match is None:
            return None
        built = (int(match[1]), int(match[2]))
        if match[3] == "a":  # arch-specific: that architecture only
            if built == capability:
                return True
        elif built[0] == capability[0] and built[1] <= capability[1] or match[4] and built <= capability:
            return True
    return False


def info() -> str:
    """The extension's build description (``cuda=13000;archs=8.0,9.0+PTX;torch=2.14`` or
    ``cuda=none;torch=2.14``), or ``not loaded: <why>``."""
    if _info:
        return _info
    return f"not loaded: {load_error}"
