"""3DMM supervision, eqs. (3)-(5): L2 distances between 3DMM parameters of the swap and of source / target.

L_shape = ||s_swap - s_src||, L_pose = ||p_swap - p_tgt||, L_exp = ||e_swap - e_tgt||, each the per-sample Euclidean
norm averaged over the batch. Shape and expression are compared after standardising with the 3DMM's parameter
statistics (so one λ scale fits both and a different encoder family does not change the loss magnitude by orders);
pose is in radians. The encoder is frozen; gradients flow through it into x_swap only.

``jaw_pose`` (DECA only) adds FLAME's jaw rotation (axis-angle, radians) to L_pose: FLAME moves the mouth opening with
that joint, not with an expression coefficient, so without it nothing supervises whether the mouth is open.

``landmarks`` (B×68×2 pixel indices of x_swap): the swap keeps the target's pose, so the target's landmarks, resized
to the swap, say where its face is; an encoder that crops from landmarks (``takes_landmarks``: DECA) places its crop
with them, as its own project does, instead of with the canonical window.

``shape_coefficients`` keeps only the leading shape coefficients in L_shape: at low resolution only the first PCA
components are visible to the encoder (on the 64 px embedded default its predictions of the rest are noise).
"""

from __future__ import annotations

import torch
from torch import nn

from mfim.nets.threedmm import encode
from mfim.nets.types import ThreeDMMParams


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Euclidean distance between B×D parameter vectors, averaged over the batch (eqs. 3-5)."""
    return (a - b).pow(2).sum(dim=1).add(1e-12).sqrt().mean()


class ThreeDMMLoss(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        shape_std: torch.Tensor | None = None,
        exp_std: torch.Tensor | None = None,
        shape_coefficients: int | None = None,
        jaw_pose: bool = False,
    ):
        super().__init__()
        self.jaw_pose = bool(jaw_pose)
        self.encoder = encoder  # aligned B×3×H×W in [-1,1] -> ThreeDMMParams
        self.k = int(shape_coefficients) if shape_coefficients else None
        self.register_buffer("shape_std", shape_std if shape_std is not None else torch.ones(1))
        self.register_buffer("exp_std", exp_std if exp_std is not None else torch.ones(1))

    def forward(
        self, x_swap: torch.Tensor, src: ThreeDMMParams, tgt: ThreeDMMParams, terms=("shape", "pose", "exp"),
        landmarks=None,
    ) -> dict[str, torch.Tensor]:
        if not terms:
            return {}
        p = encode(self.encoder, x_swap, landmarks)
        out = {}
        if "shape" in terms:
            a, b = p.shape / self.shape_std, src.shape.detach() / self.shape_std
            out["shape"] = l2_distance(a[:, : self.k], b[:, : self.k])
        if "pose" in terms:
            a, b = p.pose, tgt.pose.detach()
            if self.jaw_pose:
                if getattr(p, "jaw", None) is None or getattr(tgt, "jaw", None) is None:
                    raise ValueError("jaw_pose: the 3DMM encoder returns no jaw pose (only DECA/FLAME has one)")
                a, b = torch.cat([a, p.jaw], dim=1), torch.cat([b, tgt.jaw.detach()], dim=1)
            out["pose"] = l2_distance(a, b)
        if "exp" in terms:
            out["exp"] = l2_distance(p.exp / self.exp_std, tgt.exp.detach() / self.exp_std)
        return out
