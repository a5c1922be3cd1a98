"""Backends of the operator contract and the chooser between them."""

from cossim_fast.backends.dispatch import (
    BACKEND_NAMES,
    BackendUnavailableError,
    available_backends,
    set_strict,
)

__all__ = ["BACKEND_NAMES", "BackendUnavailableError", "available_backends", "set_strict"]
