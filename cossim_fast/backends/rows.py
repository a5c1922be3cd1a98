"""Row access on the canonical ``(B, P, C)`` strided features view, in bounded chunks.

The backends never flatten a ``B x C x H x W`` map into a contiguous ``N x C`` copy: they read
the rows they need, a chunk at a time, so their extra memory is a fixed workspace.
"""

from __future__ import annotations

import os

from torch import Tensor

#: Extra memory the chunked PyTorch paths may use at once, in bytes.
WORKSPACE_BYTES = int(float(os.environ.get("COSSIM_FAST_WORKSPACE_MB", "64")) * 2**20)


def chunk_length(bytes_per_item: int, workspace: int = WORKSPACE_BYTES) -> int:
    """How many items of ``bytes_per_item`` fit in the workspace (at least one)."""
    return max(1, workspace // max(1, bytes_per_item))


def gather_rows(features: Tensor, rows: Tensor) -> Tensor:
    """Rows ``rows`` (flat indices ``b * P + p``) of a ``(B, P, C)`` view, as an ``(n, C)`` copy."""
    points = features.shape[1]
    return features[rows // points, rows % points]


def row_slice(features: Tensor, start: int, stop: int) -> Tensor:
    """Rows ``start .. stop-1`` (which must lie in one image) of a ``(B, P, C)`` view, no copy."""
    points = features.shape[1]
    batch = start // points
    return features[batch, start - batch * points : stop - batch * points]


def image_chunks(num_images: int, points: int, chunk: int):
    """``(start, stop)`` flat row ranges of at most ``chunk`` rows that never cross an image."""
    for batch in range(num_images):
        for start in range(0, points, chunk):
            yield batch * points + start, batch * points + min(points, start + chunk)
