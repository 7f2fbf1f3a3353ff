"""ROI-only synthesis (configuration E+ of the paper, §4.3): keep the generated face region, the target elsewhere.

The paper's supplementary material (not available) describes it without a segmentation model. Our choice: the soft
face mask of the alignment module (convex hull of the target's jaw line and raised brows, eroded and feathered:
mfim.nets.align.face_mask) computed from the *target's* 68 landmarks, then ``swap * m + target * (1 - m)`` in aligned
space. Pasting into the unaligned photo uses the inverse alignment transform (mfim.nets.align.paste_back).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mfim.nets.align import face_mask


def roi_masks(landmarks: np.ndarray, size: int, landmark_size: int | None = None, feather: float = 0.04):
    """B×1×size×size float masks from B×68×2 aligned landmarks given in a ``landmark_size`` px frame."""
    scale = size / float(landmark_size or size)
    lms = np.asarray(landmarks, dtype=np.float32).reshape(-1, 68, 2)
    # landmark pixel centres follow the "fraction × size − 0.5" convention, so rescale about -0.5
    masks = [face_mask(size, (lm + 0.5) * scale - 0.5, feather=feather) for lm in lms]
    return torch.from_numpy(np.stack(masks)[:, None])


def roi_blend(x_swap: torch.Tensor, x_tgt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x_swap inside the mask, x_tgt outside; everything is brought to x_swap's resolution."""
    if mask.dim() == 2:
        mask = mask[None, None]
    size = x_swap.shape[-2:]
    if x_tgt.shape[-2:] != size:
        x_tgt = F.interpolate(x_tgt, size=size, mode="bilinear", align_corners=False)
    if mask.shape[-2:] != size:
        mask = F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
    mask = mask.to(device=x_swap.device, dtype=x_swap.dtype)
    return x_swap * mask + x_tgt * (1.0 - mask)
