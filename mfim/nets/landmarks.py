"""Face detection (dlib HOG or MMOD CNN) and the 68 iBUG landmarks (dlib shape predictor).

The FFHQ alignment recipe was defined on exactly these 68 dlib points, so everything downstream (mfim.nets.align)
starts here. Coordinates follow the project convention: float32 (68, 2), (x, y) in pixels of the image the face was
found in, pixel centres at integer coordinates (dlib's own convention).

Two practical additions to plain dlib:
* large photos are searched for faces on a downscaled copy (dlib HOG/CNN time and memory grow with the pixel count;
  a 12 MP photo takes seconds with HOG and minutes with the CNN on CPU), but landmarks are always predicted on the
  full-resolution image;
* when no face is found upright, the image is searched again rotated by 90, 270 and 180 degrees (a phone photo whose
  EXIF orientation was lost); landmarks are mapped back to the original image and ``Face.rotation`` says which
  rotation found the face.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mfim.nets.dlib_format import Reader

N_LANDMARKS = 68
# Order in which rotations are tried when the upright image has no face: a sideways photo is far more common than
# an upside-down one. Values are counter-clockwise quarter turns as in np.rot90.
ROTATION_ORDER = (1, 3, 2)


@dataclass
class Face:
    """One detected face.

    box: float32 (4,) x0, y0, x1, y1 in pixels of the original image (may extend past the image border).
    score: detector confidence (HOG SVM score or MMOD confidence; larger is surer, scales differ between detectors).
    landmarks: float32 (68, 2) iBUG-68 points, (x, y) in pixels of the original image.
    rotation: degrees (0, 90, 180, 270) by which the image had to be turned counter-clockwise for the detector to
        find this face; 0 for an upright photo.
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    rotation: int = 0

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return float(max(x1 - x0, 0.0) * max(y1 - y0, 0.0))

    @property
    def eye_distance(self) -> float:
        """Distance between the two eye centres (mean of points 36-41 and 42-47), in pixels."""
        return float(np.linalg.norm(eye_centres(self.landmarks)[1] - eye_centres(self.landmarks)[0]))

    def to_dict(self) -> dict:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 4),
            "rotation": int(self.rotation),
            "landmarks": np.round(self.landmarks.astype(np.float64), 2).tolist(),
        }


def eye_centres(landmarks: np.ndarray) -> np.ndarray:
    """(2, 2): centre of the eye on the image's left (points 36-41) and on its right (42-47)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0)])


def rotate_image(img: np.ndarray, quarter_turns: int) -> np.ndarray:
    """Counter-clockwise rotation by 90° × quarter_turns (np.rot90 on the first two axes), contiguous for dlib."""
    return np.ascontiguousarray(np.rot90(img, quarter_turns % 4, axes=(0, 1)))


def unrotate_points(points: np.ndarray, quarter_turns: int, original_hw: tuple[int, int]) -> np.ndarray:
    """Map (x, y) points found in ``rotate_image(img, k)`` back to ``img`` (shape original_hw = (H, W))."""
    h, w = original_hw
    p = np.asarray(points, dtype=np.float64)
    x, y = p[..., 0], p[..., 1]
    k = quarter_turns % 4
    if k == 0:
        ox, oy = x, y
    elif k == 1:  # rotated[i, j] = img[j, W-1-i]
        ox, oy = w - 1 - y, x
    elif k == 2:  # rotated[i, j] = img[H-1-i, W-1-j]
        ox, oy = w - 1 - x, h - 1 - y
    else:  # rotated[i, j] = img[H-1-j, i]
        ox, oy = y, h - 1 - x
    return np.stack([ox, oy], axis=-1)


def _box_from_corners(corners: np.ndarray) -> np.ndarray:
    return np.array([corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max()], np.float32)


class DlibFaceLandmarker:
    """dlib face detector + 68-point shape predictor.

    detector: 'hog' (dlib frontal face detector; fast, misses faces beyond ~30° yaw) or 'cnn' (dlib MMOD CNN;
        better at large pose, ~20× slower on CPU).
    upsample: dlib upsampling passes (each halves the smallest findable face: ~80 px at 0, ~40 px at 1).
    max_side: faces are searched on a copy whose longer side is at most this many pixels (None: never downscale).
    try_rotations: search the 90/270/180° rotated image when the upright one has no face.
    """

    def __init__(
        self,
        detector: str = "hog",
        upsample: int = 1,
        max_side: int | None = 1024,
        try_rotations: bool = True,
        predictor_path: str | Path | None = None,
        cnn_path: str | Path | None = None,
    ):
        import dlib

        from mfim.assets import resolve

        if detector not in ("hog", "cnn"):
            raise ValueError(f"detector must be 'hog' or 'cnn', got {detector!r}")
        self.detector_name = detector
        self.upsample = int(upsample)
        self.max_side = max_side
        self.try_rotations = try_rotations
        self._predictor = dlib.shape_predictor(str(resolve("dlib_landmarks68", predictor_path)))
        if detector == "hog":
            self._detector = dlib.get_frontal_face_detector()
        else:
            self._detector = dlib.cnn_face_detection_model_v1(str(resolve("dlib_cnn_detector", cnn_path)))

    # --- detection -----------------------------------------------------------------------------------------------
    def _boxes(self, img: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """(box x0,y0,x1,y1 in img pixels, score) for every face the detector finds in img."""
        h, w = img.shape[:2]
        scale = 1.0
        search = img
        if self.max_side and max(h, w) > self.max_side:
            import cv2

            scale = self.max_side / max(h, w)
            search = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        search = np.ascontiguousarray(search)
        found: list[tuple[np.ndarray, float]] = []
        if self.detector_name == "hog":
            rects, scores, _ = self._detector.run(search, self.upsample, 0.0)
            pairs = zip(rects, scores)
        else:
            pairs = ((d.rect, d.confidence) for d in self._detector(search, self.upsample))
        for r, s in pairs:
            # dlib rectangles are inclusive pixel ranges; map both edges through the resize scale.
            box = np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], np.float64)
            box = (box + 0.5) / scale - 0.5 if scale != 1.0 else box
            found.append((box.astype(np.float32), float(s)))
        return found

    def landmarks_in_box(self, img: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """68 landmarks (float32 (68, 2)) predicted inside a given box (x0, y0, x1, y1) of img."""
        import dlib

        x0, y0, x1, y1 = (float(v) for v in box)
        rect = dlib.rectangle(round(x0), round(y0), round(x1) - 1, round(y1) - 1)
        shape = self._predictor(np.ascontiguousarray(img), rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)

    def _detect_upright(self, img: np.ndarray) -> list[Face]:
        faces = [Face(box, score, self.landmarks_in_box(img, box)) for box, score in self._boxes(img)]
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def detect(self, img: np.ndarray) -> list[Face]:
        """Every face in an H×W×3 uint8 RGB image, largest first (empty list: no face)."""
        img = _check_rgb8(img)
        faces = self._detect_upright(img)
        if faces or not self.try_rotations:
            return faces
        h, w = img.shape[:2]
        for k in ROTATION_ORDER:
            found = self._detect_upright(rotate_image(img, k))
            if not found:
                continue
            out = []
            for f in found:
                x0, y0, x1, y1 = f.box
                corners = np.array([[x0, y0], [x1 - 1, y0], [x0, y1 - 1], [x1 - 1, y1 - 1]], np.float64)
                back = unrotate_points(corners, k, (h, w))
                box = _box_from_corners(back) + np.array([0, 0, 1, 1], np.float32)
                lm = unrotate_points(f.landmarks, k, (h, w)).astype(np.float32)
                out.append(Face(box, f.score, lm, rotation=90 * k))
            return sorted(out, key=lambda f: f.area, reverse=True)
        return []

    def __call__(self, img: np.ndarray) -> list[Face]:
        return self.detect(img)

    def detect_many(self, images: Iterable[np.ndarray]) -> list[list[Face]]:
        """``detect`` over several images (dlib has no CPU batching worth using; this keeps callers simple)."""
        return [self.detect(img) for img in images]

    def largest(self, img: np.ndarray) -> Face | None:
        faces = self.detect(img)
        return faces[0] if faces else None


def _check_rgb8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 uint8 RGB image, got {img.dtype} {img.shape}")
    return np.ascontiguousarray(img)


def read_dlib_mean_shape(predictor_path: str | Path) -> np.ndarray:
    """The mean shape (float64 (68, 2)) a dlib shape predictor starts its cascade from, in box-normalised units.

    dlib serialises ``shape_predictor`` as: version (int), initial_shape (float column vector x0,y0,x1,y1,...),
    forests, ... in dlib's encoding (mfim.nets.dlib_format); a matrix is -rows, -cols, elements. Only the first few
    kilobytes are read.
    """
    with open(predictor_path, "rb") as f:
        r = Reader(f.read(16384), str(predictor_path))
    version = r.integer()
    rows, cols = abs(r.integer()), abs(r.integer())
    if version != 1 or rows != 2 * N_LANDMARKS or cols != 1:
        raise ValueError(f"{predictor_path}: not a dlib 68-point shape predictor (version {version}, {rows}x{cols})")
    values = [r.real() for _ in range(rows)]
    return np.array(values, dtype=np.float64).reshape(N_LANDMARKS, 2)
