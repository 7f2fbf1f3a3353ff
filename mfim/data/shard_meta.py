"""What a shard sample's metadata says about its image, read the same way by every consumer (pair batches, the
3DMM precompute)."""

from __future__ import annotations

import numpy as np


def shard_landmarks(meta: dict, size: int) -> np.ndarray | None:
    """A sample's 68 landmarks (float32, pixel indices) in its image as read at side ``size``; None when the shard
    has none or does not say at which side it holds them (``resolution``, written beside them by build_shards)."""
    points, written = meta.get("landmarks"), meta.get("resolution")
    if points is None or not written:
        return None
    lm = np.asarray(points, np.float64).reshape(68, 2)
    return ((lm + 0.5) * (size / written) - 0.5).astype(np.float32)  # pixel centres scale about the image edge


def stack_landmarks(rows: list[np.ndarray | None]) -> np.ndarray | None:
    """B×68×2 landmarks from per-image rows (NaN rows where an image has none), or None when none has any: an
    encoder that crops from landmarks (DECA) then places its box the way it does without them."""
    if all(r is None for r in rows):
        return None
    return np.stack([np.full((68, 2), np.nan, np.float32) if r is None else r for r in rows])
