"""The evaluation networks, configured separately from the training ones (params group ``evaluate``).

identity: dlib ResNet (default; independent of the MobileFaceNet the ID loss trains against) or mobilefacenet.
3DMM (``evaluate.threedmm_encoder``): 3DDFA_V2 (default; the training loss uses the fitted regressor on the
embedded default, DECA at paper scale) or deca / fitted; the report warns when it is the loss's network;
shape and expression (``evaluate.shape_encoder`` / ``expression_encoder: evaluator``): an independent fitted regressor
(data/threedmm/evaluator.pt).
pose: the Hopenet-style ONNX (Pose-HN), or the official Hopenet ResNet-50 when nets.headpose.hopenet_checkpoint is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mfim.config import lookup
from mfim.nets.types import ThreeDMMParams


@dataclass
class Features:
    identity: np.ndarray  # N×D evaluation-embedder features
    shape: np.ndarray  # N×S std-normalised 3DMM shape
    exp: np.ndarray  # N×E std-normalised 3DMM expression
    pose: np.ndarray  # N×3 radians (yaw, pitch, roll) from the 3DMM (N×6 with evaluate.jaw_pose: + FLAME jaw)
    pose_hn: np.ndarray  # N×3 degrees from the head-pose network
    id_train: np.ndarray  # N×512 features of the training ID network (reference only, not independent)


FITTED_EVALUATOR = "data/threedmm/evaluator.pt"


def pose_vector(p: ThreeDMMParams, jaw: bool = False) -> torch.Tensor:
    """What Pose compares: (yaw, pitch, roll) in radians, plus FLAME's jaw rotation (axis-angle) when ``jaw``."""
    if not jaw:
        return p.pose
    if getattr(p, "jaw", None) is None:
        raise ValueError("evaluate.jaw_pose: the 3DMM encoder returned no jaw pose (only DECA/FLAME has one)")
    return torch.cat([p.pose, p.jaw], dim=1)


class Evaluators:
    def __init__(self, params: dict, device="cpu", batch_size: int = 16):
        from mfim.nets.headpose import HopenetOnnx, HopenetResNet50
        from mfim.nets.identity import DlibIdentityEmbedder
        from mfim.nets.threedmm import build_threedmm_encoder, build_threedmm_normalizer

        self.device = torch.device(device)
        self.batch_size = batch_size
        self.identity_name = str(lookup(params, "evaluate.identity_embedder"))
        self.threedmm_name = str(lookup(params, "evaluate.threedmm_encoder"))
        # the network inside L_shape / L_pose / L_exp (mfim.training.build's default): the report warns when the
        # evaluation measures with the very network the swapper was optimised against
        self.loss_threedmm_name = str(lookup(params, "loss.threedmm_encoder"))
        # the network the ID loss trained against (reference only): the iresnet when one is configured
        from mfim.training.build import build_identity_embedder

        iresnet = lookup(params, "nets.identity.iresnet_checkpoint") or ""
        self.train_embedder_name = "arcface_iresnet" if iresnet else "mobilefacenet"
        self.train_embedder = build_identity_embedder(params, self.device)
        self.dlib = DlibIdentityEmbedder() if self.identity_name == "dlib" else None
        self.eval_embedder = None
        if self.identity_name == "mobilefacenet" and self.train_embedder_name != "mobilefacenet":
            from mfim.nets.identity import MobileFaceNetEmbedder

            self.eval_embedder = MobileFaceNetEmbedder(device=self.device)
        kw = {}
        if self.threedmm_name == "fitted":
            kw["checkpoint"] = "data/threedmm/regressor.pt"
        self.threedmm = build_threedmm_encoder(self.threedmm_name, params=params, device=self.device, **kw)
        # DECA's FLAME coefficients are standardised by the training set's own statistics, as in the loss, when the
        # threedmm stage made them (threedmm.encoder: deca); otherwise they stay in raw FLAME units, and describe()
        # says so
        from mfim.training.build import THREEDMM_STATS

        stats = THREEDMM_STATS if self.threedmm_name == "deca" and Path(THREEDMM_STATS).is_file() else None
        self.coefficient_units = ("standardised by 3DDFA_V2's BFM statistics" if self.threedmm_name != "deca" else
                                  f"standardised by {THREEDMM_STATS}" if stats else
                                  f"raw FLAME units (no {THREEDMM_STATS}: run the threedmm stage with "
                                  "threedmm.encoder: deca)")
        self.normalizer = build_threedmm_normalizer(self.threedmm_name, stats_path=stats).to(self.device)
        # FLAME opens the mouth with its jaw joint: evaluate.jaw_pose puts that rotation into Pose (DECA only)
        self.jaw_pose = bool(lookup(params, "evaluate.jaw_pose"))
        self.loss_jaw_pose = bool(lookup(params, "loss.jaw_pose"))
        if self.jaw_pose and self.threedmm_name != "deca":
            raise ValueError(f"evaluate.jaw_pose needs evaluate.threedmm_encoder: deca ({self.threedmm_name} has no "
                             "jaw); set evaluate.jaw_pose: false")
        # Shape and expression may come from an independent fitted regressor (other people, width and seed than the
        # loss network, data/threedmm/evaluator.pt): on the synthetic protocol's renders 3DDFA_V2 sees BFM shape at
        # r ~0.12 and expression at r ~0.24 (it reads skin tone as expression), the regressor far better.
        self.shape_name = self._regressor_or_3dmm(params, "shape_encoder")
        self.exp_name = self._regressor_or_3dmm(params, "expression_encoder")
        k = lookup(params, "evaluate.shape_coefficients")
        self.shape_k = int(k) if k else None
        self.regressor = None
        if "evaluator" in (self.shape_name, self.exp_name):
            from mfim.nets.threedmm_regressor import load_fitted_regressor

            self.regressor = load_fitted_regressor(FITTED_EVALUATOR, device=self.device)
        hopenet = lookup(params, "nets.headpose.hopenet_checkpoint") or ""
        self.pose_name = "hopenet_resnet50" if hopenet else "hopenet_onnx"
        self.headpose = HopenetResNet50(hopenet, device=self.device) if hopenet else HopenetOnnx(device=self.device)

    def _regressor_or_3dmm(self, params: dict, key: str) -> str:
        name = str(lookup(params, f"evaluate.{key}") or self.threedmm_name)
        if name not in ("evaluator", self.threedmm_name):
            raise ValueError(f"evaluate.{key} must be 'evaluator' or empty, not {name!r}")
        return name

    def _name(self, which: str) -> str:
        return f"independent fitted regressor ({FITTED_EVALUATOR})" if which == "evaluator" else self.threedmm_name

    def describe(self) -> dict:
        return {
            "identity_embedder": self.identity_name,
            "threedmm_encoder": self.threedmm_name,
            "loss_threedmm_encoder": self.loss_threedmm_name,
            "shape_encoder": self._name(self.shape_name),
            "expression_encoder": self._name(self.exp_name),
            "shape_coefficients": self.shape_k or "all",
            "coefficient_units": self.coefficient_units,
            "pose_parameters": "yaw, pitch, roll + FLAME jaw rotation" if self.jaw_pose else "yaw, pitch, roll",
            "loss_jaw_pose": self.loss_jaw_pose,
            "pose_network": self.pose_name,
            "training_identity_embedder": f"{self.train_embedder_name} (reference only)",
        }

    @torch.no_grad()
    def features(self, images: torch.Tensor, identity: np.ndarray | None = None,
                 landmarks: np.ndarray | None = None) -> Features:
        """images: N×3×H×W in [-1, 1], FFHQ-aligned. ``identity``: their dlib embeddings when worker processes took
        them already (mfim.evaluation.features), so dlib does not run again here. ``landmarks``: N×68×2 pixel indices
        of ``images`` (NaN rows unknown): DECA places its crop with them as in training (a swap gets its target's);
        the other 3DMM networks crop the canonical window."""
        from mfim.nets.threedmm import encode

        ids, shapes, exps, poses, hns, trains = [], [], [], [], [], []
        for i in range(0, len(images), self.batch_size):
            x = images[i : i + self.batch_size].to(self.device).float().clamp(-1, 1)
            raw = encode(self.threedmm, x, None if landmarks is None else landmarks[i : i + self.batch_size])
            p: ThreeDMMParams = self.normalizer.normalize(raw)  # standardised shape / exp; a plain ThreeDMMParams
            shape, exp = p.shape, p.exp
            if self.regressor is not None:
                fitted = self.regressor.split(self.regressor.forward_normalized(x))  # std-normalised, its own stats
                shape = fitted.shape if self.shape_name == "evaluator" else shape
                exp = fitted.exp if self.exp_name == "evaluator" else exp
            shapes.append(shape[:, : self.shape_k].cpu().numpy())
            exps.append(exp.cpu().numpy())
            poses.append(pose_vector(raw, self.jaw_pose).cpu().numpy())  # raw: DECA's FLAMEParams keep the jaw
            hns.append(self.headpose(x).cpu().numpy())
            t = self.train_embedder(x)
            trains.append(t.cpu().numpy())
            if self.dlib is not None:
                given = identity[i : i + self.batch_size] if identity is not None else None
                ids.append(given if given is not None else self.dlib.embed_aligned(x.cpu()))
            else:
                ids.append((self.eval_embedder(x) if self.eval_embedder is not None else t).cpu().numpy())
        cat = lambda xs: np.concatenate(xs, axis=0).astype(np.float64)  # noqa: E731
        return Features(cat(ids), cat(shapes), cat(exps), cat(poses), cat(hns), cat(trains))
