"""Augmentations that keep the 3DMM labels true.

Photometric changes (colour, gamma, noise, JPEG) leave shape, expression and pose as they were. A horizontal flip
does not: it mirrors the head, so yaw and roll change sign (the 3DDFA_V2 convention of ``mfim.nets.rotation``) and
the iBUG-68 landmarks swap sides (index permutation :data:`IBUG68_MIRROR`). The flip is therefore off unless asked
for, and when on it returns the flipped labels. Shape and expression coefficients are kept under a flip: the BFM
bases are close to left-right symmetric, so this is an approximation -- the reason the flip is off by default.

Randomness comes from a numpy Generator the caller seeds per sample, so a resumed reader reproduces it exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# albumentations asks PyPI for a newer version at import (a network call in every DataLoader worker, and a wait on
# machines without internet); the project pins its version, so the check tells users nothing
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import numpy as np
import torch

# iBUG-68 index of each point's mirror image (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67).
IBUG68_MIRROR = np.array(
    list(range(16, -1, -1))                          # jaw: 0 <-> 16 ...
    + list(range(26, 16, -1))                        # brows: 17 <-> 26 ...
    + [27, 28, 29, 30]                               # nose bridge (on the midline)
    + [35, 34, 33, 32, 31]                           # nostrils
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]  # eyes: 36 <-> 45, 37 <-> 44, ..., 40 <-> 47, 41 <-> 46
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips: 48 <-> 54, 55 <-> 59
    + [64, 63, 62, 61, 60, 67, 66, 65],              # inner lips: 60 <-> 64, 65 <-> 67
    dtype=np.int64,
)


def flip_pose(pose):
    """(..., 3) (yaw, pitch, roll) of a face -> those of its mirror image: yaw and roll negate, pitch stays."""
    sign = [-1.0, 1.0, -1.0]
    if isinstance(pose, torch.Tensor):
        return pose * pose.new_tensor(sign)
    return np.asarray(pose) * np.asarray(sign, dtype=np.asarray(pose).dtype)


def flip_landmarks(landmarks: np.ndarray, width: int) -> np.ndarray:
    """(68, 2) pixel landmarks of an image -> those of its horizontal mirror (x -> width-1-x, sides swapped)."""
    lms = np.asarray(landmarks, dtype=np.float32).reshape(68, 2)
    mirrored = lms.copy()
    mirrored[:, 0] = (width - 1) - lms[:, 0]  # pixel centres at integers, as albumentations' HorizontalFlip
    return mirrored[IBUG68_MIRROR]


@dataclass
class AugmentResult:
    image: np.ndarray  # H×W×3 uint8
    flipped: bool
    landmarks: np.ndarray | None = None
    pose: np.ndarray | None = None


def photometric_transform(strength: float = 1.0) -> A.Compose:
    """Colour jitter, gamma, sensor noise, JPEG: nothing that moves a pixel."""
    s = strength
    return A.Compose([
        A.ColorJitter(brightness=0.2 * s, contrast=0.2 * s, saturation=0.2 * s, hue=0.02 * s, p=0.8),
        A.RandomGamma(gamma_limit=(100 - 20 * s, 100 + 20 * s), p=0.3),
        A.GaussNoise(std_range=(0.005 * s, 0.03 * s), p=0.2),
        A.ImageCompression(quality_range=(int(95 - 35 * s), 95), p=0.2),
    ], seed=0)


class FaceAugment:
    """``aug(image, rng, landmarks=None, pose=None) -> AugmentResult``.

    ``flip_probability`` 0 (default) never flips; otherwise the image flips with that probability and the returned
    landmarks/pose are those of the flipped face. ``photometric`` toggles the photometric part.
    """

    def __init__(self, flip_probability: float = 0.0, photometric: bool = True, strength: float = 1.0):
        self.flip_probability = float(flip_probability)
        self.photometric = photometric_transform(strength) if photometric else None
        self._flip = A.Compose([A.HorizontalFlip(p=1.0)],
                               keypoint_params=A.KeypointParams(format="xy", remove_invisible=False))

    def __call__(self, image: np.ndarray, rng: np.random.Generator, landmarks: np.ndarray | None = None,
                 pose: np.ndarray | None = None) -> AugmentResult:
        flipped = self.flip_probability > 0 and rng.random() < self.flip_probability
        if flipped:
            kps = np.zeros((0, 2), np.float32) if landmarks is None else np.asarray(landmarks, np.float32)
            out = self._flip(image=image, keypoints=kps)
            image = out["image"]
            if landmarks is not None:
                landmarks = np.asarray(out["keypoints"], np.float32)[:, :2][IBUG68_MIRROR]
            if pose is not None:
                pose = flip_pose(pose)
        if self.photometric is not None:
            self.photometric.set_random_seed(int(rng.integers(2**31)))
            image = self.photometric(image=image)["image"]
        return AugmentResult(np.ascontiguousarray(image), bool(flipped), landmarks, pose)
