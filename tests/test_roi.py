"""ROI-only synthesis: the mask covers the face and not the corners; blending keeps the target outside it."""

import numpy as np
import torch

from mfim.models.roi import roi_blend, roi_masks
from mfim.nets.align import canonical_landmarks


def test_mask_covers_face_not_background():
    lm = canonical_landmarks(64)
    m = roi_masks(lm[None], 64)[0, 0].numpy()
    nose = np.round(lm[30]).astype(int)
    assert m[nose[1], nose[0]] > 0.95
    assert m[0, 0] == 0 and m[-1, -1] == 0 and m[0, -1] == 0
    assert 0.15 < m.mean() < 0.6


def test_mask_scales_with_landmark_frame():
    lm = canonical_landmarks(256)
    small = roi_masks(lm[None], 64, landmark_size=256)[0, 0].numpy()
    direct = roi_masks(canonical_landmarks(64)[None], 64)[0, 0].numpy()
    assert np.abs(small - direct).mean() < 0.02


def test_blend_keeps_target_outside_and_swap_inside():
    lm = canonical_landmarks(32)
    mask = roi_masks(np.stack([lm, lm]), 32)
    swap, tgt = torch.ones(2, 3, 32, 32), -torch.ones(2, 3, 32, 32)
    out = roi_blend(swap, tgt, mask)
    outside = mask[:, :, :, :].expand_as(out) == 0
    inside = mask.expand_as(out) == 1
    assert torch.all(out[outside] == -1) and torch.all(out[inside] == 1)
