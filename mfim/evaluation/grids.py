"""Sample grids: one row per example, one column per image kind (e.g. source | target | swap | mix)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """B×3×H×W in [-1, 1] -> B×H×W×3 uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """B×H×W×3 (or H×W×3) uint8 -> B×3×H×W float in [-1, 1]."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def image_grid(columns: list[torch.Tensor], size: int | None = None, pad: int = 2) -> np.ndarray:
    """columns: equal-length batches B×3×H×W in [-1, 1] (sizes may differ: all are resized to ``size``)."""
    size = size or max(c.shape[-1] for c in columns)
    cols = [c if c.shape[-1] == size else F.interpolate(c.float(), size=(size, size), mode="bilinear",
                                                       align_corners=False, antialias=True) for c in columns]
    b = cols[0].shape[0]
    h = b * size + (b + 1) * pad
    w = len(cols) * size + (len(cols) + 1) * pad
    out = np.full((h, w, 3), 255, np.uint8)
    for j, c in enumerate(cols):
        imgs = to_uint8(c)
        for i in range(b):
            y, x = pad + i * (size + pad), pad + j * (size + pad)
            out[y : y + size, x : x + size] = imgs[i]
    return out


def save_grid(path: str | Path, columns: list[torch.Tensor], record: dict | None = None, size: int | None = None):
    from mfim.provenance import provenance_record, save_image

    return save_image(path, image_grid(columns, size=size), record or provenance_record("synthetic"))
