"""ROI-only synthesis (configuration E+ of the paper, §4.3): keep the generated face region, the target elsewhere.

The paper's supplementary material (not available) describes it without a segmentation model. Our choice: a soft
face mask from the target's 68 landmarks -- the convex hull of the jaw line and the eyebrows raised by
``forehead`` × (brow-to-chin height) to take in the forehead, dilated by ``dilate`` and feathered with a Gaussian of
``feather`` (both as fractions of the face height) -- then ``swap * m + target * (1 - m)`` in aligned space. Pasting
back into the unaligned photo uses the inverse alignment transform (mfim.nets.align.paste_back).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

JAW = slice(0, 17)
BROWS = slice(17, 27)


def face_mask_from_landmarks(
    landmarks: np.ndarray, size: int, forehead: float = 0.25, dilate: float = 0.04, feather: float = 0.06
) -> np.ndarray:
    """Soft mask (size×size float32 in [0, 1]) of the face region from 68 landmarks in the same pixel frame."""
    lm = np.asarray(landmarks, dtype=np.float64).reshape(68, 2)
    jaw, brows = lm[JAW], lm[BROWS].copy()
    height = max(np.linalg.norm(lm[8] - brows.mean(axis=0)), 1.0)
    up = lm[27] - lm[8]  # chin -> nose bridge: "up" in the face's own frame, so rotated faces work
    up = up / max(np.linalg.norm(up), 1e-6)
    brows += up * forehead * height
    hull = cv2.convexHull(np.concatenate([jaw, brows]).astype(np.float32))
    mask = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(mask, np.round(hull).astype(np.int32), 255)
    r = int(round(dilate * height))
    if r > 0:
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    m = mask.astype(np.float32) / 255.0
    sigma = feather * height
    if sigma > 0.3:
        m = cv2.GaussianBlur(m, (0, 0), sigmaX=sigma, sigmaY=sigma)
    return np.clip(m, 0.0, 1.0)


def roi_blend(x_swap: torch.Tensor, x_tgt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x_swap inside the mask, x_tgt outside. mask: B×1×H×W (or H×W) in [0,1], at x_swap's resolution."""
    if mask.dim() == 2:
        mask = mask[None, None]
    if x_tgt.shape[-2:] != x_swap.shape[-2:]:
        x_tgt = torch.nn.functional.interpolate(x_tgt, size=x_swap.shape[-2:], mode="bilinear", align_corners=False)
    if mask.shape[-2:] != x_swap.shape[-2:]:
        mask = torch.nn.functional.interpolate(mask, size=x_swap.shape[-2:], mode="bilinear", align_corners=False)
    mask = mask.to(x_swap.dtype)
    return x_swap * mask + x_tgt * (1.0 - mask)


def masks_for_batch(landmarks: np.ndarray, size: int, landmark_size: int | None = None, **kw) -> torch.Tensor:
    """B×1×size×size masks from B×68×2 landmarks given in a frame of ``landmark_size`` px (default: size)."""
    scale = size / float(landmark_size or size)
    return torch.from_numpy(
        np.stack([face_mask_from_landmarks(np.asarray(l) * scale, size, **kw) for l in landmarks])[:, None]
    )
