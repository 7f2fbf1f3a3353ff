"""Shared containers for what the auxiliary networks return."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# 3DDFA_V2 / BFM parameter layout used throughout (ground truth of the synthetic set, 3DDFA_V2, fitted regressor).
N_SHAPE = 40
N_EXP = 10
POSE_NAMES = ("yaw", "pitch", "roll")


@dataclass
class ThreeDMMParams:
    """3DMM parameters of a batch of faces.

    shape: B×S identity (shape) coefficients; exp: B×E expression coefficients; pose: B×3 (yaw, pitch, roll) in
    radians, in the 3DDFA_V2 convention (angles of the rotation in its scaled-orthographic pose matrix). A mirrored
    face negates yaw and roll. Coefficient units are the encoder's own (BFM alpha for 3DDFA_V2 / synthetic ground
    truth / fitted regressor; FLAME for DECA) -- compare only parameters from the same encoder family.
    """

    shape: torch.Tensor
    exp: torch.Tensor
    pose: torch.Tensor

    def to(self, device) -> "ThreeDMMParams":
        return ThreeDMMParams(self.shape.to(device), self.exp.to(device), self.pose.to(device))

    def detach(self) -> "ThreeDMMParams":
        return ThreeDMMParams(self.shape.detach(), self.exp.detach(), self.pose.detach())

    def __len__(self) -> int:
        return self.shape.shape[0]
