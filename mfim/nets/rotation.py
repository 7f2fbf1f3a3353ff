"""Euler angles <-> rotation matrices in the 3DDFA_V2 convention (shared by ground truth, 3DDFA_V2, metrics).

We read (yaw, pitch, roll) off a rotation R as yaw = -asin(R[2,0]), pitch = atan2(R[2,1], R[2,2]),
roll = atan2(R[1,0], R[0,0]); that is R = Rz(roll) @ Ry(yaw) @ Rx(pitch), with positive yaw turning the nose toward
the image's right. Pitch and roll are 3DDFA_V2's; cleardusk/3DDFA_V2's utils/pose.py prints yaw = +asin(R[2,0]), so
our yaw is the negative of the number its demo shows (some forks use the minus sign, as here). Angles are radians.
Works on tensors of any batch shape (..., 3) / (..., 3, 3) and is differentiable.
"""

from __future__ import annotations

import torch


def angles_to_matrix(angles: torch.Tensor) -> torch.Tensor:
    """(..., 3) (yaw, pitch, roll) -> (..., 3, 3) rotation R = Rz(roll) Ry(yaw) Rx(pitch)."""
    yaw, pitch, roll = angles.unbind(-1)
    cy, sy = torch.cos(yaw), torch.sin(yaw)
    cp, sp = torch.cos(pitch), torch.sin(pitch)
    cr, sr = torch.cos(roll), torch.sin(roll)
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)
    rx = torch.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], -1).unflatten(-1, (3, 3))
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).unflatten(-1, (3, 3))
    rz = torch.stack([cr, -sr, zero, sr, cr, zero, zero, zero, one], -1).unflatten(-1, (3, 3))
    return rz @ ry @ rx


def matrix_to_angles(r: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation -> (..., 3) (yaw, pitch, roll), the inverse of ``angles_to_matrix`` for |yaw| < 90°."""
    yaw = -torch.asin(r[..., 2, 0].clamp(-1.0, 1.0))
    pitch = torch.atan2(r[..., 2, 1], r[..., 2, 2])
    roll = torch.atan2(r[..., 1, 0], r[..., 0, 0])
    return torch.stack([yaw, pitch, roll], -1)


def normalize_pose_matrix(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3DDFA_V2's P2sRt: (..., 3, 4) scaled-orthographic camera -> (scale, R (..., 3, 3), t3d (..., 3)).

    The first two rows are the scaled rotation; they are normalised and the third row is their cross product.
    """
    t3d = p[..., :, 3]
    r1, r2 = p[..., 0, :3], p[..., 1, :3]
    s = (r1.norm(dim=-1) + r2.norm(dim=-1)) / 2.0
    r1 = r1 / r1.norm(dim=-1, keepdim=True)
    r2 = r2 / r2.norm(dim=-1, keepdim=True)
    r3 = torch.linalg.cross(r1, r2, dim=-1)
    return s, torch.stack([r1, r2, r3], -2), t3d
