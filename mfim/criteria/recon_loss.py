"""Reconstruction loss, eq. (2): L1(x_swap, x_tgt) + LPIPS(x_swap, x_tgt), returned as two terms (λ_l1, λ_lpips).

When the generator's output is larger than the target (paper: 1024 vs 256) the swap is area-downsampled to the
target's size first, as pSp's face_pool does.

Not in the paper (both off by default, i.e. eq. (2) as written): ``ReconLoss``'s per-pair ``weight`` (what
``loss.recon_cross_identity`` < 1 uses) and :class:`BackgroundL1` (``loss.background_l1``), below the marker.
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
        """Batch means; ``weight`` (B, optional; not in the paper) weighs each pair's terms (a weighted mean over the
        batch)."""
        x = match_size(x_swap, x_tgt)
        per = {"l1": (x - x_tgt).abs().flatten(1).mean(1)}
        if self.lpips is not None:
            per["lpips"] = self.lpips(x, x_tgt).flatten()
        if weight is None:
            return {k: v.mean() for k, v in per.items()}
        w = weight.to(x.dtype)
        return {k: (v * w).sum() / w.sum().clamp_min(1e-8) for k, v in per.items()}


# --- not in the paper -----------------------------------------------------------------------------------------------


class BackgroundL1(nn.Module):
    """L1 outside the face: what a swap must keep of the target whatever the source (hair, background, neck).

    The face region is the alignment template's soft face mask (mfim.nets.align.face_mask on the canonical
    landmarks), dilated by ``margin`` of the image size so that the face outline, where the source's face shape
    may legitimately differ from the target's, is not penalised. Aligned crops put every face at the template, so
    one fixed mask serves the whole batch; no landmarks or segmentation network are needed per step.
    """

    def __init__(self, margin: float = 0.06):
        super().__init__()
        self.margin = float(margin)
        self._masks: dict[int, torch.Tensor] = {}  # image size -> background weight (1×1×size×size)

    def background(self, size: int, device, dtype) -> torch.Tensor:
        key = size
        if key not in self._masks:
            from mfim.nets.align import face_mask

            face = torch.from_numpy(face_mask(size))[None, None]
            k = 2 * max(1, round(self.margin * size)) + 1
            face = F.max_pool2d(face, k, stride=1, padding=k // 2)
            self._masks[key] = 1.0 - face
        return self._masks[key].to(device=device, dtype=dtype)

    def forward(self, x_swap: torch.Tensor, x_tgt: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Weighted batch mean (``weight``: B) of each pair's mean L1 over the background pixels."""
        x = match_size(x_swap, x_tgt)
        bg = self.background(x.shape[-1], x.device, x.dtype)
        per = ((x - x_tgt).abs() * bg).flatten(1).sum(1) / (bg.sum() * x.shape[1])
        w = weight.to(x.dtype)
        return (per * w).sum() / w.sum().clamp_min(1e-8)
