"""Tile sizes of the class-tiled forward kernels: a small space per regime, and its autotuner.

A regime is (mode, 16-bit or fp32 dots, ``C`` padded to a power of two). Its space is a handful
of configurations, the first being the default; every one compiles for sm_90 without register
spills with triton 3.6 and 3.8 (``python -m bench.resources``, asserted in ``bench/test_resources.py``) and matches the
reference backend (``tests/triton/test_tiles.py``; the interpreter ignores warps and stages, so
only a GPU tells candidates that differ in those alone apart). Within a space ``BLOCK_C`` is
fixed, so the dots sum over ``C`` in the same chunks for every candidate; the MMA instruction
shape may still differ between candidates, and with it the last bits of the fp32 sums.

Autotuning is therefore off by default, so that a run is bitwise reproducible. With
``COSSIM_FAST_TRITON_AUTOTUNE=1`` (or ``set_autotune(True)``) the first CUDA call of each shape
class times every candidate with CUDA events on the call's own inputs (waiting for the device a
few times, on that call only) and keeps the fastest for the process; ``autotune_choices()``
reports them. A candidate this GPU or compiler cannot build or launch is skipped.
"""

from __future__ import annotations

import functools
import os
import statistics
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace

import torch
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

#: What a candidate may raise on a GPU or compiler it does not fit (as triton.autotune skips).
UNFIT = (OutOfResources, PTXASError, CompileTimeAssertionFailure)


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of the class-tiled forward kernels."""

    block_m: int
    block_n: int
    block_c: int
    c_resident: bool
    num_warps: int
    num_stages: int
    #: Programs per row tile, each over a share of the slots ("max" mode only; see max_similarity).
    slot_splits: int = 1
    #: One pipelined loop over (slot tile, C chunk) ("max" mode, streamed regime; see max_similarity).
    flatten: bool = False
    #: Pipeline depth of the dsum read-modify-write loop, its dsum reads included ("all" mode,
    #: streamed regime; see thresholded_sum); 0 leaves it to ``num_stages``, which skips those reads.
    dsum_stages: int = 0

    def __str__(self) -> str:
        regime = "resident" if self.c_resident else "streamed"
        splits = f" splits={self.slot_splits}" if self.slot_splits > 1 else ""
        flatten = " flatten" if self.flatten else ""
        dsum = f" dsum_stages={self.dsum_stages}" if self.dsum_stages else ""
        return (
            f"{self.block_m}x{self.block_n}x{self.block_c} {regime} "
            f"warps={self.num_warps} stages={self.num_stages}{splits}{flatten}{dsum}"
        )


def next_power_of_2(n: int) -> int:
    """The least power of two >= ``n`` (1 for ``n <= 1``): ``triton.next_power_of_2`` without its
    wrapper's microseconds, which count on the host path of every call."""
    return 1 << max(n - 1, 0).bit_length()


def padded_dim(dim: int) -> int:
    return max(16, next_power_of_2(dim))


def interpreter_config(dim: int) -> TileConfig:
    """Small tiles keep numpy fast and make small test shapes cross every tile edge."""
    padded = padded_dim(dim)
    return TileConfig(32, 32, min(padded, 64), padded <= 64, 4, 1)


@functools.cache  # built once per regime: asked on every forward call
def space(mode: str, dim: int, sixteen_bit: bool) -> tuple[TileConfig, ...]:
    """The candidates for ``mode`` ("max" or "all") at this ``C``; the first is the default.

    ``sixteen_bit``: the dots take native bf16/fp16 tiles; otherwise fp32 tiles at an explicit
    precision (fp32 operands hold twice the registers, so the tiles are smaller).
    """
    if mode == "max":
        # The default tiles over 2 and 4 slot shares (the same dots, so the same result bit for
        # bit): for small N, whose (class, row tile) grid alone leaves SMs idle, and for large C,
        # where the splits of a row tile share its rows in L2 (max_similarity; not yet timed in
        # this program order on a GPU).
        tiled = _max_tiles(padded_dim(dim), sixteen_bit)
        split = tuple(replace(tiled[0], slot_splits=splits) for splits in (2, 4))
        if tiled[0].c_resident:
            return tiled + split
        # Streamed: the default and its 4 splits with the slot and C loops flattened into one
        # pipelined loop (not yet timed on a GPU; the default stays as measured).
        return tiled + split + (replace(tiled[0], flatten=True), replace(split[1], flatten=True))
    if mode == "all":
        tiled = _all_tiles(padded_dim(dim), sixteen_bit)
        if tiled[0].c_resident or not sixteen_bit:  # fp32 tiles with it spill (triton 3.6, ieee)
            return tiled
        # Streamed: the default's tiles with the dsum read-modify-write loop pipelined, reads
        # included (2 stages: the default's 96 KiB of shared memory; not yet timed on a GPU).
        return tiled + (replace(tiled[0], dsum_stages=2),)
    raise ValueError(f"mode must be 'max' or 'all', got {mode!r}")


def _max_tiles(padded: int, sixteen_bit: bool) -> tuple[TileConfig, ...]:
    if sixteen_bit:
        if padded <= 128:
            return _resident(padded, ((128, 64, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2)))
        if padded <= 256:
            return _resident(padded, ((64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2)))
        # 4 stages timed 1.14x faster on an H200 at N = 131072 (bench/results/2026-11-27-h200/
        # autotune.json) but take 128 KiB of shared memory, more than sm_86/sm_89 GPUs have
        # (99 KiB): the default stays at 3 stages (96 KiB), autotuning finds 4 where they fit.
        return _streamed(64, ((128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 4)))
    if padded <= 64:
        return _resident(padded, ((32, 32, 4, 2), (64, 32, 8, 2)))
    return _streamed(32, ((64, 64, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3)))


def _all_tiles(padded: int, sixteen_bit: bool) -> tuple[TileConfig, ...]:
    if sixteen_bit:
        if padded <= 128:
            return _resident(padded, ((64, 64, 8, 2), (64, 32, 4, 2)))
        # Default: the autotuner's pick at every shape timed on an H200, 1.08x to 1.64x faster
        # than 64x128 with 2 stages (bench/results/2026-11-27-h200/autotune.json); 96 KiB of
        # shared memory, within what sm_86/sm_89 GPUs have. The 256-slot tiles halve the
        # read-modify-writes of dsum (N x C fp32, once per slot tile that selects anything),
        # about half of the streamed "all" forward's time at C = 2048 by its memory traffic;
        # not yet timed on a GPU.
        return _streamed(64, (
            (128, 128, 8, 3), (64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 256, 8, 3), (64, 256, 8, 2),
        ))
    if padded <= 64:
        return _resident(padded, ((32, 32, 4, 2),))
    return _streamed(32, ((64, 32, 4, 2), (32, 32, 4, 2)))  # larger tiles spill at tf32x3


def _resident(padded: int, shapes) -> tuple[TileConfig, ...]:
    return tuple(TileConfig(m, n, padded, True, warps, stages) for m, n, warps, stages in shapes)


def _streamed(block_c: int, shapes) -> tuple[TileConfig, ...]:
    return tuple(TileConfig(m, n, block_c, False, warps, stages) for m, n, warps, stages in shapes)


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "0").strip().lower()
    if value not in ("", "0", "1", "false", "true", "off", "on", "no", "yes"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value in ("1", "true", "on", "yes")


_autotune = _env_flag("COSSIM_FAST_TRITON_AUTOTUNE")
_choices: dict[Hashable, TileConfig] = {}


def set_autotune(enabled: bool) -> None:
    """Time the tile space on the first CUDA call of each shape class (default: off)."""
    global _autotune
    _autotune = bool(enabled)


def autotune_enabled() -> bool:
    return _autotune


def autotune_choices() -> dict[Hashable, TileConfig]:
    """The configuration chosen per shape class so far (a copy)."""
    return dict(_choices)


def clear_autotune_choices() -> None:
    _choices.clear()


def shape_class(mode: str, features: torch.Tensor, bank: torch.Tensor, precision: str | None) -> tuple:
    """Shape class of a call: the tuning key (sizes to the next power of two, so N may vary;
    whether channels are contiguous, as N x C rows, or strided, as B x C x H x W maps)."""
    num_classes, slots, dim = bank.shape
    rows = features.shape[0] * features.shape[1]
    return (
        mode, str(features.device), features.dtype, bank.dtype, precision, dim, num_classes,
        next_power_of_2(slots), next_power_of_2(rows), features.stride(2) == 1,
    )


def choose(
    key: Hashable,
    candidates: tuple[TileConfig, ...],
    run: Callable[[TileConfig], None],
    repeats: int = 3,
    timer: Callable[[Callable[[], None], int], float] | None = None,
) -> TileConfig:
    """The candidate to launch: the default, or with autotuning the fastest ``run`` measured.

    ``run(config)`` must be safe to repeat (the kernels overwrite their outputs). ``timer(fn,
    repeats)`` returns seconds for one call; the default uses CUDA events on the current stream.
    """
    if not _autotune or len(candidates) == 1:
        return candidates[0]
    if key in _choices:
        return _choices[key]
    if timer is None and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return candidates[0]  # no timing inside a CUDA graph capture; tune on a later eager call
    timer = timer or cuda_event_time
    timings = []
    for index, config in enumerate(candidates):
        try:
            timings.append((timer(lambda config=config: run(config), repeats), index))
        except UNFIT:  # e.g. more shared memory than this GPU has: not a candidate here
            if index == 0:
                raise
    best = candidates[min(timings)[1]]
    _choices[key] = best
    return best


def cuda_event_time(fn: Callable[[], None], repeats: int) -> float:
    """Median seconds of ``fn`` on the current CUDA stream, after one warm-up call."""
    fn()  # compile and warm up outside the timing
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1000.0)
    return statistics.median(samples)
