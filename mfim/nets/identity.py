"""Identity embedders: MobileFaceNet (ONNX, differentiable; the ID loss) and dlib's ResNet (independent evaluation).

Both take FFHQ-aligned faces. The MobileFaceNet crops them to the ArcFace 112x112 five-point template inside torch
(so the ID loss back-propagates into the generator at any resolution), placed as insightface's ``norm_crop`` places
it (``mfim.nets.face_crops.template_crop_transform``); dlib gets its 150 px chip from its own
5-point predictor run on a fixed face rectangle of the FFHQ geometry (no detection). The official insightface
iresnet (``mfim.nets.iresnet``) shares the MobileFaceNet's crop and call signature.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from mfim.assets import resolve
from mfim.nets.face_crops import (
    ARCFACE_TEMPLATE_112,
    aligned_from_template,
    canonical_face_box,
    image_to_tensor,
    tensor_to_images,
    template_crop_transform,
    to_continuous,
    warp,
)
from mfim.nets.align import five_points
from mfim.nets.onnx_utils import FrozenModule, onnx_to_torch


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two B×D embedding batches (B)."""
    return F.cosine_similarity(a, b, dim=-1)


class ArcFaceCropEmbedder(FrozenModule):
    """Shared front end of the 112x112 ArcFace-template embedders: crop, pixel normalisation, then ``self.net``.

    Subclasses set ``self.net`` (B×3×112×112 normalised input -> B×D) and ``pixel_mean``/``pixel_std`` in 0..255
    units of the network's training pre-processing.
    """

    input_size = 112
    pixel_mean = 127.5
    pixel_std = 128.0

    def crop(self, aligned: torch.Tensor) -> torch.Tensor:
        """FFHQ-aligned B×3×H×W in [-1, 1] -> ArcFace-template B×3×112×112 in [-1, 1] (differentiable)."""
        m = aligned_from_template(aligned.shape[-1], ARCFACE_TEMPLATE_112)
        return warp(aligned, m, self.input_size, fill=-1.0)

    def embed_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """ArcFace-aligned 112x112 crops in [-1, 1] -> B×D raw (not normalised) embeddings."""
        # pixels = (crops + 1) * 127.5, then (pixels - mean) / std, folded into one scale and shift (exactly the
        # identity for arcface_torch's (x - 127.5) / 127.5)
        scale = 127.5 / self.pixel_std
        shift = (127.5 - self.pixel_mean) / self.pixel_std
        return self.net(crops * scale + shift)

    def forward(self, aligned: torch.Tensor) -> torch.Tensor:
        """FFHQ-aligned faces B×3×H×W in [-1, 1] RGB -> B×D raw embeddings."""
        return self.embed_crops(self.crop(aligned))

    def crop_photo(self, image: np.ndarray, landmarks68: np.ndarray) -> torch.Tensor:
        """An unaligned photo (H×W×3 uint8 RGB) and its dlib 68 landmarks -> 1×3×112×112 ArcFace crop."""
        m = template_crop_transform(to_continuous(five_points(landmarks68)), ARCFACE_TEMPLATE_112)
        device = next(self.parameters()).device
        return warp(image_to_tensor(image, device), m, self.input_size, fill=-1.0)

    @torch.no_grad()
    def embed_photo(self, image: np.ndarray, landmarks68: np.ndarray) -> torch.Tensor:
        """1×D embedding of the face with these 68 landmarks in an unaligned photo."""
        return self.embed_crops(self.crop_photo(image, landmarks68))

    cosine = staticmethod(cosine)


class MobileFaceNetEmbedder(ArcFaceCropEmbedder):
    """The ONNX MobileFaceNet (``fr_feature.onnx``, 512-d) through onnx2torch; frozen, differentiable to the input.

    Pre-processing as the network's own JS code: RGB, (x - 127.5) / 128 (the JS subtracts 127; 0.5/128 is
    negligible). Embeddings are raw; compare them with ``cosine``. Same person ~0.66-0.72, different people
    -0.1..0.16 on real photos.
    """

    embedding_dim = 512

    def __init__(self, device: str | torch.device = "cpu", onnx_path: str | os.PathLike | None = None):
        super().__init__()
        # make_batch_dynamic (inside onnx_to_torch) turns the graph's final Reshape [1, -1] into [0, -1]
        self.net = onnx_to_torch(resolve("mobilefacenet_onnx", onnx_path))
        self.freeze().to(device)


class DlibIdentityEmbedder:
    """dlib's ResNet face recognizer (128-d, not differentiable): the evaluation embedder independent of the ID loss.

    Aligned faces: dlib's 5-point predictor runs on a fixed rectangle of the FFHQ geometry (the box dlib's own
    detector draws on FFHQ crops), then dlib cuts its standard 150 px chip. Photos: a face box (5-point predictor)
    or the 68 landmarks. Compare with Euclidean ``distance``: same person ~0.35-0.45, different ~0.8 (dlib's
    decision threshold is 0.6).

    ``descriptor`` picks what runs the recognition network on the chips: ``"torch"`` (default) is
    ``mfim.nets.dlib_resnet.DlibFaceResNet``, the same network and weights read from dlib's file
    (``DlibFaceResNet.describe_each``: a chip at a time on one thread, so a descriptor has the same bits in any
    batch, thread count or worker process, as dlib's had); 0.011 CPU-s a chip against dlib's 0.077 (its wheel has
    no BLAS), equal to dlib's descriptors within 1e-5 (measured 4e-7, tests/test_dlib_resnet.py). ``"dlib"`` calls
    dlib's own ``compute_face_descriptor``. dlib always finds the 5 points and cuts the chips.
    """

    embedding_dim = 128
    chip_size = 150
    chip_padding = 0.25

    def __init__(
        self,
        recognizer_path: str | os.PathLike | None = None,
        predictor_path: str | os.PathLike | None = None,
        descriptor: str = "torch",
    ):
        import dlib

        self._dlib = dlib
        self.recognizer = self.network = None
        if descriptor == "torch":
            from mfim.nets.dlib_resnet import DlibFaceResNet

            self.network = DlibFaceResNet(recognizer_path)
        elif descriptor == "dlib":
            self.recognizer = dlib.face_recognition_model_v1(str(resolve("dlib_face_recognition", recognizer_path)))
        else:
            raise ValueError(f"descriptor must be 'torch' or 'dlib', got {descriptor!r}")
        self.predictor = dlib.shape_predictor(str(resolve("dlib_landmarks5", predictor_path)))

    def _rect(self, box) -> "object":
        x0, y0, x1, y1 = [int(round(float(v))) for v in box]
        return self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1)  # dlib rectangles are inclusive

    def _chip(self, image: np.ndarray, shape) -> np.ndarray:
        return self._dlib.get_face_chip(image, shape, size=self.chip_size, padding=self.chip_padding)

    def _describe(self, chips: list[np.ndarray]) -> np.ndarray:
        if not chips:
            return np.zeros((0, self.embedding_dim), np.float32)
        if self.network is not None:
            return self.network.describe_each(np.stack(chips))
        return np.asarray(self.recognizer.compute_face_descriptor(chips), dtype=np.float32).reshape(-1, 128)

    def chips_aligned(self, faces) -> list[np.ndarray]:
        """dlib's 150 px chips of FFHQ-aligned faces (list of H×W×3 uint8, or a B×3×H×W tensor in [-1, 1])."""
        if torch.is_tensor(faces):
            faces = tensor_to_images(faces)
        chips = []
        for face in faces:
            face = np.ascontiguousarray(face, dtype=np.uint8)
            rect = self._rect(canonical_face_box(face.shape[0]))
            chips.append(self._chip(face, self.predictor(face, rect)))
        return chips

    def embed_aligned(self, faces) -> np.ndarray:
        """B×128 descriptors of FFHQ-aligned faces (list of uint8 arrays or a [-1, 1] tensor)."""
        return self._describe(self.chips_aligned(faces))

    def embed_photo(self, image: np.ndarray, face) -> np.ndarray:
        """128-d descriptor of one face in an unaligned photo.

        ``face``: a (x0, y0, x1, y1) box / ``dlib.rectangle`` (dlib's 5-point predictor finds the points), or a
        (68, 2) array of dlib landmarks (used directly: dlib aligns its chip from 68 points too).
        """
        dlib = self._dlib
        image = np.ascontiguousarray(image, dtype=np.uint8)
        if isinstance(face, dlib.rectangle):
            shape = self.predictor(image, face)
        else:
            arr = np.asarray(face, dtype=np.float64)
            if arr.shape == (68, 2):
                pts = [dlib.point(int(round(x)), int(round(y))) for x, y in arr]
                x0, y0 = arr.min(0)
                x1, y1 = arr.max(0)
                shape = dlib.full_object_detection(self._rect((x0, y0, x1 + 1, y1 + 1)), pts)
            elif arr.shape == (4,):
                shape = self.predictor(image, self._rect(arr))
            else:
                raise ValueError(f"face must be a box (4,) or 68 landmarks (68, 2), got shape {arr.shape}")
        return self._describe([self._chip(image, shape)])[0]

    @staticmethod
    def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Euclidean distance between descriptors (row-wise for batches)."""
        return np.linalg.norm(np.asarray(a) - np.asarray(b), axis=-1)


__all__ = ["cosine", "ArcFaceCropEmbedder", "MobileFaceNetEmbedder", "DlibIdentityEmbedder"]
