"""The embedded default data set: faces rendered from the Basel Face Model, with exact ground truth.

An identity is a set of BFM shape coefficients plus skin / lip / iris / brow colours; each image of it draws an
expression, a head pose, a light and a placement on a larger canvas with a random (non-face) background, like a
photo before alignment. The ground truth is the parameters themselves, in 3DDFA_V2's units and convention
(``mfim.nets.bfm``), and the 68 landmark vertices projected into the image.

Everything is deterministic from ``synthesize.seed``: identity ``i`` draws from the seed sequence (seed, 0, i) and
its image ``j`` from (seed, 1, i, j), so the result does not depend on worker count or order.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import torch

from mfim.data.render import composite, lambert, render_mesh, vertex_normals
from mfim.nets.bfm import BFMModel, load_bfm, pose_matrix, tddfa_coefficient_stats
from mfim.nets.types import N_EXP, N_SHAPE

SOURCE = "mfim-bfm-render"
SPLITS = ("train", "eval")

# iBUG-68 landmark groups used to paint the face.
JAW = list(range(0, 17))
RIGHT_BROW, LEFT_BROW = list(range(17, 22)), list(range(22, 27))  # subject's right = image left
RIGHT_EYE, LEFT_EYE = list(range(36, 42)), list(range(42, 48))
OUTER_LIPS, INNER_LIPS = list(range(48, 60)), list(range(60, 68))
MIRROR_LANDMARKS = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 16, -1))  # brows
    + [27, 28, 29, 30]  # nose bridge
    + [35, 34, 33, 32, 31]  # nostrils
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]  # eyes
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65]  # inner lips
)
"""Index permutation that maps iBUG-68 landmarks of a face to those of its horizontal mirror image."""

# Skin tones between these two. The dark end is a compromise: darker albedo under these lights dropped dlib's HOG
# detection (the `align` stage) well below that of light faces (misses averaged 0.40 mean RGB vs 0.57 for hits).
SKIN_LIGHT, SKIN_DARK = np.array([0.94, 0.79, 0.68]), np.array([0.42, 0.27, 0.18])
IRIS_PALETTE = np.array(  # brown, dark brown, hazel, green, blue, grey
    [[0.33, 0.19, 0.09], [0.17, 0.10, 0.05], [0.45, 0.34, 0.16], [0.30, 0.40, 0.24], [0.30, 0.45, 0.62],
     [0.45, 0.50, 0.55]]
)  # fmt: skip
HAIR_PALETTE = np.array(  # black, dark brown, brown, blond, red, grey
    [[0.07, 0.05, 0.04], [0.18, 0.11, 0.07], [0.33, 0.21, 0.11], [0.58, 0.46, 0.28], [0.48, 0.23, 0.11],
     [0.55, 0.54, 0.52]]
)  # fmt: skip


@dataclass(frozen=True)
class SynthConfig:
    """params.yaml group ``synthesize``."""

    seed: int
    identities_train: int
    identities_eval: int
    # First eval identity id (None: right after the train ids). Fixing it lets identities_train grow while the eval
    # people stay the same renders; train ids then skip the eval block.
    eval_identity_offset: int | None
    images_per_identity: int
    canvas: int
    face_size: tuple[float, float]
    shape_sigma: float
    expression_sigma: float
    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    render_workers: int
    supersample: int  # anti-aliasing of the face edge (k×k samples per pixel)

    @classmethod
    def from_params(cls, group: dict) -> "SynthConfig":
        """From the validated ``synthesize`` group (mfim.params_schema: every key present, none unknown)."""
        return cls(**{**{f.name: group[f.name] for f in fields(cls)},
                      "face_size": tuple(float(x) for x in group["face_size"])})

    def identities(self) -> list[tuple[int, str]]:
        """(identity id, split): train ids, then eval ids; the splits never share an identity."""
        n_train, n_eval = self.identities_train, self.identities_eval
        start = n_train if self.eval_identity_offset is None else int(self.eval_identity_offset)
        if start < 0:
            raise ValueError(f"synthesize.eval_identity_offset must be >= 0, got {start}")
        evals = range(start, start + n_eval)
        train = list(itertools.islice((i for i in itertools.count() if i not in evals), n_train))
        return [(i, "train") for i in train] + [(i, "eval") for i in evals]


@dataclass
class Identity:
    """Who a face is: BFM shape coefficients and colours (RGB in [0, 1])."""

    identity: int
    shape: np.ndarray  # (40,)
    skin_rgb: np.ndarray
    lip_rgb: np.ndarray
    iris_rgb: np.ndarray
    brow_rgb: np.ndarray
    brow_thickness: float  # multiplier of the default brow width


@dataclass
class ImageSpec:
    """What varies per image of an identity."""

    exp: np.ndarray  # (10,)
    pose: np.ndarray  # (yaw, pitch, roll) radians, roll = in-plane rotation on the canvas
    face_width: float  # px, jaw width of the mean face at this scale
    position: np.ndarray  # (u, v) in [0, 1]: where in its feasible range (landmarks inside the canvas) the face sits
    light: np.ndarray  # unit direction towards the light, camera frame (x right, y up, z to viewer)
    ambient: float
    diffuse: float


@dataclass
class FaceRender:
    image: np.ndarray  # H×W×3 uint8
    mask: np.ndarray  # H×W bool, face coverage >= 0.5
    landmarks: np.ndarray  # 68×2 float32, (x, y) image pixels
    pose_matrix: np.ndarray  # 3×4 float64 [s·R | t], image row = canvas - y
    render_ms: float

    @property
    def face_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the face mask, x1/y1 exclusive."""
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# --------------------------------------------------------------------------------------------------------------------
# Painting: per-vertex colour regions from the landmark vertices of the mean face.


def _segment_distance(points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """N×K distances from N points to K segments (2-D), and N×K position along each segment in [0, 1]."""
    d = ends - starts
    rel = points[:, None, :] - starts[None]
    t = np.clip((rel * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12), 0.0, 1.0)
    return np.linalg.norm(rel - t[..., None] * d, axis=-1), t


def _polygon_signed_distance(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Distance to a closed polygon's outline, positive inside (even-odd rule)."""
    starts, ends = polygon, np.roll(polygon, -1, axis=0)
    dist, _ = _segment_distance(points, starts, ends)
    x, y = points[:, 0:1], points[:, 1:2]
    crosses = (starts[None, :, 1] > y) != (ends[None, :, 1] > y)
    x_at = starts[None, :, 0] + (y - starts[None, :, 1]) * (ends[None, :, 0] - starts[None, :, 0]) / (
        ends[None, :, 1] - starts[None, :, 1] + 1e-12
    )
    inside = (crosses & (x < x_at)).sum(1) % 2 == 1
    return np.where(inside, 1.0, -1.0) * dist.min(1)


def _smooth_inside(signed_distance: np.ndarray, feather: float) -> np.ndarray:
    """0 outside, 1 inside, a linear ramp of width ``feather`` centred on the outline."""
    return np.clip(0.5 + signed_distance / feather, 0.0, 1.0)


@dataclass
class FaceRegions:
    """Per-vertex weights in [0, 1] of the painted regions, fixed on the mean face (they move with expression)."""

    lips: np.ndarray
    mouth_gap: np.ndarray
    sclera: np.ndarray
    iris: np.ndarray
    pupil: np.ndarray
    lid_line: np.ndarray
    brow_distance: np.ndarray  # distance to the brow centre line divided by its local half-width
    cheeks: np.ndarray
    texture: np.ndarray  # (N, 2) frontal coordinates in mm, for low-frequency skin variation

    @classmethod
    def from_bfm(cls, bfm: BFMModel) -> "FaceRegions":
        mm = 1000.0  # BFM units are micrometres
        xy = bfm.mean_shape.numpy()[:, :2].astype(np.float64) / mm
        lm = xy[bfm.landmark_indices.numpy()]
        lips = _smooth_inside(_polygon_signed_distance(xy, lm[OUTER_LIPS]), 1.5)
        mouth_gap = _smooth_inside(_polygon_signed_distance(xy, lm[INNER_LIPS]) + 0.4, 0.8)
        sclera, iris, pupil, lid = (np.zeros(len(xy)) for _ in range(4))
        for eye in (RIGHT_EYE, LEFT_EYE):
            inside = _smooth_inside(_polygon_signed_distance(xy, lm[eye]), 0.6)
            width = np.linalg.norm(lm[eye[3]] - lm[eye[0]])
            # Irises look a little up-and-centre of the fissure; real iris radius ~5.8 mm on a ~25-30 mm fissure.
            center = lm[eye].mean(0) + np.array([0.0, 0.6])
            r = np.linalg.norm(xy - center, axis=1)
            iris_r = 0.23 * width
            sclera = np.maximum(sclera, inside)
            iris = np.maximum(iris, inside * np.clip((iris_r - r) / 0.5 + 0.5, 0, 1))
            pupil = np.maximum(pupil, inside * np.clip((0.4 * iris_r - r) / 0.5 + 0.5, 0, 1))
            upper_lid = lm[eye[:4]]
            dist, _ = _segment_distance(xy, upper_lid[:-1], upper_lid[1:])
            lid = np.maximum(lid, np.clip(1.0 - dist.min(1) / 0.9, 0, 1))
        brow = np.full(len(xy), np.inf)
        for ids in (RIGHT_BROW, LEFT_BROW):
            line = lm[ids]
            dist, t = _segment_distance(xy, line[:-1], line[1:])
            seg = dist.argmin(1)
            # Position along the brow from its inner end (0) to its tail (1) sets the half-width: 3.5 mm -> 1.8 mm.
            along = (seg + t[np.arange(len(xy)), seg]) / (len(ids) - 1)
            inner_is_last = ids == RIGHT_BROW
            along = 1.0 - along if inner_is_last else along
            half = 3.5 - 1.7 * along
            brow = np.minimum(brow, dist.min(1) / half)
        cheeks = np.zeros(len(xy))
        for a, b in ((2, 31), (14, 35)):
            c = 0.55 * lm[a] + 0.45 * lm[b]
            cheeks = np.maximum(cheeks, np.exp(-np.sum((xy - c) ** 2, 1) / (2 * 14.0**2)))
        return cls(lips, mouth_gap, sclera, iris, pupil, lid, brow, cheeks, xy)

    def albedo(self, who: Identity, rng: np.random.Generator) -> np.ndarray:
        """N×3 per-vertex colour of an identity (before shading); ``rng`` draws its skin texture and blush."""
        skin = np.tile(who.skin_rgb, (len(self.lips), 1))
        # Low-frequency skin variation (a few random plane waves over the face, ~3%) and cheek blush.
        variation = np.zeros(len(skin))
        for _ in range(4):
            k = rng.normal(0.0, 1.0 / 40.0, 2) * 2 * np.pi
            variation += np.cos(self.texture @ k + rng.uniform(0, 2 * np.pi))
        skin = skin * (1.0 + 0.015 * variation)[:, None]
        blush = rng.uniform(0.0, 0.12) * self.cheeks
        skin = skin * (1.0 - blush[:, None] * np.array([0.0, 0.5, 0.45]))

        color = skin
        color = _mix(color, who.lip_rgb, self.lips)
        color = _mix(color, who.lip_rgb * 0.35, self.mouth_gap)
        sclera_rgb = np.array([0.86, 0.83, 0.80]) * (0.9 + 0.1 * who.skin_rgb / who.skin_rgb.max())
        color = _mix(color, sclera_rgb, self.sclera)
        color = _mix(color, who.iris_rgb, self.iris)
        color = _mix(color, np.array([0.03, 0.03, 0.03]), self.pupil)
        color = _mix(color, who.brow_rgb * 0.6, 0.8 * self.lid_line)
        brow = np.clip((1.0 / who.brow_thickness - self.brow_distance) / 0.25 + 0.5, 0.0, 1.0)
        color = _mix(color, 0.85 * who.brow_rgb + 0.15 * who.skin_rgb, 0.9 * brow)
        return np.clip(color, 0.0, 1.0)


def _mix(color: np.ndarray, target: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return color + (np.asarray(target) - color) * weight[:, None]


# --------------------------------------------------------------------------------------------------------------------
# Sampling.


def identity_rng(seed: int, identity: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0, identity])


def texture_rng(seed: int, identity: int) -> np.random.Generator:
    return np.random.default_rng([seed, 2, identity])


def image_rng(seed: int, identity: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1, identity, index])


def sample_identity(cfg: SynthConfig, identity: int, shape_std: np.ndarray) -> Identity:
    rng = identity_rng(cfg.seed, identity)
    # Truncated at 2.5 sigma so no identity is a caricature; the spread is in units of 3DDFA_V2's 1-sigma.
    shape = np.clip(rng.standard_normal(N_SHAPE), -2.5, 2.5) * cfg.shape_sigma * shape_std
    tone = rng.uniform(0.0, 1.0) ** 1.3
    skin = (1 - tone) * SKIN_LIGHT + tone * SKIN_DARK + rng.normal(0.0, 0.02, 3)
    lip = skin * np.array([0.82, 0.55, 0.55]) * rng.uniform(0.85, 1.05) + rng.normal(0.0, 0.02, 3)
    iris = IRIS_PALETTE[rng.integers(len(IRIS_PALETTE))] * rng.uniform(0.8, 1.15)
    hair = HAIR_PALETTE[rng.integers(len(HAIR_PALETTE))] * rng.uniform(0.8, 1.15)
    # Brows always darker than the skin they sit on, so they read as brows.
    brow = np.minimum(hair, skin * 0.55)
    return Identity(
        identity=identity,
        shape=shape.astype(np.float32),
        skin_rgb=np.clip(skin, 0, 1),
        lip_rgb=np.clip(lip, 0, 1),
        iris_rgb=np.clip(iris, 0, 1),
        brow_rgb=np.clip(brow, 0, 1),
        brow_thickness=float(rng.uniform(0.75, 1.3)),
    )


def sample_image(
    cfg: SynthConfig, identity: int, index: int, exp_std: np.ndarray
) -> tuple[ImageSpec, np.random.Generator]:
    """The per-image draw, and the generator (continued) for the background and noise."""
    rng = image_rng(cfg.seed, identity, index)
    exp = np.clip(rng.standard_normal(N_EXP), -2.5, 2.5) * cfg.expression_sigma * exp_std
    limits = np.array([cfg.yaw_deg, cfg.pitch_deg, cfg.roll_deg])
    pose = np.radians(rng.uniform(-1, 1, 3) * limits)
    face_width = rng.uniform(*cfg.face_size) * cfg.canvas
    position = rng.uniform(0, 1, 2)
    # Moderate key light from the front-above: strong side light hides half the face from dlib's HOG detector.
    azimuth, elevation = np.radians(rng.uniform(-35, 35)), np.radians(rng.uniform(0, 40))
    light = np.array([np.sin(azimuth) * np.cos(elevation), np.sin(elevation), np.cos(azimuth) * np.cos(elevation)])
    ambient = rng.uniform(0.35, 0.55)
    diffuse = rng.uniform(0.55, 0.8)
    spec = ImageSpec(exp.astype(np.float32), pose, float(face_width), position, light, float(ambient), float(diffuse))
    return spec, rng


def make_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """H×W×3 float [0, 1]: a colour gradient, low-frequency colour noise, soft blobs and boxes, fine grain."""
    yy, xx = np.mgrid[0:size, 0:size] / size

    def color() -> np.ndarray:  # muted, like walls and rooms rather than a test chart
        c = rng.uniform(0, 1, 3)
        return c.mean() + (c - c.mean()) * rng.uniform(0.2, 0.8)

    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5) + 0.5
    c0, c1 = color(), color()
    image = c0 + (c1 - c0) * ramp[..., None]
    cells = int(rng.integers(3, 9))
    coarse = rng.normal(0.0, rng.uniform(0.03, 0.12), (cells, cells, 3)).astype(np.float32)
    image = image + cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(2, 9))):
        blob = color()
        cx, cy = rng.uniform(-0.1, 1.1, 2)
        if rng.uniform() < 0.6:  # soft ellipse
            rx, ry = rng.uniform(0.05, 0.35, 2)
            theta = rng.uniform(0, np.pi)
            u = (np.cos(theta) * (xx - cx) + np.sin(theta) * (yy - cy)) / rx
            v = (-np.sin(theta) * (xx - cx) + np.cos(theta) * (yy - cy)) / ry
            alpha = np.clip((1.0 - np.sqrt(u * u + v * v)) / rng.uniform(0.05, 0.8), 0, 1)
        else:  # axis-aligned box, hard edge (furniture, windows)
            hw, hh = rng.uniform(0.05, 0.4, 2)
            alpha = ((np.abs(xx - cx) < hw) & (np.abs(yy - cy) < hh)).astype(np.float64)
        image = image + (blob - image) * (alpha * rng.uniform(0.4, 1.0))[..., None]
    image = image + rng.normal(0.0, rng.uniform(0.0, 0.03), image.shape)
    return np.clip(image, 0.0, 1.0)


# --------------------------------------------------------------------------------------------------------------------
# Rendering one face.


def placement(bfm: BFMModel, pose: np.ndarray, face_width: float, center: np.ndarray, canvas: int) -> np.ndarray:
    """3×4 camera ``[s·R | t]`` putting the mean face's landmark centroid at ``center`` (image px) with the mean
    face's jaw width (landmarks 0-16) ``face_width`` px. Image row = canvas - y (3DDFA_V2)."""
    mean_lm = bfm.mean_shape[bfm.landmark_indices].double()
    ref_width = torch.linalg.norm(mean_lm[JAW[0]] - mean_lm[JAW[-1]])
    scale = torch.tensor([face_width], dtype=torch.float64) / ref_width
    angles = torch.as_tensor(pose, dtype=torch.float64)[None]
    rotated = pose_matrix(angles, scale, torch.zeros(1, 3, dtype=torch.float64))[0, :, :3] @ mean_lm.mean(0)
    target = torch.tensor([center[0], canvas - center[1], 0.0], dtype=torch.float64)
    return pose_matrix(angles, scale, (target - rotated)[None])[0].numpy()


def face_center(bfm: BFMModel, pose: np.ndarray, face_width: float, position: np.ndarray, canvas: int) -> np.ndarray:
    """Image position of the landmark centroid, ``position`` ∈ [0, 1]² across the range that keeps the mean face's
    posed landmarks at least 12% of the face width inside the canvas (room for other identities' shapes)."""
    camera = placement(bfm, pose, face_width, np.zeros(2), canvas)
    mean_lm = bfm.mean_shape[bfm.landmark_indices].double()
    rel = BFMModel.project(mean_lm[None], torch.from_numpy(camera)[None], canvas)[0, :, :2].numpy()
    margin = 0.12 * face_width
    low = margin - rel.min(0)
    high = canvas - 1 - margin - rel.max(0)
    # A face too large for the canvas stays centred rather than failing.
    return np.where(high > low, low + np.asarray(position) * (high - low), (low + high) / 2)


def render_face(
    bfm: BFMModel,
    albedo: np.ndarray,
    shape: np.ndarray,
    exp: np.ndarray,
    camera: np.ndarray,
    canvas: int,
    background: np.ndarray,
    light: tuple[float, float, float] | np.ndarray = (0.0, 0.0, 1.0),
    ambient: float = 0.4,
    diffuse: float = 0.7,
    supersample: int = 2,
) -> FaceRender:
    """Render a BFM face with per-vertex ``albedo`` under the 3×4 ``camera`` onto ``background`` (H×W×3 float)."""
    start = time.perf_counter()
    with torch.no_grad():
        verts = bfm.vertices(torch.as_tensor(shape)[None], torch.as_tensor(exp)[None])[0].double()
    cam = torch.as_tensor(camera, dtype=torch.float64)
    camera_space = BFMModel.project(verts[None], cam[None])[0].numpy()  # y up: normals for the light
    image_pts = np.stack([camera_space[:, 0], canvas - camera_space[:, 1], camera_space[:, 2]], 1)
    triangles = bfm.triangles.numpy()
    shade = lambert(vertex_normals(camera_space, triangles), light, ambient, diffuse)
    # Two-sided: BFM is an open mask, and where it turns away near its rim (far temple at large yaw) a real head
    # would still be there; its inside gets only ambient light since the outward normals face away.
    color, coverage = render_mesh(image_pts, triangles, albedo * shade[:, None], canvas, canvas, supersample, True)
    image = composite(color, coverage, background)
    elapsed = (time.perf_counter() - start) * 1000.0
    landmarks = image_pts[bfm.landmark_indices.numpy(), :2].astype(np.float32)
    return FaceRender(image, coverage >= 0.5, landmarks, np.asarray(camera, np.float64), elapsed)


class Synthesizer:
    """Renders identities and their images from a config; holds the BFM, the painted regions and 1σ units."""

    def __init__(self, cfg: SynthConfig, bfm: BFMModel | None = None):
        self.cfg = cfg
        self.bfm = bfm or load_bfm()
        self.regions = FaceRegions.from_bfm(self.bfm)
        stats = tddfa_coefficient_stats()
        self.shape_std, self.exp_std = stats["shape_std"], stats["exp_std"]

    def identity(self, identity: int) -> Identity:
        return sample_identity(self.cfg, identity, self.shape_std)

    def albedo(self, who: Identity) -> np.ndarray:
        return self.regions.albedo(who, texture_rng(self.cfg.seed, who.identity))

    def render(self, who: Identity, index: int, albedo: np.ndarray | None = None,
               scene: int | None = None) -> tuple[FaceRender, ImageSpec]:
        """Image ``index`` of ``who``. ``scene``: another identity id whose image ``index`` lends everything but the
        person (expression, pose, placement, light, background, grain): ``who`` rendered there is the exact face
        swap of ``who`` into that image (mfim.data.gt_swaps)."""
        cfg = self.cfg
        spec, rng = sample_image(cfg, who.identity if scene is None else int(scene), index, self.exp_std)
        background = make_background(rng, cfg.canvas)
        center = face_center(self.bfm, spec.pose, spec.face_width, spec.position, cfg.canvas)
        camera = placement(self.bfm, spec.pose, spec.face_width, center, cfg.canvas)
        albedo = self.albedo(who) if albedo is None else albedo
        out = render_face(
            self.bfm, albedo, who.shape, spec.exp, camera, cfg.canvas, background,
            spec.light, spec.ambient, spec.diffuse, cfg.supersample,
        )  # fmt: skip
        # Sensor grain over the whole photo, so the face is not cleaner than its background.
        grain = rng.normal(0.0, rng.uniform(0.0, 2.5), out.image.shape)
        out.image = np.clip(np.rint(out.image + grain), 0, 255).astype(np.uint8)
        return out, spec


# --------------------------------------------------------------------------------------------------------------------
# The data set: images under out_dir/images/{split}/, ground truth in out_dir/ground_truth.parquet.

_IMAGE_NAME = re.compile(r"^\d{5}_\d{2}\.png$")
_worker: Synthesizer | None = None


def image_key(split: str, identity: int, index: int) -> str:
    """'train/00012_03': the image's path under images/, without suffix."""
    return f"{split}/{identity:05d}_{index:02d}"


def _init_worker(cfg: SynthConfig) -> None:
    global _worker
    torch.set_num_threads(1)  # one process per core; also keeps float results independent of the worker count
    _worker = Synthesizer(cfg)


def render_identity(synth: Synthesizer, identity: int, split: str, images_dir: Path) -> list[dict]:
    """Render and write all images of one identity; their ground-truth rows."""
    from mfim.provenance import provenance_record, save_image

    cfg = synth.cfg
    who = synth.identity(identity)
    albedo = synth.albedo(who)
    record = provenance_record("synthetic", source=SOURCE)
    rows = []
    for index in range(cfg.images_per_identity):
        out, spec = synth.render(who, index, albedo)
        key = image_key(split, identity, index)
        save_image(images_dir / f"{key}.png", out.image, record)
        rows.append(
            {
                "key": key,
                "file": f"images/{key}.png",
                "identity": identity,
                "split": split,
                "index": index,
                "shape": who.shape.astype(float).tolist(),
                "exp": spec.exp.astype(float).tolist(),
                "yaw": float(spec.pose[0]),
                "pitch": float(spec.pose[1]),
                "roll": float(spec.pose[2]),
                "landmarks": out.landmarks.astype(float).reshape(-1).tolist(),
                "face_box": list(out.face_box),
                "pose_matrix": out.pose_matrix.reshape(-1).tolist(),
                "light": spec.light.tolist(),
                "skin_rgb": who.skin_rgb.tolist(),
                "lip_rgb": who.lip_rgb.tolist(),
                "iris_rgb": who.iris_rgb.tolist(),
                "brow_rgb": who.brow_rgb.tolist(),
                "brow_thickness": who.brow_thickness,
                "render_ms": out.render_ms,
            }
        )
    return rows


def _render_identity_in_worker(identity: int, split: str, images_dir: str) -> list[dict]:
    return render_identity(_worker, identity, split, Path(images_dir))


def _clear_previous(images_dir: Path) -> None:
    """Remove images an earlier run wrote (only our own file names), so a smaller config leaves no stale files."""
    for split in SPLITS:
        folder = images_dir / split
        if folder.is_dir():
            for path in folder.iterdir():
                if _IMAGE_NAME.match(path.name):
                    path.unlink()


def synthesize_dataset(
    cfg: SynthConfig, out_dir: str | Path, report_path: str | Path | None = None, progress: bool = True
):
    """Render the data set into ``out_dir`` and return its ground-truth table (a pandas DataFrame).

    Writes ``out_dir/images/{train,eval}/{identity:05d}_{index:02d}.png`` (provenance: synthetic, source
    'mfim-bfm-render') and ``out_dir/ground_truth.parquet``; with ``report_path`` also a JSON summary (counts,
    seconds, mean render ms). Rows are sorted by key. Pose is (yaw, pitch, roll) radians of the face as it appears in
    the image, 3DDFA_V2 convention; landmarks are 136 floats x0, y0, x1, y1, ... in image pixels.
    """
    import pandas as pd
    from tqdm import tqdm

    start = time.perf_counter()
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    _clear_previous(images_dir)
    jobs = cfg.identities()
    rows: list[dict] = []
    bar = tqdm(total=len(jobs) * cfg.images_per_identity, desc="synthesize", unit="img", disable=not progress)
    workers = max(1, int(cfg.render_workers))
    if workers == 1:
        synth = Synthesizer(cfg)
        for identity, split in jobs:
            rows += render_identity(synth, identity, split, images_dir)
            bar.update(cfg.images_per_identity)
    else:
        # spawn, not fork: a forked child inherits torch's thread pool state and can deadlock in it.
        context = get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(cfg,)) as pool:
            futures = [pool.submit(_render_identity_in_worker, i, split, str(images_dir)) for i, split in jobs]
            for future in as_completed(futures):
                rows += future.result()
                bar.update(cfg.images_per_identity)
    bar.close()

    table = pd.DataFrame(rows).sort_values("key", ignore_index=True)
    render_ms = table.pop("render_ms")
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out_dir / "ground_truth.parquet", index=False)
    seconds = time.perf_counter() - start
    if report_path is not None:
        report = {
            "images": int(len(table)),
            "images_per_split": {s: int((table["split"] == s).sum()) for s in SPLITS},
            "identities_per_split": {s: int(table.loc[table["split"] == s, "identity"].nunique()) for s in SPLITS},
            "canvas": cfg.canvas,
            "workers": workers,
            "seconds": round(seconds, 2),
            "mean_render_ms": round(float(render_ms.mean()), 2),
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        }
        report_path = Path(report_path)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    return table
