"""FFHQ alignment: exact transform, the recipe's padding, equivariance on real photos, rotations, paste-back."""

from __future__ import annotations

import numpy as np
import pytest

from mfim.nets.align import (
    CANONICAL_FRACTIONS,
    AlignTransform,
    _blur_pad,
    align_face,
    canonical_fractions_from_shape,
    canonical_landmarks,
    canonical_points,
    estimate_similarity,
    face_mask,
    ffhq_quad,
    paste_back,
    plan_alignment,
)
from mfim.nets.landmarks import DlibFaceLandmarker, rotate_image

SIZE = 256


@pytest.fixture(scope="module")
def hog():
    return DlibFaceLandmarker("hog", upsample=1)


@pytest.fixture(scope="module")
def obama_aligned(hog, photos):
    face = hog.detect(photos["obama"])[0]
    return face, align_face(photos["obama"], face.landmarks, SIZE, 4 * SIZE)


def _similarity(angle_deg: float, scale: float, shift) -> np.ndarray:
    t = np.radians(angle_deg)
    m = np.eye(3)
    m[:2, :2] = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    m[:2, 2] = shift
    return m


# --- geometry without photos ------------------------------------------------------------------------------------


def _blob_image(h, w, points, sigma):
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w))
    for x, y in points:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.repeat(np.clip(img * 200 + 20, 0, 255).astype(np.uint8)[..., None], 3, 2)


def _centroid(img, p, r):
    g = np.clip(img[..., 0].astype(np.float64) - 20, 0, None)
    x0, y0 = int(round(p[0])) - r, int(round(p[1])) - r
    sub = g[y0 : y0 + 2 * r + 1, x0 : x0 + 2 * r + 1]
    yy, xx = np.mgrid[y0 : y0 + sub.shape[0], x0 : x0 + sub.shape[1]]
    return np.array([(sub * xx).sum() / sub.sum(), (sub * yy).sum() / sub.sum()])


@pytest.mark.parametrize(
    "hw,scale,angle,centre,size,tsize,expect_shrink,expect_pad",
    [
        ((400, 500), 1.0, 10, (263, 192), 256, 1024, False, False),  # plain crop, upsampling
        ((1500, 1700), 6.0, 15, (850, 700), 64, 256, True, False),  # big face: integer shrink first
        ((1500, 1700), 6.0, 15, (200, 300), 64, 256, True, True),  # shrink + face at the corner: padding
        ((500, 400), 1.5, -30, (60, 450), 256, 1024, False, True),  # padding
        ((1001, 999), 7.3, 100, (500, 500), 48, 1024, True, False),  # odd sizes, face turned past 90°
    ],
)
def test_transform_is_exact(hw, scale, angle, centre, size, tsize, expect_shrink, expect_pad):
    """Bright dots at known points land where AlignTransform says (sub-pixel), whatever the recipe's steps did."""
    h, w = hw
    lm0 = canonical_landmarks(100).astype(np.float64) - 49.5
    lm = lm0 @ _similarity(angle, scale, (0, 0))[:2, :2].T + np.array(centre)
    dots = lm[[36, 45, 8]]
    dots = dots[(dots > 10).all(1) & (dots[:, 0] < w - 10) & (dots[:, 1] < h - 10)]
    assert len(dots) >= 2
    img = _blob_image(h, w, dots, 2.5 * scale)
    plan = plan_alignment(lm, hw, size, tsize)
    assert (plan.shrink > 1) == expect_shrink and (max(plan.pad) > 0) == expect_pad
    out = align_face(img, lm, size, tsize)
    assert out.image.shape == (size, size, 3) and out.image.dtype == np.uint8
    predicted = out.transform.to_aligned(dots)
    r = max(3, int(2.5 * scale * out.transform.scale * 3.5))
    found = np.array([_centroid(out.image, p, r) for p in predicted])
    np.testing.assert_allclose(found, predicted, atol=0.05)
    # the aligned landmarks are the transformed ones; the similarity's angle undoes the face's roll
    np.testing.assert_allclose(out.landmarks, out.transform.to_aligned(lm), atol=1e-3)
    assert abs(((out.transform.rotation_deg + angle + 180) % 360) - 180) < 1e-6


def test_canonical_face_aligns_to_itself():
    """The canonical landmarks are a fixed point of the recipe (at any size), and match the dlib mean shape file."""
    for size in (64, 256, 1024):
        lm = canonical_landmarks(size)
        img = np.full((size, size, 3), 100, np.uint8)
        out = align_face(img, lm, size, 4 * size)
        np.testing.assert_allclose(out.landmarks, lm, atol=2e-3 * size)
        # (the table is rounded to 1e-4 of the crop, hence the size-proportional tolerance on the translation)
        np.testing.assert_allclose(out.transform.matrix[:2, :2], np.eye(2), atol=1e-3)
        np.testing.assert_allclose(out.transform.matrix[:2, 2], 0.0, atol=1e-3 * size)
    from mfim.assets import resolve
    from mfim.nets.landmarks import read_dlib_mean_shape

    fractions = canonical_fractions_from_shape(read_dlib_mean_shape(resolve("dlib_landmarks68")))
    np.testing.assert_allclose(CANONICAL_FRACTIONS, fractions, atol=6e-5)


def test_canonical_points_ffhq_geometry():
    """Eyes at about 37.5% / 62.5% across and 47% down, the mouth at about 74% down (as in FFHQ crops)."""
    p = canonical_points(1000)
    assert abs(p["eye_left"][0] - 375) < 10 and abs(p["eye_right"][0] - 625) < 10
    assert abs(p["eye_left"][1] - p["eye_right"][1]) < 1
    assert 440 < p["eye_left"][1] < 500 and 710 < p["mouth"][1] < 770
    assert abs(p["nose"][0] - 499.5) < 1


def test_quad_is_square_and_rotates_with_the_face():
    lm = canonical_landmarks(200).astype(np.float64)
    quad, qsize = ffhq_quad(lm)
    sides = np.linalg.norm(np.roll(quad, -1, 0) - quad, axis=1)
    np.testing.assert_allclose(sides, qsize, rtol=1e-9)
    m = _similarity(33, 1.7, (40, -15))
    quad2, qsize2 = ffhq_quad(lm @ m[:2, :2].T + m[:2, 2])
    np.testing.assert_allclose(quad2, quad @ m[:2, :2].T + m[:2, 2], atol=1e-9)
    assert abs(qsize2 - 1.7 * qsize) < 1e-9


def test_blur_pad_matches_the_recipe(rng):
    """The padding step equals the original recipe (scipy Gaussian, median fade) up to rounding."""
    import scipy.ndimage

    img = rng.uniform(0, 255, (120, 90, 3)).astype(np.uint8)
    left, top, right, bottom = 30, 20, 40, 35
    qsize = 250.0
    ours = _blur_pad(img, (left, top, right, bottom), qsize)
    work = np.pad(img.astype(np.float32), ((top, bottom), (left, right), (0, 0)), "reflect")
    h, w = work.shape[:2]
    y, x = np.mgrid[:h, :w].astype(np.float32)
    fade = np.maximum(1 - np.minimum(x / left, (w - 1 - x) / right), 1 - np.minimum(y / top, (h - 1 - y) / bottom))
    fade = fade[..., None]
    work += (scipy.ndimage.gaussian_filter(work, [qsize * 0.02, qsize * 0.02, 0]) - work) * np.clip(fade * 3 + 1, 0, 1)
    work += (np.median(work, axis=(0, 1)) - work) * np.clip(fade, 0, 1)
    ref = np.clip(np.rint(work), 0, 255).astype(np.uint8)
    assert ours.shape == ref.shape
    assert np.abs(ours.astype(int) - ref).max() <= 1


def test_transform_helpers():
    lm = canonical_landmarks(100).astype(np.float64) @ _similarity(20, 2.0, (0, 0))[:2, :2].T + 300
    plan = plan_alignment(lm, (700, 800), 256, 1024)
    tf = plan.transform
    pts = np.array([[10.0, 20.0], [400.0, 333.3]])
    np.testing.assert_allclose(tf.to_original(tf.to_aligned(pts)), pts, atol=1e-9)
    big = tf.resized(1024)
    np.testing.assert_allclose(big.to_aligned(pts), (tf.to_aligned(pts) + 0.5) * 4 - 0.5, atol=1e-9)
    again = AlignTransform.from_list(tf.to_list(), tf.size, tf.image_hw)
    np.testing.assert_allclose(again.matrix, tf.matrix)
    assert abs(tf.scale - 256 / plan.qsize) < 1e-9
    m = estimate_similarity(pts, tf.to_aligned(pts))
    np.testing.assert_allclose(m, tf.matrix, atol=1e-6)


def test_tiny_image_aligns_with_padding():
    """A face filling a 40×48 image: the quad leaves the image on all sides and padding fills it in."""
    lm = canonical_landmarks(100).astype(np.float64) * 0.4
    img = np.random.default_rng(1).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    out = align_face(img, lm, 128, 512)
    assert out.image.shape == (128, 128, 3) and out.padded


# --- real photos ------------------------------------------------------------------------------------------------


def test_aligned_photo_near_canonical(obama_aligned):
    _, a = obama_aligned
    err = np.linalg.norm(a.landmarks - canonical_landmarks(SIZE), axis=1).mean() / SIZE
    assert err < 0.04  # a real face deviates from the mean shape by a few percent of the crop


@pytest.mark.parametrize("angle,scale,shift", [(12, 0.8, (-40, 25)), (-20, 1.1, (30, -10)), (0, 0.6, (0, 0))])
def test_aligned_output_invariant_to_similarity(hog, photos, obama_aligned, angle, scale, shift):
    """A rotated/scaled/shifted copy of the photo aligns to (nearly) the same crop as the original."""
    import cv2

    face, ref = obama_aligned
    img = photos["obama"]
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += shift
    copy = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    faces = hog.detect(copy)
    assert len(faces) == 1
    out = align_face(copy, faces[0].landmarks, SIZE, 4 * SIZE)
    # the original's landmarks, carried into the copy and then into its aligned crop, sit where the original's did
    moved = face.landmarks @ m[:, :2].T + m[:, 2]
    err = np.linalg.norm(out.transform.to_aligned(moved) - ref.landmarks, axis=1).mean()
    assert err < 0.01 * SIZE, err
    core = (slice(64, 224), slice(64, 192))  # the face; the background differs (reflect border of the copy)
    mad = np.abs(out.image[core].astype(float) - ref.image[core]).mean()
    other = align_face(photos["biden"], hog.detect(photos["biden"])[0].landmarks, SIZE, 4 * SIZE)
    mad_other = np.abs(other.image[core].astype(float) - ref.image[core]).mean()
    assert mad < 12 and mad < 0.4 * mad_other, (mad, mad_other)


def test_sideways_photo_aligns_like_upright(hog, photos, obama_aligned):
    face, ref = obama_aligned
    for turns in (1, 3):
        sideways = rotate_image(photos["obama"], turns)
        faces = hog.detect(sideways)
        assert len(faces) == 1 and faces[0].rotation in (90, 270)
        out = align_face(sideways, faces[0].landmarks, SIZE, 4 * SIZE)
        assert np.abs(out.image.astype(float) - ref.image).mean() < 1.0
        assert abs(((out.transform.rotation_deg - ref.transform.rotation_deg) % 360) - (90 * turns)) < 0.5


def test_exif_rotated_photo_aligns(hog, photos, obama_aligned, tmp_path):
    """A JPEG stored sideways with an EXIF orientation tag is read upright and aligns like the original."""
    from PIL import Image

    from mfim.imageio import read_rgb

    _, ref = obama_aligned
    stored = rotate_image(photos["obama"], 1)  # pixels stored turned 90° counter-clockwise ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and tagged "rotate 90° clockwise to display"
    path = tmp_path / "exif6.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    img = read_rgb(path)
    assert img.shape == photos["obama"].shape
    faces = hog.detect(img)
    assert len(faces) == 1 and faces[0].rotation == 0
    out = align_face(img, faces[0].landmarks, SIZE, 4 * SIZE)
    assert np.abs(out.image.astype(float) - ref.image).mean() < 4.0  # JPEG re-encoding only


def test_paste_back_reproduces_original(hog, photos):
    """Pasting the unmodified aligned crop back changes the photo little inside the face and not at all outside."""
    import cv2

    img = photos["obama"]
    face = hog.detect(img)[0]
    size = 512  # about the photo's own resolution (scale ~1.2), so that the round trip loses little detail
    a = align_face(img, face.landmarks, size, 4 * size)
    assert 0.8 < a.transform.scale < 1.5
    out = paste_back(img, a.image, a.transform)
    assert out.shape == img.shape and out.dtype == np.uint8
    # where the warped mask is fully on / off
    m = cv2.warpAffine(face_mask(size), a.transform.affine, (img.shape[1], img.shape[0]), flags=cv2.WARP_INVERSE_MAP)
    inside, outside = m > 0.99, m == 0
    assert inside.sum() > 0.5 * face.area
    err = np.abs(out.astype(float) - img)[inside].mean()
    assert err < 3.5, err  # resampling blur of the two warps only
    assert (out[outside] == img[outside]).all()
    # geometry, not just blur: moving the paste by half an aligned pixel either way makes it worse
    for dx, dy in [(0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5)]:
        moved = AlignTransform(a.transform.matrix + [[0, 0, dx], [0, 0, dy], [0, 0, 0]], size, a.transform.image_hw)
        worse = np.abs(paste_back(img, a.image, moved).astype(float) - img)[inside].mean()
        assert worse > err + 0.3, (dx, dy, worse, err)
    # a flat grey "generated" face replaces the face centre and leaves the background
    grey = np.full_like(a.image, 128)
    swapped = paste_back(img, grey, a.transform)
    cx, cy = a.transform.to_original(canonical_points(size)["mouth"][None])[0].round().astype(int)
    assert np.abs(swapped[cy, cx].astype(int) - 128).max() <= 1
    assert (swapped[outside] == img[outside]).all()


def test_paste_back_other_size_and_mask(hog, photos, obama_aligned):
    """A 1024 face for a 256 transform, and a user mask: the transform is rescaled, the mask respected."""
    face, a = obama_aligned
    img = photos["obama"]
    big = np.full((1024, 1024, 3), 200, np.uint8)
    mask = np.zeros((1024, 1024), np.float32)
    mask[400:600, 400:600] = 1.0
    out = paste_back(img, big, a.transform, mask=mask)
    centre = a.transform.to_original(np.array([[127.5, 127.5]]))[0].round().astype(int)
    assert (out[centre[1], centre[0]] == 200).all()
    eye = face.landmarks[36].round().astype(int)  # outside the square mask (aligned ~ (84, 121) of 256)
    assert (out[eye[1], eye[0]] == img[eye[1], eye[0]]).all()
    with pytest.raises(ValueError):
        paste_back(img[:-1], big, a.transform)
