"""Where the face sits in an FFHQ-aligned crop, and differentiable crops from there to each network's own input.

Coordinates here are continuous pixel positions with the image spanning [0, W] x [0, H] (pixel i covers [i, i+1]);
dlib landmarks and ``mfim.nets.align`` points (pixel indices, centres at integers) are shifted by +0.5 into this
convention. "Unit" coordinates divide by the crop size, so they hold at any resolution of an aligned face.

The official crops are written in pixel-index coordinates (cv2.warpAffine and skimage.transform.warp both sample at
integer pixel indices, the centre of the top-left pixel being (0, 0)); a map M between such coordinates is the map
``T(+0.5) M T(-0.5)`` here (:func:`from_pixel_index`). Where a network's crop came from, and in which convention:

* ArcFace (insightface ``utils/face_align.py``, ``estimate_norm`` / ``norm_crop``): a similarity is fitted by least
  squares (skimage ``SimilarityTransform.estimate``, i.e. Umeyama) FROM the five detected points TO the 112 px
  template, and ``cv2.warpAffine`` applies it, so the template's numbers are output pixel indices
  (:func:`template_crop_transform`). Fitting the other way round (template -> points) is not the inverse of that fit
  when the five points are not an exact similarity of the template -- a real face never is.
* DECA (``decalib/datasets/datasets.py``, ``TestData``): a square box placed from the 68 landmarks (``bbox2point``,
  type ``kpt68``; see ``mfim.nets.deca``) whose corners ``estimate_transform('similarity', src_pts, DST_PTS)`` sends
  to the pixel indices 0 and 223 of the 224 px crop (``DST_PTS`` = (0, 0), (0, 223), (223, 0)), then
  ``skimage.transform.warp``: the box's corners land on the first and last pixel CENTRES, not on the crop's outer
  edges (:func:`corners_transform`).

Canonical geometry of an FFHQ-aligned face
------------------------------------------
The canonical 68 points come from ``mfim.nets.align.canonical_landmarks`` (dlib's mean face through the FFHQ quad):
eyes at (0.375, 0.4735) / (0.625, 0.4735), nose tip (0.5, 0.6145), mouth corners (0.389, 0.739) / (0.611, 0.739);
the 68 points span x 0.214-0.786, y 0.381-0.932. That agrees with the recipe itself (for eye-to-mouth / eye-to-eye
ratios r <= 1.11 the quad fixes the eye distance at 1/4 of the crop and the eye midpoint at (0.5, 0.5 - 0.025 r)) and
with our measurement on the five face_recognition test photos and their mirror images (dlib 68 points, r 1.00-1.27):
eyes (0.378, 0.473) / (0.622, 0.474), nose (0.501, 0.596), mouth corners (0.375, 0.738) / (0.626, 0.738) -- the
widest difference is the mouth width of a smiling face.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mfim.nets.align import canonical_landmarks, estimate_similarity, five_points

# dlib's HOG frontal-face detector box on FFHQ-aligned crops, unit coordinates: measured on the ten aligned test
# photos (256 px) it is x 0.180-0.789 and y 0.250-0.316 to 0.859-0.926 (the detector's scale steps); a square from
# the brows to the chin. It is what dlib's 5-point predictor and the Hopenet crops expect as a "face box".
FFHQ_DLIB_BOX_UNIT = (0.18, 0.29, 0.79, 0.90)

# The standard ArcFace 112x112 five-point template (insightface ``face_align.arcface_src``): eye centres, nose tip,
# mouth corners, image-left first -- the same order as ``mfim.nets.align.five_points``. Output pixel INDICES of
# cv2.warpAffine (centres at integers), not continuous positions: see :func:`template_crop_transform`.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def to_continuous(points: np.ndarray) -> np.ndarray:
    """Pixel-index coordinates (dlib, ``mfim.nets.align``) -> continuous coordinates (pixel centres at +0.5)."""
    return np.asarray(points, dtype=np.float64) + 0.5


def resize_points(points, from_size: float, to_size: float):
    """Pixel-index points of a square image -> the same points once it is resized to ``to_size`` (numpy or torch):
    pixel centres scale about the image's outer edge."""
    return (points + 0.5) * (to_size / from_size) - 0.5


def canonical_landmarks_continuous(size: float) -> np.ndarray:
    """(68, 2) canonical landmarks of an FFHQ-aligned face of side ``size``, continuous coordinates."""
    return to_continuous(canonical_landmarks(1024)) * (size / 1024.0)


def canonical_five_points(size: float) -> np.ndarray:
    """(5, 2) canonical eye/nose/mouth points of an FFHQ-aligned face of side ``size``, continuous coordinates."""
    return five_points(canonical_landmarks_continuous(size))


def landmark_box(landmarks: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) bounding box of a set of points."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.array([lm[:, 0].min(), lm[:, 1].min(), lm[:, 0].max(), lm[:, 1].max()])


def canonical_landmark_box(size: float) -> np.ndarray:
    """(x0, y0, x1, y1) of the 68 canonical landmarks of an FFHQ-aligned face of side ``size``."""
    return landmark_box(canonical_landmarks_continuous(size))


def canonical_face_box(size: float) -> np.ndarray:
    """(x0, y0, x1, y1) of a dlib-detector-style face box on an FFHQ-aligned face of side ``size``."""
    return np.array(FFHQ_DLIB_BOX_UNIT) * size


# --- transforms ------------------------------------------------------------------------------------------------


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity mapping points src -> dst (Umeyama, no reflection) as a 2x3 matrix."""
    return estimate_similarity(src, dst)[:2]


def invert_affine(m) -> np.ndarray:
    """Inverse of a 2x3 affine map, as a 2x3 matrix."""
    m3 = np.vstack([np.asarray(m, dtype=np.float64)[:2], [0.0, 0.0, 1.0]])
    return np.linalg.inv(m3)[:2]


def from_pixel_index(m) -> np.ndarray:
    """A 2x3 map written in pixel-index coordinates (cv2, skimage, dlib) -> the same map in continuous coordinates."""
    m = np.asarray(m, dtype=np.float64)[:2]
    return np.hstack([m[:, :2], (m[:, 2] + 0.5 - m[:, :2].sum(1) * 0.5)[:, None]])


def template_crop_transform(points: np.ndarray, template: np.ndarray) -> np.ndarray:
    """2x3 map from template-crop pixels to input pixels (continuous), placed as insightface's ``norm_crop``.

    points: the (5, 2) detected points in the input, continuous coordinates; template: the network's template in
    output pixel indices (as published, e.g. :data:`ARCFACE_TEMPLATE_112`). The similarity is fitted from the points
    to the template -- the direction insightface fits it -- and inverted for :func:`warp`. Umeyama commutes with
    shifting both point sets, so fitting continuous points to the template + 0.5 is the index-coordinate fit
    expressed here.
    """
    return invert_affine(similarity_transform(points, to_continuous(template)))


def box_transform(box, out_size: int) -> np.ndarray:
    """2x3 matrix mapping output pixels of an out_size x out_size crop to input pixels of box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = [float(v) for v in box]
    return np.array([[(x1 - x0) / out_size, 0.0, x0], [0.0, (y1 - y0) / out_size, y0]])


def corners_transform(box, out_size: int) -> np.ndarray:
    """2x3 map from an out_size crop to input pixels that puts the box's corners on the crop's corner pixel CENTRES.

    DECA's crop convention (box corners -> pixel indices 0 and out_size - 1), in continuous coordinates: output
    position 0.5 reads the input at x0, out_size - 0.5 at x1; a box of side s is sampled every s / (out_size - 1).
    """
    x0, y0, x1, y1 = [float(v) for v in box]
    sx, sy = (x1 - x0) / (out_size - 1), (y1 - y0) / (out_size - 1)
    return np.array([[sx, 0.0, x0 - 0.5 * sx], [0.0, sy, y0 - 0.5 * sy]])


def square_box(center, side: float) -> np.ndarray:
    """(x0, y0, x1, y1) of a square of side ``side`` centred on ``center``."""
    cx, cy = center
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])


def warp(
    images: torch.Tensor,
    in_from_out,
    out_size: int | tuple[int, int],
    fill: float = -1.0,
    antialias: bool = True,
) -> torch.Tensor:
    """Resample ``images`` (B×C×H×W) through an affine map from output to input pixel coordinates.

    in_from_out: 2x3 (shared) or B×2×3 (per sample), numpy or torch, continuous pixel coordinates. Pixels that
    fall outside the input get ``fill`` (-1 = black for [-1, 1] images). When the map shrinks the image by more than
    1.25x the input is first resized with an antialiasing filter, so a 1024 px face gives a clean 112 px crop rather
    than an aliased one. Differentiable w.r.t. ``images``.
    """
    if isinstance(out_size, int):
        out_size = (out_size, out_size)
    out_h, out_w = out_size
    b, c, h, w = images.shape
    m = torch.as_tensor(np.asarray(in_from_out) if not torch.is_tensor(in_from_out) else in_from_out)
    m = m.to(device=images.device, dtype=torch.float64)
    if m.ndim == 2:
        m = m.expand(b, 2, 3)
    if antialias:
        # input pixels per output pixel; one pre-resize for the batch, by the smallest shrink in it
        shrink = float(torch.sqrt(torch.det(m[:, :, :2]).abs()).min())
        if shrink > 1.25:
            new_h, new_w = max(1, round(h / shrink)), max(1, round(w / shrink))
            images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
            rescale = torch.tensor([[new_w / w, 0.0], [0.0, new_h / h]], dtype=m.dtype, device=m.device)
            m = rescale @ m
            h, w = new_h, new_w
    # output normalised -> output pixel: x = (xn + 1) * out_w / 2 ; input pixel -> input normalised: xn = 2x / w - 1
    out_from_norm = torch.tensor(
        [[out_w / 2.0, 0.0, out_w / 2.0], [0.0, out_h / 2.0, out_h / 2.0], [0.0, 0.0, 1.0]],
        dtype=m.dtype,
        device=m.device,
    )
    norm_from_in = torch.tensor([[2.0 / w, 0.0, -1.0], [0.0, 2.0 / h, -1.0]], dtype=m.dtype, device=m.device)
    m3 = torch.cat([m, torch.tensor([0.0, 0.0, 1.0], dtype=m.dtype, device=m.device).expand(b, 1, 3)], 1)
    theta = (norm_from_in @ m3 @ out_from_norm).to(images.dtype)
    grid = F.affine_grid(theta, [b, c, out_h, out_w], align_corners=False)
    return F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def aligned_from_template(size: int, template: np.ndarray) -> np.ndarray:
    """2x3 map from a network's template-crop pixels to pixels of an FFHQ-aligned face of side ``size``: the
    canonical five points cropped as insightface crops detected ones (:func:`template_crop_transform`)."""
    return template_crop_transform(canonical_five_points(size), template)


# --- numpy <-> torch images -------------------------------------------------------------------------------------


def to_uint8(x: torch.Tensor, stylegan: bool = False) -> np.ndarray:
    """B×3×H×W in [-1, 1] -> B×H×W×3 uint8 RGB (clamped, rounded half to even): the project's one conversion from
    the torch image convention to the NumPy one (docs/CONVENTIONS.md).

    ``stylegan``: NVIDIA's rounding instead, x·127.5 + 128 clamped and truncated, which the official StyleGAN2 scripts
    write their seed images and sample grids with (``mfim generate`` and the pretrain stage's grids match them byte
    for byte); it differs from the default only where x·127.5 lands within float error of a half."""
    x = x.detach().float()
    if stylegan:
        x = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    else:
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """B×H×W×3 (or H×W×3) uint8 RGB -> B×3×H×W float in [-1, 1]: the one conversion the other way."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def image_to_tensor(image: np.ndarray, device=None) -> torch.Tensor:
    """H×W×3 uint8 RGB -> 1×3×H×W float in [-1, 1]."""
    t = from_uint8(np.array(image, dtype=np.uint8, copy=True))  # a copy: read-only inputs (np.frombuffer) are fine
    return t.to(device) if device is not None else t


def tensor_to_images(images: torch.Tensor) -> list[np.ndarray]:
    """B×3×H×W in [-1, 1] -> list of H×W×3 uint8 RGB."""
    return list(to_uint8(images))
