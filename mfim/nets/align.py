"""FFHQ alignment from the 68 dlib landmarks, with the exact transform so results can be mapped and pasted back.

The recipe is the one NVIDIA used to build FFHQ (ffhq-dataset ``recreate_aligned_images``), followed step by step so
that crops match what FFHQ-trained generators expect:

1. an oriented square ("quad") from the eye centres and the mouth-corner midpoint;
2. shrink: when the quad is more than 4× the output size, the photo is first downsampled by an integer factor;
3. crop: the quad's bounding box plus a 10% border;
4. pad: where the quad leaves the photo, reflect-pad, blur the padding and fade it to the median colour;
5. render the quad to ``transform_size``² (bilinear) and downsample to the output size (Lanczos).

Unlike the original script, every step also updates one 3×3 matrix, so ``AlignTransform`` maps original-image pixel
coordinates to aligned pixel coordinates exactly (to the resampling of step 2, which the matrix accounts for).
Pixel coordinates everywhere: pixel centres at integers, (x, y) order -- dlib's convention, and cv2.warpAffine's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# --- the oriented crop square ---------------------------------------------------------------------------------------


def key_points(landmarks: np.ndarray) -> dict[str, np.ndarray]:
    """Eye centres (mean of each eye's six points) and the midpoint of the outer mouth corners (48, 54)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    mouth = (lm[48] + lm[54]) * 0.5
    return {"eye_left": eye_left, "eye_right": eye_right, "mouth": mouth}


def ffhq_quad(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """The FFHQ crop square: corners (4, 2) top-left, bottom-left, bottom-right, top-right, and its side length.

    The square's x axis blends the eye-to-eye direction with the eye-to-mouth direction turned by 90°, so that both
    roll and a tilted mouth level it. Its half side is the larger of 2× the eye distance and 1.8× the eye-to-mouth
    distance; its centre sits 10% of the way from the eyes' midpoint to the mouth.
    """
    k = key_points(landmarks)
    eye_avg = (k["eye_left"] + k["eye_right"]) * 0.5
    eye_to_eye = k["eye_right"] - k["eye_left"]
    eye_to_mouth = k["mouth"] - eye_avg
    # (dx, dy) turned by -90° is (dy, -dx); subtracting it adds the mouth's "horizontal" evidence to eye_to_eye.
    x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
    x = x / np.hypot(*x)
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.array([-x[1], x[0]])  # x turned by +90° (image y points down)
    centre = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([centre - x - y, centre - x + y, centre + x + y, centre + x - y])
    return quad, float(np.hypot(*x) * 2.0)


def quad_to_unit_matrix(quad: np.ndarray) -> np.ndarray:
    """3×3 map from image pixel coordinates to the quad's unit square ((0,0) top-left corner, (1,1) bottom-right)."""
    q = np.asarray(quad, dtype=np.float64)
    unit_to_image = np.eye(3)
    unit_to_image[:2, 0] = q[3] - q[0]  # along the top edge
    unit_to_image[:2, 1] = q[1] - q[0]  # down the left edge
    unit_to_image[:2, 2] = q[0]
    return np.linalg.inv(unit_to_image)


def _unit_to_pixels(size: int) -> np.ndarray:
    """Unit square -> pixel coordinates of a size×size image: the unit square covers the pixels' outer edges."""
    return np.array([[size, 0.0, -0.5], [0.0, size, -0.5], [0.0, 0.0, 1.0]])


def _translate(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _resize_matrix(old_wh: tuple[int, int], new_wh: tuple[int, int]) -> np.ndarray:
    """Pixel-coordinate map of an image resize (PIL and cv2 both scale pixel edges, not centres)."""
    sx, sy = new_wh[0] / old_wh[0], new_wh[1] / old_wh[1]
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    return p @ matrix[:2, :2].T + matrix[:2, 2]


# --- the transform object -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignTransform:
    """Original-image pixel coordinates -> aligned (size×size) pixel coordinates; a similarity transform.

    matrix: 3×3 float64 (last row 0 0 1). image_hw: (H, W) of the original image.
    """

    matrix: np.ndarray
    size: int
    image_hw: tuple[int, int]

    @property
    def inverse(self) -> np.ndarray:
        """3×3 aligned -> original."""
        return np.linalg.inv(self.matrix)

    @property
    def affine(self) -> np.ndarray:
        """2×3 original -> aligned (cv2 layout)."""
        return self.matrix[:2].copy()

    @property
    def scale(self) -> float:
        """Aligned pixels per original pixel."""
        return float(np.sqrt(abs(np.linalg.det(self.matrix[:2, :2]))))

    @property
    def rotation_deg(self) -> float:
        """In-plane angle (degrees) by which the original is turned counter-clockwise on screen to level the face."""
        return float(np.degrees(np.arctan2(self.matrix[1, 0], self.matrix[0, 0])))

    def to_aligned(self, points: np.ndarray) -> np.ndarray:
        return _apply(self.matrix, points)

    def to_original(self, points: np.ndarray) -> np.ndarray:
        return _apply(self.inverse, points)

    def resized(self, size: int) -> "AlignTransform":
        """The same crop for the aligned image resized to size×size (e.g. a generator's 1024 output)."""
        m = _resize_matrix((self.size, self.size), (size, size)) @ self.matrix
        return AlignTransform(m, int(size), self.image_hw)

    def to_list(self) -> list[float]:
        """The 2×3 original -> aligned matrix row-major (6 floats), as stored in tables."""
        return [float(v) for v in self.matrix[:2].reshape(-1)]

    @classmethod
    def from_list(cls, values, size: int, image_hw: tuple[int, int]) -> "AlignTransform":
        m = np.eye(3)
        m[:2] = np.asarray(values, dtype=np.float64).reshape(2, 3)
        return cls(m, int(size), (int(image_hw[0]), int(image_hw[1])))


@dataclass
class AlignedFace:
    image: np.ndarray  # size×size×3 uint8
    transform: AlignTransform
    landmarks: np.ndarray  # float32 (68, 2) in aligned pixel coordinates
    padded: bool  # the quad left the photo and the reflect-pad + blur filled it in


# --- the recipe -----------------------------------------------------------------------------------------------------


def effective_transform_size(output_size: int, transform_size: int | None) -> int:
    """The quad render size: the official 4096 for 1024 output is 4× oversampling; never more, never below output."""
    t = 4 * output_size if transform_size is None else int(transform_size)
    return int(max(output_size, min(t, 4 * output_size)))


@dataclass(frozen=True)
class AlignPlan:
    """Integer decisions of the recipe for one face, computed from landmarks and image size alone."""

    shrink: int
    shrunk_wh: tuple[int, int]
    crop: tuple[int, int, int, int]  # x0, y0, x1, y1 in the shrunk image
    pad: tuple[int, int, int, int]  # left, top, right, bottom (all 0: no padding)
    quad: np.ndarray  # (4, 2) in the padded working image
    qsize: float  # quad side in the working image
    transform_size: int
    transform: AlignTransform


def plan_alignment(
    landmarks: np.ndarray,
    image_hw: tuple[int, int],
    output_size: int = 1024,
    transform_size: int | None = 4096,
    enable_padding: bool = True,
) -> AlignPlan:
    h, w = int(image_hw[0]), int(image_hw[1])
    quad, qsize = ffhq_quad(landmarks)
    to_work = np.eye(3)  # original pixel coords -> working-image pixel coords, updated by every step

    # Shrink: an integer factor keeps the later steps' cost bounded by the output size, not the photo size.
    shrink = int(np.floor(qsize / output_size * 0.5))
    wh = (w, h)
    if shrink > 1:
        wh = (int(np.rint(w / shrink)), int(np.rint(h / shrink)))
        to_work = _resize_matrix((w, h), wh) @ to_work
        # The recipe divides the quad by the integer factor (not by the rounded resize ratio); keep that.
        quad = quad / shrink
        qsize = qsize / shrink
    else:
        shrink = 1

    # Crop to the quad's bounding box plus a border (only when that is smaller than the image).
    border = max(int(np.rint(qsize * 0.1)), 3)
    x0, y0 = int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min()))
    x1, y1 = int(np.ceil(quad[:, 0].max())), int(np.ceil(quad[:, 1].max()))
    crop = (max(x0 - border, 0), max(y0 - border, 0), min(x1 + border, wh[0]), min(y1 + border, wh[1]))
    if crop[2] - crop[0] < wh[0] or crop[3] - crop[1] < wh[1]:
        quad = quad - np.array(crop[:2], dtype=np.float64)
        to_work = _translate(-crop[0], -crop[1]) @ to_work
    else:
        crop = (0, 0, wh[0], wh[1])
    cw, ch = crop[2] - crop[0], crop[3] - crop[1]

    # Pad where the quad (plus border) leaves the cropped image.
    x0, y0 = int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min()))
    x1, y1 = int(np.ceil(quad[:, 0].max())), int(np.ceil(quad[:, 1].max()))
    pad = (max(-x0 + border, 0), max(-y0 + border, 0), max(x1 - cw + border, 0), max(y1 - ch + border, 0))
    if enable_padding and max(pad) > border - 4:
        pad = tuple(int(v) for v in np.maximum(pad, int(np.rint(qsize * 0.3))))
        quad = quad + np.array(pad[:2], dtype=np.float64)
        to_work = _translate(pad[0], pad[1]) @ to_work
    else:
        pad = (0, 0, 0, 0)

    t = effective_transform_size(output_size, transform_size)
    # Rendering the quad at t and resizing to output_size maps the quad's unit square onto the output's pixel edges.
    matrix = _unit_to_pixels(output_size) @ quad_to_unit_matrix(quad) @ to_work
    return AlignPlan(
        shrink, wh, crop, pad, quad, qsize, t, AlignTransform(matrix, int(output_size), (h, w))
    )


def _blur_pad(img: np.ndarray, pad: tuple[int, int, int, int], qsize: float) -> np.ndarray:
    """Reflect-pad, then blur and fade towards the median colour with distance into the padding (FFHQ recipe)."""
    import cv2

    left, top, right, bottom = pad
    work = np.pad(img.astype(np.float32), ((top, bottom), (left, right), (0, 0)), mode="reflect")
    h, w = work.shape[:2]
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    # 0 inside the photo, rising to 1 at the padded image's edge.
    fade_x = 1.0 - np.minimum(xx / left, (w - 1 - xx) / right)
    fade_y = 1.0 - np.minimum(yy / top, (h - 1 - yy) / bottom)
    fade = np.maximum(fade_x, fade_y)[..., None]
    sigma = qsize * 0.02
    # The original uses scipy.ndimage.gaussian_filter (truncated at 4 sigma, half-sample reflection at the edges);
    # an explicit separable kernel reproduces it to 1e-4 and runs several times faster.
    radius = int(4.0 * sigma + 0.5)
    kernel = cv2.getGaussianKernel(2 * radius + 1, sigma, cv2.CV_64F).ravel()
    blurred = cv2.sepFilter2D(work, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_REFLECT)
    work += (blurred - work) * np.clip(fade * 3.0 + 1.0, 0.0, 1.0)
    work += (np.median(work, axis=(0, 1)) - work) * np.clip(fade, 0.0, 1.0)
    return np.clip(np.rint(work), 0, 255).astype(np.uint8)


def render_plan(img: np.ndarray, plan: AlignPlan) -> np.ndarray:
    """Carry out a plan on the image it was made for; returns size×size×3 uint8."""
    pil = Image.fromarray(np.ascontiguousarray(img))
    if plan.shrink > 1:
        pil = pil.resize(plan.shrunk_wh, Image.Resampling.LANCZOS)
    if plan.crop != (0, 0, pil.size[0], pil.size[1]):
        pil = pil.crop(plan.crop)
    if max(plan.pad) > 0:
        pil = Image.fromarray(_blur_pad(np.asarray(pil), plan.pad, plan.qsize))
    t = plan.transform_size
    # PIL's QUAD samples the source at continuous coordinates (pixel centres at +0.5), hence the shift.
    pil = pil.transform((t, t), Image.Transform.QUAD, (plan.quad + 0.5).flatten().tolist(), Image.Resampling.BILINEAR)
    size = plan.transform.size
    if size < t:
        pil = pil.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(pil)


def align_face(
    img: np.ndarray,
    landmarks: np.ndarray,
    output_size: int = 1024,
    transform_size: int | None = 4096,
    enable_padding: bool = True,
) -> AlignedFace:
    """FFHQ-align the face with these 68 landmarks (pixels of img, an H×W×3 uint8 RGB image)."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 uint8 RGB image, got {img.dtype} {img.shape}")
    plan = plan_alignment(landmarks, img.shape[:2], output_size, transform_size, enable_padding)
    out = render_plan(img, plan)
    lm = plan.transform.to_aligned(landmarks).astype(np.float32)
    return AlignedFace(out, plan.transform, lm, padded=max(plan.pad) > 0)


def align_batch(images, landmarks_list, output_size: int = 1024, **kw) -> list[AlignedFace]:
    """``align_face`` over lists (each image with its own size and landmarks)."""
    return [align_face(img, lm, output_size, **kw) for img, lm in zip(images, landmarks_list)]


# --- canonical FFHQ-aligned landmark positions ----------------------------------------------------------------------

# The dlib 68-point predictor's mean shape (the shape its cascade starts from, read from
# shape_predictor_68_face_landmarks.dat by mfim.nets.landmarks.read_dlib_mean_shape) put through the FFHQ quad, as
# fractions of the aligned crop: pixel coordinate = fraction × size − 0.5. Regenerate with
# canonical_fractions_from_shape(read_dlib_mean_shape(path)); tests check this table against the file.
CANONICAL_FRACTIONS = np.array(
    # fmt: off
    [
        [0.2137, 0.4776], [0.2157, 0.5533], [0.2238, 0.6287], [0.2395, 0.7027], [0.2690, 0.7714],
        [0.3143, 0.8310], [0.3697, 0.8807], [0.4308, 0.9206], [0.5000, 0.9324], [0.5692, 0.9206],
        [0.6303, 0.8807], [0.6857, 0.8310], [0.7310, 0.7714], [0.7605, 0.7027], [0.7762, 0.6287],
        [0.7843, 0.5533], [0.7862, 0.4776], [0.2683, 0.4222], [0.3038, 0.3902], [0.3539, 0.3807],
        [0.4058, 0.3881], [0.4543, 0.4083], [0.5457, 0.4083], [0.5942, 0.3881], [0.6461, 0.3807],
        [0.6962, 0.3902], [0.7317, 0.4222], [0.5000, 0.4676], [0.5000, 0.5164], [0.5000, 0.5647],
        [0.5000, 0.6145], [0.4419, 0.6481], [0.4698, 0.6584], [0.5000, 0.6672], [0.5302, 0.6584],
        [0.5581, 0.6481], [0.3259, 0.4737], [0.3569, 0.4559], [0.3941, 0.4564], [0.4266, 0.4810],
        [0.3918, 0.4872], [0.3548, 0.4867], [0.5734, 0.4810], [0.6059, 0.4564], [0.6431, 0.4559],
        [0.6741, 0.4737], [0.6452, 0.4867], [0.6082, 0.4872], [0.3887, 0.7386], [0.4297, 0.7223],
        [0.4711, 0.7138], [0.5000, 0.7209], [0.5289, 0.7138], [0.5703, 0.7223], [0.6113, 0.7386],
        [0.5716, 0.7786], [0.5314, 0.7964], [0.5000, 0.7997], [0.4686, 0.7964], [0.4284, 0.7786],
        [0.4058, 0.7408], [0.4708, 0.7379], [0.5000, 0.7410], [0.5292, 0.7379], [0.5942, 0.7408],
        [0.5298, 0.7597], [0.5000, 0.7633], [0.4702, 0.7597],
    ],
    # fmt: on
    dtype=np.float64,
)


def canonical_fractions_from_shape(shape68: np.ndarray) -> np.ndarray:
    """Where the FFHQ recipe puts a 68-point shape: fractions (68, 2) of the aligned crop (ideal quad, no rounding)."""
    quad, _ = ffhq_quad(shape68)
    return _apply(quad_to_unit_matrix(quad), shape68)


def canonical_landmarks(size: int) -> np.ndarray:
    """float32 (68, 2): the dlib mean face in FFHQ-aligned pixel coordinates of a size×size crop."""
    return (CANONICAL_FRACTIONS * size - 0.5).astype(np.float32)


def canonical_points(size: int) -> dict[str, np.ndarray]:
    """Named key points of the canonical aligned face (pixels of a size×size crop), image-left first.

    eye_left / eye_right: eye centres (mean of each eye's six points); nose: nose tip (30); mouth_left /
    mouth_right: outer mouth corners (48, 54); mouth: their midpoint. Image-left is the subject's right. The first
    five in the order eye_left, eye_right, nose, mouth_left, mouth_right are the ArcFace 5-point template order.
    """
    lm = canonical_landmarks(size).astype(np.float64)
    k = key_points(lm)
    return {
        "eye_left": k["eye_left"],
        "eye_right": k["eye_right"],
        "nose": lm[30],
        "mouth_left": lm[48],
        "mouth_right": lm[54],
        "mouth": k["mouth"],
    }


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """(5, 2) ArcFace-order points from 68 landmarks: eye centres, nose tip, outer mouth corners."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (3×3) mapping points src -> dst (Umeyama, no reflection)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    flip = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ flip @ vt
    scale = np.trace(np.diag(sig) @ flip) / s.var(0).sum()
    m = np.eye(3)
    m[:2, :2] = scale * rot
    m[:2, 2] = mu_d - scale * rot @ mu_s
    return m


# --- pasting a face back --------------------------------------------------------------------------------------------


def face_mask(size: int, landmarks: np.ndarray | None = None, feather: float = 0.04) -> np.ndarray:
    """Soft face mask (size×size float32 in [0, 1]) in aligned coordinates.

    The region is the convex hull of the jaw line and of the brows lifted by 60% of the eye-to-mouth distance (to
    take in the forehead); it is shrunk by ``feather``×size and blurred by half that, so the transition lies inside
    the face outline. landmarks: (68, 2) aligned coordinates (default: the
    canonical face).
    """
    import cv2

    lm = canonical_landmarks(size) if landmarks is None else np.asarray(landmarks, dtype=np.float32)
    k = key_points(lm)
    eye_to_mouth = k["mouth"] - (k["eye_left"] + k["eye_right"]) * 0.5
    forehead = lm[17:27] - 0.6 * eye_to_mouth
    hull = cv2.convexHull(np.concatenate([lm[0:17], forehead]).astype(np.float32))
    mask = np.zeros((size, size), np.uint8)
    shift = 4  # sub-pixel polygon rasterisation
    cv2.fillConvexPoly(mask, np.round(hull * (1 << shift)).astype(np.int32), 255, cv2.LINE_AA, shift)
    width = max(1, int(round(feather * size)))
    mask = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1)))
    soft = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), width / 2.0)
    return np.clip(soft, 0.0, 1.0)


def paste_back(
    original: np.ndarray,
    aligned_face: np.ndarray,
    transform: AlignTransform,
    mask: np.ndarray | None = None,
    feather: float = 0.04,
) -> np.ndarray:
    """Blend an aligned face (e.g. a generated swap) into the original photo it was aligned from.

    aligned_face: S×S×3 uint8 of any size S (the transform is rescaled to it). mask: S×S float in [0, 1] (or uint8
    0..255, or bool) in aligned coordinates; default ``face_mask(S, feather=feather)``. Returns a new H×W×3 uint8.
    """
    import cv2

    original = np.asarray(original)
    face = np.asarray(aligned_face)
    h, w = original.shape[:2]
    if (h, w) != tuple(transform.image_hw):
        raise ValueError(f"transform was made for a {transform.image_hw} image, original is {(h, w)}")
    s = face.shape[0]
    if face.shape[:2] != (s, s):
        raise ValueError(f"aligned face must be square, got {face.shape}")
    if mask is None:
        mask = face_mask(s, feather=feather)
    else:
        mask = np.asarray(mask)
        mask = mask.astype(np.float32) / (255.0 if mask.dtype == np.uint8 else 1.0)
        if mask.shape[:2] != (s, s):
            mask = cv2.resize(mask, (s, s), interpolation=cv2.INTER_LINEAR)
        mask = mask.reshape(s, s)
    tf = transform.resized(s)
    # A face much finer than its place in the photo would alias under bilinear warping: downsample it first.
    target = int(round(s / tf.scale)) if tf.scale > 1.5 else s
    if target < s:
        face = cv2.resize(face, (target, target), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, (target, target), interpolation=cv2.INTER_AREA)
        tf = tf.resized(target)
        s = target

    # Only the photo region the aligned square covers needs warping (photos can be tens of megapixels).
    corners = tf.to_original(np.array([[-0.5, -0.5], [s - 0.5, -0.5], [-0.5, s - 0.5], [s - 0.5, s - 0.5]]))
    x0 = int(np.clip(np.floor(corners[:, 0].min()) - 1, 0, w))
    y0 = int(np.clip(np.floor(corners[:, 1].min()) - 1, 0, h))
    x1 = int(np.clip(np.ceil(corners[:, 0].max()) + 2, 0, w))
    y1 = int(np.clip(np.ceil(corners[:, 1].max()) + 2, 0, h))
    out = original.copy()
    if x1 <= x0 or y1 <= y0:
        return out
    region_to_aligned = (tf.matrix @ _translate(x0, y0))[:2]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    size = (x1 - x0, y1 - y0)
    warped = cv2.warpAffine(face, region_to_aligned, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(mask, region_to_aligned, size, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = np.clip(alpha, 0.0, 1.0)[..., None]
    region = out[y0:y1, x0:x1].astype(np.float32)
    blended = region + (warped.astype(np.float32) - region) * alpha
    out[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out
