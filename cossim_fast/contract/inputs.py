"""Input validation and the canonical layout every backend receives (METHOD.md 2 and 5b).

Structural checks (types, shapes, devices) run in Python before any work and cost nothing.
Value checks (NaN/inf, label and count ranges) read the data, so they run inside the
registered ops (``torch.compile`` cannot branch on data) and can be switched off for speed.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from numbers import Real

import numpy as np
import torch
from torch import Tensor

FEATURE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MODES = ("max", "all")
REDUCTIONS = ("mean", "class_mean")

_check_values = os.environ.get("COSSIM_FAST_CHECK_VALUES", "1") != "0"


def set_value_checks(enabled: bool) -> None:
    """Turn the data-reading checks (NaN/inf, label and count ranges) on or off globally."""
    global _check_values
    _check_values = bool(enabled)


def value_checks_enabled(override: bool | None = None) -> bool:
    if override is not None and not isinstance(override, bool):
        raise TypeError(f"check_values must be True, False or None (the global setting), got {override!r}")
    return _check_values if override is None else override


@dataclass(frozen=True)
class Rows:
    """Features as a ``(B, P, C)`` view, labels as ``(N,)`` int64, and the per-row output shape."""

    features: Tensor
    labels: Tensor
    row_shape: tuple[int, ...]


def _require_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_integer_dtype(name: str, tensor: Tensor) -> None:
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must have an integer dtype (int64, int32, uint8, ...), got {tensor.dtype}")


def _require_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def rows_of(features: object, labels: object, dim: int, ignore_index: object) -> Rows:
    """Check features/labels against the dictionary's ``dim`` and give their canonical rows.

    ``N x C`` features become a ``(1, N, C)`` view and ``B x C x H x W`` maps the ``(B, H*W, C)``
    view ``flatten(2).transpose(1, 2)``, which is free for contiguous and channels-last maps.
    """
    features = _require_tensor("features", features)
    labels = _require_tensor("labels", labels)
    _require_int("ignore_index", ignore_index)
    if features.dtype not in FEATURE_DTYPES:
        raise TypeError(f"features must be float32, bfloat16 or float16 (float64 for testing), got {features.dtype}")
    _require_integer_dtype("labels", labels)
    if features.device != labels.device:
        raise ValueError(f"labels must be on the features' device {features.device}, got {labels.device}")
    _check_channels(features, dim)
    if features.dim() == 2:
        num_rows, channels = features.shape
        if labels.shape != (num_rows,):
            raise ValueError(f"labels must have shape ({num_rows},) for features of shape {tuple(features.shape)}, got {tuple(labels.shape)}")
        canonical, row_shape = features.unsqueeze(0), (num_rows,)
    elif features.dim() == 4:
        batch, channels, height, width = features.shape
        if labels.shape != (batch, height, width):
            hint = ""
            if labels.dim() == 3 and labels.shape[0] == batch and labels.shape[1] >= height and labels.shape[2] >= width:
                hint = (
                    "; labels at image resolution? Take them to the features' resolution by nearest neighbour: "
                    f"cossim_fast.training.target_losses.downsample_labels(labels, ({height}, {width}))"
                )
            elif labels.dim() == 4 and labels.shape[1] == 1:
                hint = "; labels with a channel dimension (B x 1 x H x W, as mmseg's gt_semantic_seg)? Pass labels.squeeze(1)"
            raise ValueError(
                f"labels must have shape ({batch}, {height}, {width}) (B x H x W) for features of shape "
                f"{tuple(features.shape)} (B x C x H x W), got {tuple(labels.shape)}{hint}"
            )
        canonical, row_shape = features.flatten(2).transpose(1, 2), (batch, height, width)
    # Flat int64 labels, contiguous (a no-op when they already are): every kernel indexes them flat.
    return Rows(canonical, labels.reshape(-1).to(torch.int64).contiguous(), row_shape)


def _check_channels(features: Tensor, dim: int) -> None:
    """The layout and channel count, before the labels are held against the features' shape
    (a transposed layout would otherwise be reported as wrong labels)."""
    if features.dim() not in (2, 4):
        raise ValueError(f"features must be N x C or B x C x H x W, got {features.dim()} dims with shape {tuple(features.shape)}")
    channels = features.shape[1]
    if channels == dim:
        return
    hint = ""
    if features.dim() == 4 and features.shape[3] == dim:
        hint = "; they look channels-last (B x H x W x C): pass features.permute(0, 3, 1, 2)"
    elif features.dim() == 2 and features.shape[0] == dim:
        hint = "; they look C x N: pass features.T"
    raise ValueError(
        f"features have C = {channels} channels (dim 1 of shape {tuple(features.shape)}) but the dictionary stores C = {dim}{hint}"
    )


def bank_dim(bank: object) -> int:
    """The C of a ``K x M x C`` bank (checked before the features are, to compare with them)."""
    bank = _require_tensor("bank", bank)
    if bank.dim() != 3:
        raise ValueError(f"bank must be K x M x C (3 dims), got shape {tuple(bank.shape)}")
    return bank.shape[2]


def check_dictionary(bank: object, counts: object, device: torch.device) -> tuple[Tensor, Tensor]:
    """Check a ``K x M x C`` bank and its ``(K,)`` counts; return them contiguous, counts int64."""
    bank = _require_tensor("bank", bank)
    counts = _require_tensor("counts", counts)
    bank_dim(bank)
    if bank.dtype not in FEATURE_DTYPES:
        raise TypeError(f"bank must be float32, bfloat16 or float16 (float64 for testing), got {bank.dtype}")
    if bank.shape[0] == 0 or bank.shape[1] == 0:
        raise ValueError(f"bank needs K >= 1 classes and M >= 1 slots, got shape {tuple(bank.shape)}")
    _require_integer_dtype("counts", counts)
    if counts.shape != (bank.shape[0],):
        raise ValueError(f"counts must have shape (K,) = ({bank.shape[0]},), got {tuple(counts.shape)}")
    for name, tensor in (("bank", bank), ("counts", counts)):
        if tensor.device != device:
            raise ValueError(f"{name} must be on the features' device {device}, got {tensor.device}")
    return bank.contiguous(), counts.to(torch.int64).contiguous()


def check_ignore_index(ignore_index: int, num_classes: int) -> None:
    """``ignore_index`` must not name a class: rows labelled with it are skipped everywhere."""
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index must not be a class index in [0, {num_classes}), got {ignore_index}")


def check_threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, Real):
        raise TypeError(f"threshold must be a real number (a cosine similarity in [-1, 1]), got {type(threshold).__name__}")
    threshold = float(threshold)
    if threshold != threshold:
        raise ValueError("threshold must not be NaN")
    return threshold


def float32_threshold(threshold: float) -> float:
    """The largest float32 not above ``threshold``: for every float32 similarity ``s``,
    ``s > float32_threshold(tau)`` is exactly ``s > tau`` (METHOD.md 4's strict test), while
    comparing a float32 tensor with ``tau`` itself rounds ``tau`` to the nearest float32, which
    drops ``s = float32(0.1)`` at ``tau = 0.1``."""
    rounded = np.float32(threshold)
    if float(rounded) > threshold:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return float(rounded)


def warn_if_threshold_selects_nothing(threshold: float) -> None:
    """Above 1 no cosine exceeds the threshold: allowed (the tests use it), but in training surely
    a slip such as 90 for 0.9. Called by the public entry points, so the warning names the caller."""
    if threshold > 1.0:
        warnings.warn(
            f"threshold {threshold:g} is above 1: no cosine similarity exceeds it, so the loss is 0 and trains "
            "nothing (the threshold is a cosine, e.g. 0.9)",
            stacklevel=3,
        )


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_max_per_class(max_per_class: object) -> int:
    """``None`` (no cap) becomes -1; otherwise a positive int."""
    if max_per_class is None:
        return -1
    _require_int("max_per_class", max_per_class)
    if not 1 <= max_per_class < 2**63:  # the op takes an int64
        raise ValueError(f"max_per_class must be None or an int in [1, 2**63), got {max_per_class}")
    return max_per_class


def _first_bad(mask: Tensor) -> int:
    return int(mask.reshape(-1).nonzero()[0, 0])


_FLOAT32_SQRT_MAX = math.sqrt(torch.finfo(torch.float32).max)


def check_feature_values(features: Tensor) -> None:
    """Features must be finite (a NaN would poison the argmax and the dictionary).

    The largest and smallest values carry any NaN or inf and need no copy of the features (a
    float64 sum would cast all of them first, and could overflow on finite float64 values).
    """
    if not features.numel():
        return
    largest = float(torch.maximum(features.amax(), features.amin().neg()))  # NaN if any is; one sync
    if not math.isfinite(largest):
        flat = features.reshape(-1, features.shape[-1])
        row = _first_bad(~torch.isfinite(flat).all(dim=1))
        raise ValueError(f"features contain NaN or inf (first at row {row}); pass check_values=False to skip this check")
    # Every backend takes the row norm in fp32: past about 1.8e19 it is inf and the row's
    # similarity 0 * inf. Only when the largest entry could get there are the norms taken.
    if features.dtype != torch.float64 and largest * math.sqrt(features.shape[-1]) >= _FLOAT32_SQRT_MAX:
        norms = torch.linalg.vector_norm(features.reshape(-1, features.shape[-1]), dim=1, dtype=torch.float32)
        if not torch.isfinite(norms).all():
            row = _first_bad(~torch.isfinite(norms))
            raise ValueError(
                f"features row {row} has a norm that overflows float32 (entries up to {largest:.3g}): scale the "
                f"features down (the cosine similarity does not depend on their scale); pass check_values=False "
                f"to skip this check"
            )


#: How far above 1 a stored row's norm may be (16-bit rounding of a unit row stays well within).
_NORM_SLACK = 1e-2


def check_bank_norms(bank: Tensor, counts: Tensor) -> None:
    """The bank's rows must have unit norm: the cosine of a row with a stored slot is their dot
    product over the row's norm alone. The first slot of each non-empty class is checked, which
    catches a bank of raw features (the likely mistake) at the cost of K rows."""
    norms = torch.linalg.vector_norm(bank[:, 0, :].float(), dim=1)
    bad = (counts > 0) & (norms > 1 + _NORM_SLACK)
    if bad.any():
        index = _first_bad(bad)
        raise ValueError(
            f"bank rows must have unit norm (FeatureDictionary.update stores them so), got norm "
            f"{float(norms[index]):.4g} at class {index}, slot 0; pass check_values=False to skip this check"
        )


def check_order_values(order: Tensor, rows: int) -> None:
    """A visiting order holds row indices in ``[0, rows)`` (a kernel would skip the others, the
    torch path would wrap a negative one)."""
    bad = (order < 0) | (order >= rows)
    if bad.any():
        index = _first_bad(bad)
        raise ValueError(f"order must hold row indices in [0, {rows}), got {int(order.reshape(-1)[index])} at position {index}")


def check_label_values(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        index = _first_bad(bad)
        raise ValueError(
            f"labels must be in [0, {num_classes}) or ignore_index={ignore_index}, "
            f"got {int(labels.reshape(-1)[index])} at row {index}"
        )


def check_slot_values(name: str, values: Tensor, low: int, high: int) -> None:
    """``values`` (counts or ptr) must lie in ``[low, high]``."""
    bad = (values < low) | (values > high)
    if bad.any():
        index = _first_bad(bad)
        raise ValueError(f"{name} must be in [{low}, {high}], got {int(values[index])} for class {index}")
