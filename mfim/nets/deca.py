"""DECA's coarse encoder (``E_flame``: ResNet-50 -> 236-d FLAME code) for the official ``deca_model.tar``, by path.

Checkpoint layout (DECA ``decalib/deca.py``): a dict whose ``E_flame`` entry is the state dict of
``encoder.*`` (a torchvision-style ResNet-50 without its classifier: conv1, bn1, layer1-4 of Bottlenecks with the
stride on the 3x3 conv) and ``layers.0`` / ``layers.2`` (Linear 2048->1024, ReLU, Linear 1024->236). The code splits
in DECA's order: shape 100, texture 50, expression 50, pose 6 (global rotation 3 + jaw 3, axis-angle), camera 3,
light 27.

Input as DECA's test-time crop (``decalib/datasets/datasets.py``, ``TestData``; its FAN detector,
``detectors.FAN.run``, also returns the min/max box of FAN's 68 landmarks, type ``kpt68``): ``bbox2point`` takes the
landmarks' left/right/top/bottom, the box centre, and a size of 1.1 x the mean of its width and height; the crop is a
square of side ``int(size x 1.25)`` (``scale``) about that centre, whose corners go to the pixel indices 0 and 223 of
the 224x224 crop (``mfim.nets.face_crops.corners_transform``); RGB in [0, 1]. Given landmarks (the face's own, or
the target's for a swap, which keeps the target's pose) the box follows the face as DECA's does; without, it is the
box of the canonical FFHQ landmarks, which does not follow a turned head (docs/paper-scale/crops.md measures how far
that moves it). Pose: the global axis-angle rotation turned into a matrix and read off with the project's
``matrix_to_angles`` (yaw, pitch, roll radians); FLAME, like the BFM, is y-up with the camera on +z, so the same
angle convention applies (not verified against real DECA weights here -- none are available offline).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from torch import nn

from mfim.assets import resolve
from mfim.nets.face_crops import (
    canonical_landmark_box,
    corners_transform,
    image_to_tensor,
    landmark_box,
    square_box,
    to_continuous,
    warp,
)
from mfim.nets.onnx_utils import FrozenModule, load_state_dict_file, load_strict
from mfim.nets.rotation import matrix_to_angles
from mfim.nets.types import ThreeDMMParams

FLAME_N_SHAPE, FLAME_N_TEX, FLAME_N_EXP, FLAME_N_POSE, FLAME_N_CAM, FLAME_N_LIGHT = 100, 50, 50, 6, 3, 27
DECA_CODE_SIZE = FLAME_N_SHAPE + FLAME_N_TEX + FLAME_N_EXP + FLAME_N_POSE + FLAME_N_CAM + FLAME_N_LIGHT  # 236
DECA_INPUT_SIZE = 224
DECA_CROP_SCALE = 1.25


@dataclass
class FLAMEParams(ThreeDMMParams):
    """ThreeDMMParams (shape 100, exp 50, pose 3 = global yaw/pitch/roll) plus DECA's other code parts."""

    jaw: torch.Tensor | None = None  # B×3 jaw axis-angle
    code: torch.Tensor | None = None  # B×236 full code (tex, cam, light included)

    def to(self, device) -> "FLAMEParams":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return FLAMEParams(move(self.shape), move(self.exp), move(self.pose), move(self.jaw), move(self.code))

    def detach(self) -> "FLAMEParams":
        cut = lambda t: None if t is None else t.detach()  # noqa: E731
        return FLAMEParams(cut(self.shape), cut(self.exp), cut(self.pose), cut(self.jaw), cut(self.code))


def axis_angle_to_matrix(aa: torch.Tensor) -> torch.Tensor:
    """(..., 3) axis-angle -> (..., 3, 3) rotation (Rodrigues), differentiable, stable near zero."""
    angle = aa.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    k = aa / angle
    kx, ky, kz = k.unbind(-1)
    zero = torch.zeros_like(kx)
    kmat = torch.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], -1).unflatten(-1, (3, 3))
    s, c = torch.sin(angle)[..., None], torch.cos(angle)[..., None]
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(kmat)
    return eye + s * kmat + (1 - c) * (kmat @ kmat)


class FlameEncoder(nn.Module):
    """DECA's ``ResnetEncoder(outsize=236)``: module names as in ``E_flame``'s state dict."""

    def __init__(self, outsize: int = DECA_CODE_SIZE):
        super().__init__()
        self.encoder = _ResNet50Features()
        self.layers = nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, outsize))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.encoder(x))


class _ResNet50Features(nn.Module):
    """conv1/bn1/layer1-4 of a ResNet-50 and a global average pool (DECA's AvgPool2d(7) on a 224 input).

    Built from torchvision's ResNet-50 layout without weights (nothing downloads); DECA's own ResNet has the same
    module names and Bottleneck structure.
    """

    def __init__(self):
        super().__init__()
        tv = torchvision.models.resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = tv.conv1, tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


def fill_num_batches_tracked(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints from PyTorch < 0.4.1 have no BatchNorm ``num_batches_tracked``; it does not affect eval."""
    state = dict(state)
    for key, value in module.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    return state


def deca_crop_box(landmark_bbox) -> np.ndarray:
    """DECA's square crop around a 68-landmark bounding box (``bbox2point(type='kpt68')`` x 1.25)."""
    x0, y0, x1, y1 = [float(v) for v in landmark_bbox]
    old_size = (x1 - x0 + y1 - y0) / 2 * 1.1
    return square_box(((x0 + x1) / 2, (y0 + y1) / 2), int(old_size * DECA_CROP_SCALE))


def deca_crop_transforms(size: int, landmarks=None) -> np.ndarray:
    """2x3 (no landmarks) or B×2×3 maps from DECA's 224 px crop to pixels of images of side ``size``.

    landmarks: B×68×2 dlib-style points in those images' pixel indices (numpy or torch); a row with a non-finite
    value falls back to the canonical box.
    """
    canonical = corners_transform(deca_crop_box(canonical_landmark_box(size)), DECA_INPUT_SIZE)
    if landmarks is None:
        return canonical
    lms = np.asarray(landmarks.detach().cpu() if torch.is_tensor(landmarks) else landmarks, dtype=np.float64)
    lms = lms.reshape(len(lms), 68, 2)
    return np.stack([
        corners_transform(deca_crop_box(landmark_box(to_continuous(lm))), DECA_INPUT_SIZE)
        if np.isfinite(lm).all() else canonical
        for lm in lms
    ])


def deca_crop(aligned: torch.Tensor, landmarks=None) -> torch.Tensor:
    """B×3×H×W in [-1, 1] -> B×3×224×224 DECA crops in [-1, 1] (black outside the image), differentiable; the box
    from each row of ``landmarks`` (B×68×2 pixel indices of these images) or the canonical FFHQ landmarks."""
    m = deca_crop_transforms(aligned.shape[-1], landmarks)
    return warp(aligned, m, DECA_INPUT_SIZE, fill=-1.0)


class DECAEncoder(FrozenModule):
    """Frozen DECA coarse encoder: aligned faces -> FLAMEParams (shape 100, exp 50, pose = global yaw/pitch/roll)."""

    input_size = DECA_INPUT_SIZE
    takes_landmarks = True  # forward(images, landmarks): the 3DMM losses pass the faces' landmarks where known

    def __init__(self, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.E_flame = FlameEncoder()
        path = resolve("deca", checkpoint)
        state = load_state_dict_file(path, key="E_flame")
        load_strict(self.E_flame, fill_num_batches_tracked(self.E_flame, state), f"DECA E_flame {os.fspath(path)}")
        self.freeze().to(device)

    @staticmethod
    def aligned_crop_box(size: int) -> np.ndarray:
        return deca_crop_box(canonical_landmark_box(size))

    crop = staticmethod(deca_crop)

    def crop_photo(self, image: np.ndarray, landmarks68: np.ndarray) -> torch.Tensor:
        device = next(self.parameters()).device
        m = corners_transform(deca_crop_box(landmark_box(to_continuous(landmarks68))), self.input_size)
        return warp(image_to_tensor(image, device), m, self.input_size, fill=-1.0)

    def code(self, crops: torch.Tensor) -> torch.Tensor:
        """B×236 FLAME code of 224x224 RGB crops in [-1, 1] (DECA takes [0, 1])."""
        return self.E_flame((crops + 1.0) / 2.0)

    @staticmethod
    def decode(code: torch.Tensor) -> FLAMEParams:
        shape, _tex, exp, pose6, _cam, _light = torch.split(
            code, [FLAME_N_SHAPE, FLAME_N_TEX, FLAME_N_EXP, FLAME_N_POSE, FLAME_N_CAM, FLAME_N_LIGHT], dim=1
        )
        angles = matrix_to_angles(axis_angle_to_matrix(pose6[:, :3]))
        return FLAMEParams(shape, exp, angles, jaw=pose6[:, 3:], code=code)

    def encode_crops(self, crops: torch.Tensor) -> FLAMEParams:
        return self.decode(self.code(crops))

    def forward(self, aligned: torch.Tensor, landmarks=None) -> FLAMEParams:
        """FLAME parameters of B×3×H×W faces in [-1, 1]; ``landmarks`` (B×68×2 pixel indices) place DECA's box."""
        return self.encode_crops(self.crop(aligned, landmarks))

    @torch.no_grad()
    def from_photo(self, image: np.ndarray, landmarks68: np.ndarray) -> FLAMEParams:
        return self.encode_crops(self.crop_photo(image, landmarks68))


__all__ = [
    "DECAEncoder",
    "FlameEncoder",
    "FLAMEParams",
    "axis_angle_to_matrix",
    "deca_crop",
    "deca_crop_box",
    "deca_crop_transforms",
    "fill_num_batches_tracked",
]
