"""Head pose (Pose-HN): Hopenet-style networks giving (yaw, pitch, roll) in degrees as the expectation over 66 bins.

angle = sum(softmax(logits) * bin_index) * 3 - 99, for each of yaw, pitch, roll (Hopenet's 3-degree bins covering
-99..99). Inputs are 224x224 ImageNet-normalised RGB crops.

* ``HopenetOnnx``: ``fr_pose.onnx`` (faceplugin), a Hopenet-style ShuffleNet. Its own JS crops the detector's face
  box enlarged by a quarter on each side; on aligned faces we use the dlib-style face box of the FFHQ geometry.
* ``HopenetResNet50``: the official ``hopenet_robust_alpha1.pkl`` (deep-head-pose) by path; module names as the
  official ``Hopenet`` (torchvision ResNet-50 layout, ``fc_yaw``/``fc_pitch``/``fc_roll`` and the unused
  ``fc_finetune``), so the file loads with ``strict=True``. Crops as its dlib demo: the face box widened by half its
  width on each side, 3/4 of its height above and 1/4 below, clipped to the image, shorter side to 224, centre crop.
  On an FFHQ-aligned face that region is the whole image, which is also what the paper-protocol scripts feed it.

Signs. Hopenet's own angles have the opposite sign to the project's 3DMM pose convention (``mfim.nets.rotation``)
in all three angles: measured with ``fr_pose.onnx`` against 3DDFA_V2 on the five test photos (yaw 16 vs -17 deg on
obama2, pitch 17 vs -13 on obama3) and on photos rotated in-plane by 15 deg (roll +15 vs -15). So by default the
outputs are negated (``project_signs=True``): then yaw < 0 means the face turns towards the image's left, exactly as
in ``ThreeDMMParams.pose``, and a mirrored face negates yaw and roll. Pose-HN distances (L2 of differences) do not
depend on this choice. The official ResNet-50 is assumed to share the ONNX model's (Hopenet's 300W-LP) convention.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from mfim.assets import resolve
from mfim.nets.deca import fill_num_batches_tracked
from mfim.nets.face_crops import box_transform, canonical_face_box, image_to_tensor, warp
from mfim.nets.onnx_utils import FrozenModule, load_state_dict_file, load_strict, onnx_to_torch

HOPENET_BINS = 66
HOPENET_INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Hopenet (yaw, pitch, roll) -> project convention (see module docstring)
HOPENET_TO_PROJECT_SIGNS = (-1.0, -1.0, -1.0)


def bins_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """B×66 bin logits -> B degrees: the softmax expectation of the bin index, times 3, minus 99."""
    idx = torch.arange(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return (F.softmax(logits, dim=-1) * idx).sum(-1) * 3.0 - 99.0


def _as_box(face) -> np.ndarray:
    """A (x0, y0, x1, y1) box from a box-like or a dlib rectangle."""
    if hasattr(face, "left"):
        return np.array([face.left(), face.top(), face.right() + 1, face.bottom() + 1], dtype=np.float64)
    box = np.asarray(face, dtype=np.float64)
    if box.shape != (4,):
        raise ValueError(f"face box must be (x0, y0, x1, y1), got shape {box.shape}")
    return box


def quarter_enlarged_box(box) -> np.ndarray:
    """The faceplugin crop: the face box grown by a quarter of its width/height on every side."""
    x0, y0, x1, y1 = _as_box(box)
    w, h = x1 - x0, y1 - y0
    return np.array([x0 - w / 4, y0 - h / 4, x1 + w / 4, y1 + h / 4])


def hopenet_demo_box(box, image_w: float, image_h: float) -> np.ndarray:
    """deep-head-pose's dlib demo crop, then torchvision Scale(224) + CenterCrop(224): a square region."""
    x0, y0, x1, y1 = _as_box(box)
    w, h = x1 - x0, y1 - y0
    x0, x1 = max(x0 - w / 2, 0.0), min(x1 + w / 2, image_w)
    y0, y1 = max(y0 - 3 * h / 4, 0.0), min(y1 + h / 4, image_h)
    side = min(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])


class _HeadPoseBase(FrozenModule):
    """Crop + ImageNet normalisation + bins -> degrees; subclasses give ``logits`` and the crop boxes."""

    input_size = HOPENET_INPUT_SIZE
    project_signs = True

    def _init_normalisation(self):
        # not persistent: the official checkpoints hold only network weights
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def aligned_box(self, size: int) -> np.ndarray:
        raise NotImplementedError

    def photo_box(self, face, image_w: int, image_h: int) -> np.ndarray:
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def crop(self, aligned: torch.Tensor) -> torch.Tensor:
        m = box_transform(self.aligned_box(aligned.shape[-1]), self.input_size)
        return warp(aligned, m, self.input_size, fill=-1.0)

    def degrees_from_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """224x224 RGB crops in [-1, 1] -> B×3 (yaw, pitch, roll) degrees."""
        x = ((crops + 1.0) / 2.0 - self.mean) / self.std
        degrees = torch.stack([bins_to_degrees(t) for t in self.logits(x)], -1)
        if self.project_signs:
            degrees = degrees * degrees.new_tensor(HOPENET_TO_PROJECT_SIGNS)
        return degrees

    def forward(self, aligned: torch.Tensor) -> torch.Tensor:
        """FFHQ-aligned faces B×3×H×W in [-1, 1] RGB -> B×3 (yaw, pitch, roll) in degrees."""
        return self.degrees_from_crops(self.crop(aligned))

    @torch.no_grad()
    def from_photo(self, image: np.ndarray, face) -> torch.Tensor:
        """1×3 degrees for the face in ``face`` (x0, y0, x1, y1 box or dlib rectangle) of an H×W×3 uint8 photo."""
        h, w = image.shape[:2]
        m = box_transform(self.photo_box(face, w, h), self.input_size)
        return self.degrees_from_crops(warp(image_to_tensor(image, self.mean.device), m, self.input_size))


class HopenetOnnx(_HeadPoseBase):
    """``fr_pose.onnx`` through onnx2torch (batch made dynamic): aligned faces -> B×3 degrees."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        onnx_path: str | os.PathLike | None = None,
        project_signs: bool = True,
    ):
        super().__init__()
        self.project_signs = project_signs
        self.net = onnx_to_torch(resolve("hopenet_onnx", onnx_path))
        self._init_normalisation()
        self.freeze().to(device)

    def aligned_box(self, size: int) -> np.ndarray:
        return quarter_enlarged_box(canonical_face_box(size))

    def photo_box(self, face, image_w: int, image_h: int) -> np.ndarray:
        return quarter_enlarged_box(face)

    def logits(self, x):
        yaw, pitch, roll = self.net(x)
        return yaw, pitch, roll


class HopenetResNet50(_HeadPoseBase):
    """The official Hopenet (ResNet-50, 66 bins); ``state_dict()`` keys equal ``hopenet_robust_alpha1.pkl``'s."""

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        load: bool = True,
        project_signs: bool = True,
    ):
        super().__init__()
        self.project_signs = project_signs
        tv = torchvision.models.resnet50(weights=None)  # the layout only; nothing downloads
        self.conv1, self.bn1, self.relu, self.maxpool = tv.conv1, tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4
        self.fc_yaw = nn.Linear(2048, HOPENET_BINS)
        self.fc_pitch = nn.Linear(2048, HOPENET_BINS)
        self.fc_roll = nn.Linear(2048, HOPENET_BINS)
        self.fc_finetune = nn.Linear(2048 + 3, 3)  # vestigial in the official model, kept so its file loads strictly
        self._init_normalisation()
        if load:
            path = resolve("hopenet_official", checkpoint)
            state = fill_num_batches_tracked(self, load_state_dict_file(path))
            load_strict(self, state, f"Hopenet {os.fspath(path)}")
        self.freeze().to(device)

    def aligned_box(self, size: int) -> np.ndarray:
        return hopenet_demo_box(canonical_face_box(size), size, size)

    def photo_box(self, face, image_w: int, image_h: int) -> np.ndarray:
        return hopenet_demo_box(face, image_w, image_h)

    def logits(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = x.mean(dim=(2, 3))  # the official AvgPool2d(7) on the 7x7 map of a 224 input
        return self.fc_yaw(x), self.fc_pitch(x), self.fc_roll(x)


__all__ = [
    "HopenetOnnx",
    "HopenetResNet50",
    "bins_to_degrees",
    "quarter_enlarged_box",
    "hopenet_demo_box",
    "HOPENET_BINS",
]
