"""Face swapping and ID mixing on user photos: detect -> FFHQ-align -> swap / mix -> (E+) paste back.

``FaceSwapper`` wraps a trained MFIM (data/train/mfim.pt by default) with the same alignment the pipeline used to make
its training data, so a photo goes through exactly the preprocessing the encoder was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mfim.imageio import ImageRejected

DEFAULT_CHECKPOINT = Path("data/train/mfim.pt")


@dataclass
class PreparedFace:
    photo: np.ndarray  # the original H×W×3 uint8 photo
    aligned: np.ndarray  # FFHQ-aligned crop, align_size² uint8
    transform: object  # mfim.nets.align.AlignTransform: photo -> aligned coordinates
    landmarks: np.ndarray  # (68, 2) in aligned coordinates
    faces_found: int
    rotation: int  # degrees the photo had to be turned for detection


class FaceSwapper:
    def __init__(self, model, meta: dict, checkpoint_sha256: str, device="cpu", detector: str = "hog"):
        from mfim.nets.landmarks import DlibFaceLandmarker

        self.model = model.eval()
        self.meta = meta
        self.device = torch.device(device)
        self.checkpoint_sha256 = checkpoint_sha256
        self.input_size = model.encoder.cfg.input_size
        self.output_size = model.generator.resolution
        self.align_size = int(meta.get("align_output_size", max(256, self.output_size)))
        self.landmarker = DlibFaceLandmarker(detector=detector)

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device="cpu", detector: str = "hog",
                        fit_steps: int = 0, fit_exp: float = 0.0) -> "FaceSwapper":
        """``fit_steps`` > 0: fit each source's ID codes at test time (mfim.models.source_fit, params.yaml's
        pixel and ID weights; the embedded default's reports use 50 steps). ``fit_exp`` > 0: the fit's expression
        anchor at that weight (reports: 0.1), read by the fitted loss network data/threedmm/regressor.pt."""
        from mfim.assets import MissingAssetError, sha256_file
        from mfim.models.mfim import load_swapper

        p = Path(path) if path else DEFAULT_CHECKPOINT
        if not p.is_file():
            hint = (
                "run `make repro` (it trains the embedded default and writes data/train/mfim.pt)"
                if path is None
                else "pass the mfim.pt that the train stage wrote (data/train/mfim.pt)"
            )
            raise MissingAssetError(f"MFIM checkpoint {str(p)!r} not found; {hint}")
        model, meta = load_swapper(p, device=device)
        if fit_steps:
            from mfim.training.build import build_source_fitter

            from mfim.config import embedded_default

            # params.yaml's pixel and ID weights (the embedded default's), the steps and anchor asked for; the
            # anchor reads the fitted loss network whatever params.yaml's loss.threedmm_encoder says
            params = embedded_default()
            params["source_fit"].update(steps=int(fit_steps), exp=float(fit_exp))
            params["loss"]["threedmm_encoder"] = "fitted"
            model.source_fitter = build_source_fitter(params, device)
        return cls(model, meta, sha256_file(p), device=device, detector=detector)

    # --- preprocessing ----------------------------------------------------------------------------------------
    def prepare(self, photo: np.ndarray) -> PreparedFace:
        """Detect the largest face and align it; ImageRejected('no face found') when there is none."""
        from mfim.nets.align import align_face

        faces = self.landmarker.detect(photo)
        if not faces:
            raise ImageRejected("no face found")
        face = faces[0]
        a = align_face(photo, face.landmarks, output_size=self.align_size, transform_size=4 * self.align_size)
        return PreparedFace(photo, a.image, a.transform, a.landmarks, len(faces), face.rotation)

    def _tensor(self, face: PreparedFace) -> torch.Tensor:
        from mfim.data.shards import resize_square
        from mfim.nets.face_crops import from_uint8

        return from_uint8(resize_square(face.aligned, self.input_size)).to(self.device)

    def _finish(self, x: torch.Tensor, tgt: PreparedFace, roi: bool) -> np.ndarray:
        from mfim.nets.face_crops import to_uint8
        from mfim.models.roi import roi_masks
        from mfim.nets.align import paste_back

        face = to_uint8(x)[0]
        if not roi:
            return face
        # E+: one blend, straight into the full-resolution photo, with the soft mask of the target's own face
        mask = roi_masks(tgt.landmarks[None], face.shape[0], landmark_size=self.align_size)[0, 0].numpy()
        return paste_back(tgt.photo, face, tgt.transform, mask=mask)

    # --- operations -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def swap(self, src: PreparedFace, tgt: PreparedFace, roi: bool = False) -> np.ndarray:
        """The swapped face (generator resolution), or with ``roi`` the target photo with the face pasted back."""
        x = self.model.swap(self._tensor(src), self._tensor(tgt))
        return self._finish(x, tgt, roi)

    @torch.no_grad()
    def mix(self, tgt: PreparedFace, global_src: PreparedFace, local_src: PreparedFace, roi: bool = False):
        x = self.model.mix(self._tensor(tgt), self._tensor(global_src), self._tensor(local_src))
        return self._finish(x, tgt, roi)

    def record(self, **extra) -> dict:
        """Provenance record for images this swapper writes."""
        from mfim.provenance import provenance_record

        return provenance_record("synthetic", checkpoint_sha256=self.checkpoint_sha256, **extra)
