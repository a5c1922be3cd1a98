"""Checkpoints that resume exactly and are never half-written.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
over the old one (an atomic replace on POSIX), so a run killed at any moment leaves the last
complete checkpoint. It holds everything the next iteration depends on, RNG states included,
and is read back with ``torch.load(weights_only=True)``: no arbitrary code runs on load.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cossim_fast.training.config import ConfigError


def rng_state() -> dict[str, Any]:
    """Every random number generator the training loop draws from, in a weights-only form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s generators (its tensors may have been loaded onto a GPU)."""
    torch.set_rng_state(state["torch"].cpu())
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].cpu().numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU the saving process saw: a machine that sees fewer takes the first ones.
        for index, cuda in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda.cpu(), index)


def save_atomic(payload: dict[str, Any], path: str | Path) -> None:
    """Write ``payload`` to ``path`` so that ``path`` is always either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp makes it private; a checkpoint is not
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (setting it to read
    it would briefly open up files other threads create)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint of ``cossim-fast train``."""


#: What every checkpoint holds (``Trainer.save_checkpoint``), and what readers index first.
REQUIRED_KEYS = ("model", "config", "iteration")


def check_model_name(state: dict[str, Any], expected: str, path: str | Path, key: str) -> None:
    """ConfigError naming ``key`` when the checkpoint ``state`` (from ``path``) holds another model."""
    saved = json.loads(state["config"]).get("model", {}).get("name")
    if saved != expected:
        raise ConfigError(f"{key}: {path} holds a {saved}, not a {expected} (model.name)")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's state; :class:`CheckpointError` for a file that is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    what = "a checkpoint of cossim-fast train (OUTPUT_DIR/checkpoints/last.pt or best.pt)"
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for a file it cannot read
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path} cannot be read as {what}: {type(error).__name__}: {reason}") from error
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not {what}: it has no {', '.join(missing)}")
    return state
