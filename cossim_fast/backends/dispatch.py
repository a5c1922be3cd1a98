"""Backend selection: explicit argument, then ``COSSIM_FAST_BACKEND``, then auto.

Each backend states why it cannot run an input (xformers' "not supported reasons"); when the
chooser falls back it warns once per distinct message with those reasons, and in strict mode it raises them instead.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from functools import cache

import torch

from cossim_fast.backends import auto_rule
from cossim_fast.backends.base import Backend

BACKEND_NAMES = ("reference", "torch", "triton", "cuda")
CHOICES = ("auto", *BACKEND_NAMES)

#: Preference order of "auto" per device type, before the measured rule (``auto_rule``) puts the
#: fastest backend first; "reference" is never chosen automatically.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch")}
DEFAULT_ORDER = ("torch",)

_MODULES = {
    "reference": ("cossim_fast.backends.reference", "ReferenceBackend"),
    "torch": ("cossim_fast.backends.torch_chunked", "TorchBackend"),
    "triton": ("cossim_fast.backends.triton", "TritonBackend"),
    "cuda": ("cossim_fast.backends.cuda", "CudaBackend"),
}

_strict = os.environ.get("COSSIM_FAST_STRICT", "0") == "1"
_warned: set[str] = set()  # the fallback messages already shown: each reason once, not each op once


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run the input and strict mode forbids falling back."""


def set_strict(enabled: bool) -> None:
    """Raise instead of falling back when a requested backend cannot run an input."""
    global _strict
    _strict = bool(enabled)


def is_strict() -> bool:
    return _strict


def check_backend_name(backend: str) -> None:
    """Raise a clear error for an unknown backend name (called before any work)."""
    if not isinstance(backend, str) or backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")


@cache
def load_backend(name: str) -> Backend | str:
    """The backend object, or why it could not be imported."""
    module_name, class_name = _MODULES[name]
    try:
        return getattr(importlib.import_module(module_name), class_name)()
    except Exception as error:  # noqa: BLE001 - any import failure makes the backend unavailable
        return f"{name} backend failed to import: {type(error).__name__}: {error}"


def unsupported_reasons(name: str, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    backend = load_backend(name)
    if isinstance(backend, str):
        return [backend]
    return backend.unsupported_reasons(op, device, dtype)


def requested_backend(backend: str) -> str:
    """Apply the environment override to an "auto" request."""
    if backend == "auto":
        backend = os.environ.get("COSSIM_FAST_BACKEND", "auto") or "auto"
        if backend not in CHOICES:
            raise ValueError(f"environment variable COSSIM_FAST_BACKEND must be one of {CHOICES}, got {backend!r}")
    return backend


def select(
    op: str, backend: str, device: torch.device, dtype: torch.dtype, *more_dtypes: torch.dtype,
    dim: int | None = None, rows: int | None = None,
) -> Backend:
    """The backend that runs ``op`` for tensors of this device and these dtypes (features
    first, then e.g. the bank's: a backend must take every one of them). ``dim`` (C) and
    ``rows`` (N) pick the measured rule's shape class on a GPU (``auto_rule``)."""
    dtypes = tuple(dict.fromkeys((dtype, *more_dtypes)))
    requested = requested_backend(backend)
    auto_order = AUTO_ORDER.get(device.type, DEFAULT_ORDER)
    faster = None
    if requested == "auto" and device.type == "cuda":
        faster = auto_rule.preferred(op, auto_rule.capability(device), dtype, dim, rows)
        if faster:  # the backend measured fastest on this GPU goes first
            auto_order = (faster, *(name for name in auto_order if name != faster))
    candidates = auto_order if requested == "auto" else (requested, *auto_order)
    reasons: dict[str, list[str]] = {}
    skipped_faster = False
    for name in dict.fromkeys(candidates):
        why = list(dict.fromkeys(reason for d in dtypes for reason in unsupported_reasons(name, op, device, d)))
        if not why and requested == "auto" and name != candidates[-1]:
            # The fused backend measured slower than one "auto" skips (e.g. Triton's exact
            # fp32 dots, slower than cuBLAS) is not the next best: go on to the fallback.
            slower = skipped_faster and name in auto_rule.FUSED
            if slower or any(load_backend(name).auto_skip_reasons(op, device, d) for d in dtypes):
                skipped_faster = skipped_faster or name == faster
                continue
        if not why:
            # An explicit request that cannot run, or "auto" left with no fused backend, is
            # a fallback worth telling; "auto" skipping to its second choice is not.
            if reasons and (requested != "auto" or name == "torch"):
                _fall_back(op, requested, name, reasons, device, dtypes)
            return load_backend(name)
        reasons[name] = why
    raise BackendUnavailableError(_describe(op, requested, reasons, device, dtypes))


def _describe(op: str, requested: str, reasons: dict[str, list[str]], device, dtypes) -> str:
    lines = [f"cossim_fast: no backend '{requested}' for {op} on {device.type} {'/'.join(map(str, dtypes))}:"]
    lines += [f"  {name}: {'; '.join(why)}" for name, why in reasons.items()]
    return "\n".join(lines)


def _fall_back(op, requested, chosen, reasons, device, dtypes) -> None:
    message = _describe(op, requested, reasons, device, dtypes) + f"\n  -> using '{chosen}'"
    if _strict and requested != "auto":
        raise BackendUnavailableError(message + " is refused: strict mode (COSSIM_FAST_STRICT=1) forbids fallback")
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=_caller_stacklevel())


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this package and torch: the warning then
    names the user's line, not the op machinery's (Python 3.12's ``skip_file_prefixes``, by hand)."""
    inside = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(1), 1  # level 1: the caller of warnings.warn
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run the forward on ``device`` (default: any device of this machine)."""
    if device is None:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(device)]
    return [
        name
        for name in BACKEND_NAMES
        if any(not unsupported_reasons(name, "max_forward", d, torch.float32) for d in devices)
    ]
