"""dlib detection + 68 landmarks on real photos: stability, ordering, rotations, the predictor's mean shape."""

from __future__ import annotations

import numpy as np
import pytest

from mfim.nets.landmarks import DlibFaceLandmarker, eye_centres, read_dlib_mean_shape, rotate_image, unrotate_points


@pytest.fixture(scope="module")
def hog():
    return DlibFaceLandmarker("hog", upsample=1)


@pytest.fixture(scope="module")
def obama_face(hog, photos):
    faces = hog.detect(photos["obama"])
    assert len(faces) == 1
    return faces[0]


def test_face_fields(obama_face, photos):
    f = obama_face
    h, w = photos["obama"].shape[:2]
    assert f.landmarks.shape == (68, 2) and f.landmarks.dtype == np.float32
    assert f.box.shape == (4,) and f.rotation == 0
    # landmarks lie inside (or at most a little outside) the detected box, and eyes above the mouth
    x0, y0, x1, y1 = f.box
    margin = 0.15 * (x1 - x0)
    assert (f.landmarks[:, 0] > x0 - margin).all() and (f.landmarks[:, 0] < x1 + margin).all()
    assert (f.landmarks[:, 1] > y0 - margin).all() and (f.landmarks[:, 1] < y1 + margin).all()
    eyes = eye_centres(f.landmarks)
    assert eyes[0, 0] < eyes[1, 0]  # iBUG order: points 36-41 are on the image's left
    assert eyes[:, 1].max() < f.landmarks[48:68, 1].min()
    assert 60 < f.eye_distance < 200  # faces in these photos are 250-320 px wide


@pytest.mark.parametrize("dx,dy", [(7, -5), (-13, 9), (3, 21)])
def test_landmarks_stable_under_shift(hog, photos, obama_face, dx, dy):
    """Shifting the photo by a few pixels moves the landmarks by the same amount (within a few % of eye distance).

    A shift changes the HOG window grid and hence the detection box the predictor starts from, so this is a real
    stability check, not an identity."""
    img = photos["obama"]
    shifted = np.roll(img, (dy, dx), axis=(0, 1))
    faces = hog.detect(shifted)
    assert len(faces) == 1
    err = np.linalg.norm(faces[0].landmarks - (obama_face.landmarks + [dx, dy]), axis=1) / obama_face.eye_distance
    assert err.mean() < 0.03, err.mean()
    assert np.median(err) < 0.03


def test_hog_and_cnn_agree(photos, obama_face):
    """The MMOD CNN box differs from the HOG box the predictor was trained on; landmarks must still agree."""
    cnn = DlibFaceLandmarker("cnn", upsample=0, max_side=640)
    faces = cnn.detect(photos["obama"])
    assert len(faces) == 1
    err = np.linalg.norm(faces[0].landmarks - obama_face.landmarks, axis=1) / obama_face.eye_distance
    assert err.mean() < 0.05, err.mean()


def test_two_faces_largest_first(hog, photos):
    """Two photos side by side, the second downscaled: two faces, the bigger one first, each where it was pasted."""
    import cv2

    a = photos["obama"]
    b = cv2.resize(photos["biden"], None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    canvas = np.full((max(a.shape[0], b.shape[0]), a.shape[1] + b.shape[1], 3), 128, np.uint8)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1] :] = b
    faces = hog.detect(canvas)
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    assert faces[0].box[2] <= a.shape[1] + 5  # obama (bigger) on the left
    assert faces[1].box[0] >= a.shape[1] - 5
    assert faces[0].eye_distance > 1.3 * faces[1].eye_distance


def test_no_face(hog, rng):
    # a smooth gradient with noise: nothing face-like at any rotation
    yy, xx = np.mgrid[:240, :320]
    img = np.stack([xx * 0.7, yy * 0.9, (xx + yy) * 0.4], -1) + rng.normal(0, 4, (240, 320, 3))
    assert hog.detect(np.clip(img, 0, 255).astype(np.uint8)) == []


def test_unrotate_points_matches_rot90(rng):
    img = np.zeros((37, 53, 3), np.uint8)
    pts = np.array([[3, 5], [50, 30], [0, 36], [52, 0]])
    for x, y in pts:
        img[y, x] = 255
    for k in range(4):
        rot = rotate_image(img, k)
        ys, xs = np.nonzero(rot[..., 0])
        back = unrotate_points(np.stack([xs, ys], 1), k, img.shape[:2])
        assert sorted(map(tuple, back.astype(int))) == sorted(map(tuple, pts))


@pytest.mark.parametrize("turns,expected_rotation", [(3, 90), (1, 270)])
def test_sideways_photo(hog, photos, obama_face, turns, expected_rotation):
    """A photo lying on its side: found after turning it upright; landmarks come back in the sideways photo's pixels."""
    img = photos["obama"]
    sideways = rotate_image(img, turns)
    faces = hog.detect(sideways)
    assert len(faces) == 1
    assert faces[0].rotation == expected_rotation
    # where the upright landmarks are in the sideways photo
    expected = unrotate_points(obama_face.landmarks, (4 - turns) % 4, sideways.shape[:2])
    np.testing.assert_allclose(faces[0].landmarks, expected, atol=1e-3)
    # and the box contains them
    x0, y0, x1, y1 = faces[0].box
    assert x0 <= expected[:, 0].mean() <= x1 and y0 <= expected[:, 1].mean() <= y1


def test_rotation_search_can_be_disabled(photos):
    det = DlibFaceLandmarker("hog", try_rotations=False)
    assert det.detect(rotate_image(photos["obama"], 1)) == []


def test_large_photo_downscaled_search(photos, obama_face):
    """A photo upscaled 3× is searched on a downscaled copy; landmarks are predicted at full resolution."""
    import cv2

    big = cv2.resize(photos["obama"], None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    det = DlibFaceLandmarker("hog", upsample=0, max_side=1200)
    faces = det.detect(big)
    assert len(faces) == 1
    expected = (obama_face.landmarks + 0.5) * 3 - 0.5
    err = np.linalg.norm(faces[0].landmarks - expected, axis=1) / (3 * obama_face.eye_distance)
    assert err.mean() < 0.04


def test_dlib_mean_shape():
    from mfim.assets import resolve

    shape = read_dlib_mean_shape(resolve("dlib_landmarks68"))
    assert shape.shape == (68, 2)
    assert abs(shape[8, 0] - 0.5) < 0.01  # chin tip on the box's vertical midline
    # left/right symmetric about x = 0.5 (jaw point i mirrors 16-i)
    np.testing.assert_allclose(shape[0:17, 0] + shape[16::-1, 0], 1.0, atol=0.01)
    np.testing.assert_allclose(shape[0:17, 1], shape[16::-1, 1], atol=0.01)
    assert 0.0 < shape[:, 0].min() and shape[:, 0].max() < 1.0


def test_rejects_bad_array(hog):
    with pytest.raises(ValueError):
        hog.detect(np.zeros((50, 50), np.uint8))
