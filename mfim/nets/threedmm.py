"""3DMM encoders returning ``ThreeDMMParams`` (shape, expression, pose): 3DDFA_V2 by default, DECA and a fitted
regressor by name, plus the normaliser the losses use.

3DDFA_V2 (``TDDFAEncoder``)
    The MobileNetV1 regressor ``mb1_120x120.onnx`` through onnx2torch (differentiable). As in 3DDFA_V2: a square roi
    around the face -- from the 68 landmarks, side = diagonal of their bounding square, or from a detector box, side
    1.58 x box size shifted down by 0.14; rounded to whole pixels as its ``crop_img`` crops it -- resized to 120x120,
    BGR, (x - 127.5) / 128. Its 62 outputs are de-normalised with ``param_mean_std_62d_120x120.pkl``: 12 = the 3x4
    scaled-orthographic pose matrix, then 40 shape and 10 expression coefficients of the BFM. For aligned input the
    roi comes from the canonical FFHQ landmarks (``mfim.nets.face_crops``). Pose = ``matrix_to_angles`` of the
    normalised rotation (project convention, ``mfim.nets.rotation``).
    Measured on synthetic BFM renders: pose to ~1-2 deg and the first expression coefficients, but NOT face shape
    (r ~ 0.1) -- hence the third option, a regressor the pipeline fits on precomputed parameters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mfim.assets import resolve
from mfim.config import lookup
from mfim.nets.deca import FLAME_N_EXP, FLAME_N_SHAPE, DECAEncoder
from mfim.nets.face_crops import (
    box_transform,
    image_to_tensor,
    landmark_box,
    warp,
)
from mfim.nets.mobilenet_v1 import (
    TDDFA_EXP,
    TDDFA_INPUT_SIZE,
    TDDFA_POSE,
    TDDFA_SHAPE,
    aligned_roi_box,
    load_tddfa_stats,
    roi_box_from_face_box,
    roi_box_from_landmark_box,
    tddfa_crop,
    tddfa_network_input,
)
from mfim.nets.onnx_utils import FrozenModule, freeze, onnx_to_torch
from mfim.nets.rotation import matrix_to_angles, normalize_pose_matrix
from mfim.nets.threedmm_regressor import load_fitted_regressor
from mfim.nets.types import ThreeDMMParams

def read_stats(path: str | os.PathLike) -> dict:
    """The ``threedmm`` stage's ``stats.json`` (written beside the 3DMM table by mfim.data.threedmm_table)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"3DMM coefficient statistics not found at {path} (written beside the table by the "
                                "`threedmm` stage: `dvc repro threedmm`)")
    return json.loads(path.read_text())


class ThreeDMMNormalizer(nn.Module):
    """Standardises shape and expression coefficients, so 3DMM losses weigh every coefficient alike.

    The 3DDFA_V2 BFM coefficients span five orders of magnitude (shape std ~6e5 for the first component, expression
    ~0.2-1.6); losses on raw values would see only the first few. Pose passes through unchanged (radians).
    """

    def __init__(self, shape_mean, shape_std, exp_mean, exp_std):
        super().__init__()
        values = {"shape_mean": shape_mean, "shape_std": shape_std, "exp_mean": exp_mean, "exp_std": exp_std}
        for name, value in values.items():
            self.register_buffer(name, torch.as_tensor(np.asarray(value), dtype=torch.float32).clone())

    @classmethod
    def from_tddfa_stats(cls, path: str | os.PathLike | None = None) -> "ThreeDMMNormalizer":
        """BFM (40 shape, 10 expression) statistics of 3DDFA_V2's training set: for 3DDFA, synthetic, fitted."""
        mean, std = load_tddfa_stats(path)
        return cls(mean[TDDFA_SHAPE], std[TDDFA_SHAPE], mean[TDDFA_EXP], std[TDDFA_EXP])

    @classmethod
    def identity(cls, n_shape: int, n_exp: int) -> "ThreeDMMNormalizer":
        """No-op normaliser: coefficients in the encoder's raw units. FLAME's basis is in PCA-std units, but what
        DECA predicts on a given data set is not standardised (issue 13: raw FLAME terms dominated eq. (6)), so the
        losses use :meth:`from_stats` instead."""
        return cls(np.zeros(n_shape), np.ones(n_shape), np.zeros(n_exp), np.ones(n_exp))

    @classmethod
    def from_stats(cls, stats: dict) -> "ThreeDMMNormalizer":
        """From the ``threedmm`` stage's ``stats.json`` (mean/std of the table's estimate over the training set)."""
        return cls(stats["shape_mean"], stats["shape_std"], stats["exp_mean"], stats["exp_std"])

    def normalize(self, p: ThreeDMMParams) -> ThreeDMMParams:
        shape = (p.shape - self.shape_mean) / self.shape_std
        return ThreeDMMParams(shape, (p.exp - self.exp_mean) / self.exp_std, p.pose)

    def denormalize(self, p: ThreeDMMParams) -> ThreeDMMParams:
        return ThreeDMMParams(p.shape * self.shape_std + self.shape_mean, p.exp * self.exp_std + self.exp_mean, p.pose)

    forward = normalize


class TDDFAEncoder(FrozenModule):
    """3DDFA_V2 (MobileNetV1, 120x120) as a frozen, differentiable torch module: aligned faces -> ThreeDMMParams."""

    input_size = TDDFA_INPUT_SIZE

    def __init__(
        self,
        device: str | torch.device = "cpu",
        onnx_path: str | os.PathLike | None = None,
        stats_path: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.net = onnx_to_torch(resolve("tddfa_mb1_onnx", onnx_path))
        mean, std = load_tddfa_stats(stats_path)
        self.register_buffer("param_mean", torch.from_numpy(mean))
        self.register_buffer("param_std", torch.from_numpy(std))
        self.normalizer = ThreeDMMNormalizer.from_tddfa_stats(stats_path)
        self.freeze().to(device)

    # --- crops ---
    @staticmethod
    def aligned_roi_box(size: int) -> np.ndarray:
        """The 3DDFA_V2 roi of an FFHQ-aligned face of side ``size`` (from the canonical 68 landmarks)."""
        return aligned_roi_box(size)

    crop = staticmethod(tddfa_crop)

    def crop_photo(self, image: np.ndarray, landmarks68: np.ndarray | None = None, box=None) -> torch.Tensor:
        """Roi of a face in an unaligned photo, from its dlib 68 landmarks (preferred) or a detector box."""
        if landmarks68 is not None:
            roi = roi_box_from_landmark_box(landmark_box(landmarks68))  # pixel indices, as 3DDFA_V2 reads
        elif box is not None:
            roi = roi_box_from_face_box(box)
        else:
            raise ValueError("give landmarks68 or box")
        device = self.param_mean.device
        return warp(image_to_tensor(image, device), box_transform(roi, self.input_size), self.input_size, fill=-1.0)

    # --- network ---
    network_input = staticmethod(tddfa_network_input)

    def params62(self, crops: torch.Tensor) -> torch.Tensor:
        """B×62 de-normalised 3DDFA_V2 parameters of 120x120 RGB crops in [-1, 1]."""
        return self.net(self.network_input(crops)) * self.param_std + self.param_mean

    @staticmethod
    def decode(params62: torch.Tensor) -> ThreeDMMParams:
        pose_matrix = params62[:, TDDFA_POSE].reshape(-1, 3, 4)
        _, rotation, _ = normalize_pose_matrix(pose_matrix)
        return ThreeDMMParams(params62[:, TDDFA_SHAPE], params62[:, TDDFA_EXP], matrix_to_angles(rotation))

    def encode_crops(self, crops: torch.Tensor) -> ThreeDMMParams:
        return self.decode(self.params62(crops))

    def forward(self, aligned: torch.Tensor) -> ThreeDMMParams:
        """FFHQ-aligned faces B×3×H×W in [-1, 1] RGB -> ThreeDMMParams (shape B×40, exp B×10, pose B×3 radians)."""
        return self.encode_crops(self.crop(aligned))

    @torch.no_grad()
    def from_photo(self, image: np.ndarray, landmarks68: np.ndarray | None = None, box=None) -> ThreeDMMParams:
        """ThreeDMMParams of one face in an unaligned photo (H×W×3 uint8 RGB) given 68 landmarks or a face box."""
        return self.encode_crops(self.crop_photo(image, landmarks68, box))


def encode(encoder: nn.Module, images: torch.Tensor, landmarks=None) -> ThreeDMMParams:
    """``encoder(images)``, given the faces' 68 landmarks (B×68×2 pixel indices of ``images``) too when it places
    its crop from them (``takes_landmarks``: DECA); the others crop the canonical window of an aligned face."""
    if landmarks is not None and getattr(encoder, "takes_landmarks", False):
        return encoder(images, landmarks)
    return encoder(images)


# --- factory ------------------------------------------------------------------------------------------------------

THREEDMM_ENCODERS = ("tddfa", "deca", "fitted")


def build_threedmm_encoder(
    name: str,
    params: dict | None = None,
    device: str | torch.device = "cpu",
    checkpoint: str | os.PathLike | None = None,
) -> nn.Module:
    """A frozen 3DMM encoder by name: module(aligned B×3×H×W in [-1, 1]) -> ThreeDMMParams.

    'tddfa'  3DDFA_V2 from the asset zoo (no checkpoint).
    'deca'   DECA ``deca_model.tar``: ``checkpoint``, else params ``nets.threedmm.deca_checkpoint``, else the asset
             cache; missing -> MissingAssetError naming the file and key.
    'fitted' the regressor fitted by the pipeline (``mfim.nets.threedmm_regressor.load_fitted_regressor``); its path
             comes from the caller's params group (``loss``/``evaluate``) as ``checkpoint``.
    """
    if name == "tddfa":
        return TDDFAEncoder(device=device)
    if name == "deca":
        if not checkpoint and params is not None:
            checkpoint = lookup(params, "nets.threedmm.deca_checkpoint")
        return DECAEncoder(checkpoint or None, device=device)
    if name == "fitted":
        if not checkpoint:
            raise ValueError(
                "3DMM encoder 'fitted' needs the fitted regressor checkpoint (the `threedmm` stage's output); "
                "pass checkpoint=PATH"
            )
        return freeze(load_fitted_regressor(checkpoint, device=device))
    raise ValueError(f"unknown 3DMM encoder {name!r}; choose one of {', '.join(THREEDMM_ENCODERS)}")


def build_threedmm_normalizer(name: str, stats_path: str | os.PathLike | None = None) -> ThreeDMMNormalizer:
    """The coefficient normaliser matching encoder ``name``: 3DDFA_V2's BFM statistics for tddfa / fitted; for DECA
    the training set's own FLAME statistics from ``stats_path`` (the ``threedmm`` stage's stats.json, made with
    ``threedmm.encoder: deca``), or raw FLAME units (identity) when no path is given."""
    if name in ("tddfa", "fitted"):
        return ThreeDMMNormalizer.from_tddfa_stats()
    if name == "deca":
        if stats_path is None:
            return ThreeDMMNormalizer.identity(FLAME_N_SHAPE, FLAME_N_EXP)
        stats = read_stats(stats_path)
        widths = (len(stats.get("shape_std", ())), len(stats.get("exp_std", ())))
        if stats.get("encoder") != "deca" or widths != (FLAME_N_SHAPE, FLAME_N_EXP):
            raise ValueError(
                f"{stats_path}: statistics of {stats.get('encoder')!r} coefficients ({widths[0]} shape, {widths[1]} "
                f"expression), DECA needs FLAME's ({FLAME_N_SHAPE}, {FLAME_N_EXP}): set threedmm.encoder: deca so "
                "the threedmm stage computes them"
            )
        return ThreeDMMNormalizer.from_stats(stats)
    raise ValueError(f"unknown 3DMM encoder {name!r}; choose one of {', '.join(THREEDMM_ENCODERS)}")


__all__ = [
    "TDDFAEncoder",
    "DECAEncoder",
    "ThreeDMMNormalizer",
    "build_threedmm_encoder",
    "build_threedmm_normalizer",
    "encode",
    "load_tddfa_stats",
    "roi_box_from_landmark_box",
    "roi_box_from_face_box",
    "THREEDMM_ENCODERS",
]
