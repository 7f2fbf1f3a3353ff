"""MobileNetV1 as 3DDFA_V2 ships it: 120 px input, BatchNorm folded into the convolutions, 62 outputs.

The registry carries 3DDFA_V2's regressor only as ONNX (``tddfa_mb1_onnx``); onnx2torch turns it into a graph module
that runs but is awkward to fine-tune, save and reload without the ONNX file. This is the same network as plain torch
layers, so a 3DMM regressor can start from 3DDFA_V2's weights (features trained on 300W-LP faces to predict these very
BFM coefficients) and be fitted on renders (mfim.nets.threedmm_regressor, ``backbone: mobilenet_v1``).

What this network reads and predicts is here too, for both users (the ONNX encoder mfim.nets.threedmm.TDDFAEncoder
and the regressor): its 120 px roi of a face, its input scaling, and the statistics of its 62 outputs.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from mfim.assets import resolve
from mfim.nets.face_crops import (
    box_transform,
    canonical_landmark_box,
    canonical_landmarks_continuous,
    landmark_box,
    square_box,
    warp,
)
from mfim.nets.onnx_utils import load_numpy_pickle, onnx_to_torch
from mfim.nets.types import N_EXP, N_SHAPE

# (output channels, stride) of the 13 depthwise-separable blocks after the 3x3 stride-2 stem (32 channels)
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1))
STEM = 32
FEATURES = BLOCKS[-1][0]


def _conv(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    # biased convolutions: the BatchNorm of training is folded into them (as in the ONNX file)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups), nn.ReLU(inplace=True))


class GlobalMean(nn.Module):
    """B×C×H×W -> B×C: the global average pooling before the linear layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class MobileNetV1(nn.Module):
    """B×3×H×W -> B×n_out; ``features`` gives the B×1024 pooled vector before the linear layer."""

    def __init__(self, n_out: int = 62):
        super().__init__()
        layers, cin = [_conv(3, STEM, 3, 2)], STEM
        for cout, stride in BLOCKS:
            layers += [_conv(cin, cin, 3, stride, groups=cin), _conv(cin, cout, 1, 1)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.pool = GlobalMean()
        self.fc = nn.Linear(FEATURES, n_out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def convolutions(self) -> list[nn.Conv2d]:
        return [m for m in self.body.modules() if isinstance(m, nn.Conv2d)]


def tddfa_state(onnx_path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """3DDFA_V2's weights (``tddfa_mb1_onnx`` from the asset cache, or ``onnx_path``) as a :class:`MobileNetV1`
    state dict. Raises ValueError naming the file when its layers are not this network's."""
    path = resolve("tddfa_mb1_onnx", onnx_path)
    graph = onnx_to_torch(path)
    convs = [m for m in graph.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in graph.modules() if isinstance(m, nn.Linear)]
    model = MobileNetV1(n_out=linears[0].out_features if len(linears) == 1 else 62)
    mine = model.convolutions()
    if len(convs) != len(mine) or len(linears) != 1 or any(
            a.weight.shape != b.weight.shape or a.stride != b.stride or a.groups != b.groups for a, b in zip(convs, mine)):
        raise ValueError(f"{path}: not 3DDFA_V2's MobileNetV1 (mb1_120x120): its layers do not match")
    with torch.no_grad():
        for src, dst in zip(convs, mine):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        model.fc.weight.copy_(linears[0].weight)
        model.fc.bias.copy_(linears[0].bias)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- 3DDFA_V2's input and output conventions ------------------------------------------------------------------------

TDDFA_INPUT_SIZE = 120
# 62 = pose matrix (12) + shape (40) + expression (10)
TDDFA_POSE = slice(0, 12)
TDDFA_SHAPE = slice(12, 12 + N_SHAPE)
TDDFA_EXP = slice(12 + N_SHAPE, 12 + N_SHAPE + N_EXP)


def whole_pixel_crop(roi) -> np.ndarray:
    """The region 3DDFA_V2 actually crops for a roi of pixel-index corners (``crop_img`` in its utils/functions.py
    takes ``img[round(y0):round(y1), round(x0):round(x1)]``, then cv2.resize to 120 px): the rounded corners, read in
    continuous coordinates (pixel i covers [i, i + 1], so the first pixel's index is the region's left edge), for
    :func:`box_transform`. np.round rounds half to even, as Python's ``round`` there does."""
    return np.round(np.asarray(roi, dtype=np.float64))


def diagonal_square(box) -> np.ndarray:
    """3DDFA_V2's roi geometry from a landmark box (``parse_roi_box_from_landmark``): the bounding square grown to
    its own diagonal, same centre, in the box's own coordinates (not rounded)."""
    x0, y0, x1, y1 = [float(v) for v in box]
    return square_box(((x0 + x1) / 2, (y0 + y1) / 2), max(x1 - x0, y1 - y0) * np.sqrt(2.0))


def roi_box_from_landmark_box(box) -> np.ndarray:
    """3DDFA_V2's crop from landmarks: ``box`` is the points' bounding box in pixel INDICES (dlib /
    ``mfim.nets.align`` points, as the published code reads them); :func:`diagonal_square` as the whole-pixel region
    it crops (:func:`whole_pixel_crop`)."""
    return whole_pixel_crop(diagonal_square(box))


def roi_box_from_face_box(box) -> np.ndarray:
    """3DDFA_V2's crop from a detector box (``parse_roi_box_from_bbox``): side int(1.58 x mean box size), centre moved
    down by 0.14 x that size, as the whole-pixel region it crops (:func:`whole_pixel_crop`)."""
    x0, y0, x1, y1 = [float(v) for v in box]
    size = (x1 - x0 + y1 - y0) / 2
    return whole_pixel_crop(square_box(((x0 + x1) / 2, (y0 + y1) / 2 + 0.14 * size), int(size * 1.58)))


def aligned_roi_box(size: int) -> np.ndarray:
    """The 3DDFA_V2 crop of an FFHQ-aligned face of side ``size``: from the canonical 68 landmarks in that image's
    pixel indices."""
    return roi_box_from_landmark_box(landmark_box(canonical_landmarks_continuous(size) - 0.5))


def fitted_regressor_crop(aligned: torch.Tensor) -> torch.Tensor:
    """The 120 px roi our fitted ``mobilenet_v1`` regressors read (threedmm_regressor): the canonical 68-landmark box
    in continuous coordinates grown to its diagonal, not rounded to whole pixels. The shipped regressor_synth64.pt and
    its records were fitted on exactly this crop; :func:`tddfa_crop` (the official network's whole-pixel crop) sits
    up to ~0.5 px off it at 64 px, a shift that network was never trained on."""
    roi = diagonal_square(canonical_landmark_box(aligned.shape[-1]))
    return warp(aligned, box_transform(roi, TDDFA_INPUT_SIZE), TDDFA_INPUT_SIZE, fill=-1.0)


def tddfa_crop(aligned: torch.Tensor) -> torch.Tensor:
    """FFHQ-aligned B×3×H×W in [-1, 1] -> B×3×120×120 RGB 3DDFA_V2 roi in [-1, 1] (black outside the image): the
    canonical 68-landmark box grown to its diagonal (:func:`aligned_roi_box`)."""
    roi = aligned_roi_box(aligned.shape[-1])
    return warp(aligned, box_transform(roi, TDDFA_INPUT_SIZE), TDDFA_INPUT_SIZE, fill=-1.0)


def tddfa_network_input(crops: torch.Tensor) -> torch.Tensor:
    """RGB [-1, 1] crops -> what 3DDFA_V2's network was trained on: BGR, (x - 127.5) / 128."""
    pixels = (crops.flip(1) + 1.0) * 127.5
    return (pixels - 127.5) / 128.0


def load_tddfa_stats(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), each (62,) float32, of 3DDFA_V2's normalised regressor output."""
    stats = load_numpy_pickle(resolve("tddfa_param_stats", path))
    return np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
