"""Reconstruction loss, eq. (2): L1(x_swap, x_tgt) + LPIPS(x_swap, x_tgt), returned as two terms (λ_l1, λ_lpips).

When the generator's output is larger than the target (paper: 1024 vs 256) the swap is area-downsampled to the
target's size first, as pSp's face_pool does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def match_size(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="area")


class ReconLoss(nn.Module):
    def __init__(self, lpips_net: nn.Module | None):
        super().__init__()
        self.lpips = lpips_net  # lpips.LPIPS, frozen, takes [-1, 1]

    def forward(self, x_swap: torch.Tensor, x_tgt: torch.Tensor,
                weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Batch means; ``weight`` (B, optional) weighs each pair's terms (a weighted mean over the batch)."""
        x = match_size(x_swap, x_tgt)
        per = {"l1": (x - x_tgt).abs().flatten(1).mean(1)}
        if self.lpips is not None:
            per["lpips"] = self.lpips(x, x_tgt).flatten()
        if weight is None:
            return {k: v.mean() for k, v in per.items()}
        w = weight.to(x.dtype)
        return {k: (v * w).sum() / w.sum().clamp_min(1e-8) for k, v in per.items()}
