"""Crop geometry of the official networks, checked against the published templates and conventions.

The references here are written from facts, not from ``mfim.nets.face_crops``:

* insightface ``face_align.estimate_norm`` / ``norm_crop``: a least-squares similarity (skimage's Umeyama) fitted
  FROM the five detected points TO the 112 px template, applied by ``cv2.warpAffine``, whose coordinates are pixel
  indices (the first pixel's centre is (0, 0)) on both sides.
* DECA ``datasets.TestData`` / ``bbox2point('kpt68')``: box centre and size from the 68 landmarks' min/max, size x 1.1,
  side ``int(size * 1.25)``, its corners mapped onto the output pixel indices (0, 0), (0, 223), (223, 0), then
  ``skimage.transform.warp`` (pixel indices too).

Both are computed below in pixel indices with a least-squares similarity of our own (2-D Umeyama in complex form:
dst = a src + b with complex a), then each output pixel's index is mapped back into the input. Our crops are in
continuous coordinates (pixel centres at +0.5), so we compare at the output pixel centres, shifted by 0.5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mfim.nets.align import canonical_landmarks, five_points
from mfim.nets.deca import deca_crop, deca_crop_transforms
from mfim.nets.face_crops import (
    ARCFACE_TEMPLATE_112,
    aligned_from_template,
    similarity_transform,
    template_crop_transform,
    warp,
)
from mfim.nets.identity import ArcFaceCropEmbedder

# insightface's arcface_src, as published (output pixel indices of the 112 px crop)
INSIGHTFACE_ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity src -> dst: dst ~ a src + b over complex numbers (the 2-D Umeyama solution)."""
    s = src[:, 0] + 1j * src[:, 1]
    d = dst[:, 0] + 1j * dst[:, 1]
    sc, dc = s - s.mean(), d - d.mean()
    a = (np.conj(sc) * dc).sum() / (np.abs(sc) ** 2).sum()
    b = d.mean() - a * s.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def index_grid(n: int) -> np.ndarray:
    """(n*n, 2) output pixel indices (x, y)."""
    yy, xx = np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64), indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], 1)


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def sampled_positions_reference(out_from_in_idx: np.ndarray, n: int) -> np.ndarray:
    """Continuous input positions that cv2.warpAffine / skimage.warp sample for each output pixel, given the
    output-from-input map in pixel indices: inverse map of the integer output indices, then +0.5."""
    m3 = np.vstack([out_from_in_idx, [0.0, 0.0, 1.0]])
    return apply(np.linalg.inv(m3)[:2], index_grid(n)) + 0.5


def sampled_positions_ours(in_from_out: np.ndarray, n: int) -> np.ndarray:
    """Continuous input positions that ``warp`` samples for each output pixel (its centre, index + 0.5)."""
    return apply(np.asarray(in_from_out, np.float64), index_grid(n) + 0.5)


def crop_pixel_error(ours: np.ndarray, reference: np.ndarray, in_from_out: np.ndarray) -> np.ndarray:
    """Per-pixel distance between two sampling grids, in crop pixels (input distance / input px per crop px)."""
    scale = math.sqrt(abs(np.linalg.det(np.asarray(in_from_out)[:, :2])))
    return np.linalg.norm(ours - reference, axis=1) / scale


def posed(points: np.ndarray, degrees: float, scale: float, offset, noise: float, seed: int) -> np.ndarray:
    """Points turned on screen, scaled, moved, with per-point noise (a real face is no exact similarity)."""
    a = math.radians(degrees)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    jitter = np.random.default_rng(seed).normal(0.0, noise, points.shape)
    return (points - points.mean(0)) @ rot.T * scale + np.asarray(offset, np.float64) + jitter * scale


# five-point sets in pixel indices (detector output): canonical aligned faces and posed noisy templates
FIVE_POINT_SETS = {
    "aligned64": five_points(canonical_landmarks(64)),
    "aligned256": five_points(canonical_landmarks(256)),
    "aligned1024": five_points(canonical_landmarks(1024)),
    "tilted_small": posed(INSIGHTFACE_ARCFACE_112, -35.0, 0.6, (40.0, 70.0), 2.0, 0),
    "upright_large": posed(INSIGHTFACE_ARCFACE_112, 0.0, 7.0, (900.0, 610.0), 3.0, 1),
    "rolled_offcentre": posed(INSIGHTFACE_ARCFACE_112, 20.0, 2.5, (123.4, 321.9), 4.0, 2),
}


# --- ArcFace ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FIVE_POINT_SETS))
def test_arcface_grid_matches_insightface_norm_crop(name):
    pts = FIVE_POINT_SETS[name]
    reference = sampled_positions_reference(lstsq_similarity(pts, INSIGHTFACE_ARCFACE_112), 112)
    ours_map = template_crop_transform(pts + 0.5, ARCFACE_TEMPLATE_112)
    err = crop_pixel_error(sampled_positions_ours(ours_map, 112), reference, ours_map)
    assert err.max() < 0.01, (name, err.mean(), err.max())
    # the test can see the old slip: the template fitted to the points, read as continuous positions
    old_map = similarity_transform(ARCFACE_TEMPLATE_112, pts + 0.5)
    old = crop_pixel_error(sampled_positions_ours(old_map, 112), reference, old_map)
    assert old.max() > 0.25, (name, old.mean(), old.max())


@pytest.mark.parametrize("size", [64, 256, 1024])
def test_aligned_arcface_crop_is_norm_crop_of_the_canonical_points(size):
    # the ID loss's crop of an FFHQ-aligned face: norm_crop given the canonical five points of that face
    reference = sampled_positions_reference(
        lstsq_similarity(five_points(canonical_landmarks(size)), INSIGHTFACE_ARCFACE_112), 112
    )
    m = aligned_from_template(size, ARCFACE_TEMPLATE_112)
    assert crop_pixel_error(sampled_positions_ours(m, 112), reference, m).max() < 0.01


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """H×W×3 uint8 with structure at ~10 px, so a 1/32 px interpolation step is invisible but 0.25 px is not."""
    import cv2

    coarse = np.random.default_rng(seed).uniform(0, 255, (h // 8, w // 8, 3)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).round().astype(np.uint8)


def cv2_crop(image: np.ndarray, out_from_in_idx: np.ndarray, n: int) -> torch.Tensor:
    """cv2.warpAffine (bilinear, black border) of a uint8 image as a 1×3×n×n tensor in [-1, 1]."""
    import cv2

    x = image.astype(np.float32) / 127.5 - 1.0
    out = cv2.warpAffine(x, out_from_in_idx, (n, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=(-1.0, -1.0, -1.0))
    return torch.from_numpy(out).permute(2, 0, 1)[None]


class _CropOnly(ArcFaceCropEmbedder):
    """The shared ArcFace front end without a network (crop_photo needs a parameter for its device)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)


def test_arcface_photo_crop_matches_cv2_warp_affine():
    pytest.importorskip("cv2")
    image = smooth_image(240, 300, 0)
    pts = posed(INSIGHTFACE_ARCFACE_112, 15.0, 1.1, (150.0, 115.0), 2.0, 3)  # no antialiasing at 1.1x
    lm68 = np.zeros((68, 2))
    lm68[36:42], lm68[42:48], lm68[30], lm68[48], lm68[54] = pts  # five_points reads eyes, nose tip, mouth corners
    expected = cv2_crop(image, lstsq_similarity(pts, INSIGHTFACE_ARCFACE_112), 112)
    with torch.no_grad():
        ours = _CropOnly().crop_photo(image, lm68)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    diff = (ours - expected)[inner].abs()
    assert diff.mean() < 0.004 and diff.max() < 0.03, (diff.mean(), diff.max())


# --- DECA ---------------------------------------------------------------------------------------------------------


def deca_out_from_in_reference(lm68: np.ndarray) -> np.ndarray:
    """DECA TestData's transform for 68 landmarks (pixel indices): kpt68 box, x1.1, int(x1.25), corners -> 0..223."""
    left, right = lm68[:, 0].min(), lm68[:, 0].max()
    top, bottom = lm68[:, 1].min(), lm68[:, 1].max()
    old_size = (right - left + bottom - top) / 2 * 1.1
    cx, cy = right - (right - left) / 2.0, bottom - (bottom - top) / 2.0
    size = int(old_size * 1.25)
    src = np.array([[cx - size / 2, cy - size / 2], [cx - size / 2, cy + size / 2], [cx + size / 2, cy - size / 2]])
    dst = np.array([[0.0, 0.0], [0.0, 223.0], [223.0, 0.0]])
    return lstsq_similarity(src, dst)


LANDMARK_SETS = {
    "aligned256": canonical_landmarks(256).astype(np.float64),
    "turned_small": posed(canonical_landmarks(256).astype(np.float64), -25.0, 0.35, (50.0, 61.0), 3.0, 4),
    "offcentre_large": posed(canonical_landmarks(256).astype(np.float64), 10.0, 2.2, (700.0, 420.0), 2.0, 5),
}


@pytest.mark.parametrize("name", list(LANDMARK_SETS))
def test_deca_grid_matches_deca_test_data(name):
    lm = LANDMARK_SETS[name]
    reference = sampled_positions_reference(deca_out_from_in_reference(lm), 224)
    ours_map = deca_crop_transforms(1024, lm[None])[0]
    err = crop_pixel_error(sampled_positions_ours(ours_map, 224), reference, ours_map)
    assert err.max() < 0.01, (name, err.mean(), err.max())


@pytest.mark.parametrize("size", [64, 256, 1024])
def test_deca_canonical_crop_is_deca_of_the_canonical_landmarks(size):
    reference = sampled_positions_reference(deca_out_from_in_reference(canonical_landmarks(size).astype(float)), 224)
    m = deca_crop_transforms(size)
    assert crop_pixel_error(sampled_positions_ours(m, 224), reference, m).max() < 0.01


def test_deca_crop_matches_cv2_per_sample_and_falls_back_without_landmarks():
    pytest.importorskip("cv2")
    image = smooth_image(256, 256, 1)
    lm = posed(canonical_landmarks(256).astype(np.float64), 12.0, 1.05, (120.0, 140.0), 2.0, 6)
    missing = np.full((68, 2), np.nan)  # a sample without landmarks: the canonical box
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(127.5).sub(1.0).expand(2, -1, -1, -1)
    with torch.no_grad():
        ours = deca_crop(x, np.stack([lm, missing]))
    expected = cv2_crop(image, deca_out_from_in_reference(lm), 224)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    diff = (ours[:1] - expected)[inner].abs()
    assert diff.mean() < 0.004 and diff.max() < 0.03, (diff.mean(), diff.max())
    assert torch.equal(ours[1:], deca_crop(x[:1]))
    assert torch.equal(ours[1:], warp(x[:1], deca_crop_transforms(256), 224))
