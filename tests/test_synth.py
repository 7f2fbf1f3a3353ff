"""Renderer and synthetic data set: exact rasterisation, determinism, ground truth that matches the pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from mfim.data.render import interpolate, rasterize, render_mesh
from mfim.data.synth import (
    MIRROR_LANDMARKS,
    SynthConfig,
    Synthesizer,
    make_background,
    placement,
    render_face,
    synthesize_dataset,
)
from mfim.nets.rotation import angles_to_matrix, matrix_to_angles, normalize_pose_matrix
from tests.defaults import synth_config

CFG = synth_config(identities_train=3, identities_eval=2, images_per_identity=2, canvas=128, render_workers=1)


@pytest.fixture(scope="module")
def synth() -> Synthesizer:
    return Synthesizer(synth_config(identities_train=160, images_per_identity=8))


# --- renderer --------------------------------------------------------------------------------------------------------


def _square(z: float, x0: float, x1: float) -> tuple[np.ndarray, np.ndarray]:
    """Two viewer-facing triangles covering [x0, x1] × [2, 9] at depth z (counter-clockwise seen with y up)."""
    pts = np.array([[x0, 9, z], [x1, 9, z], [x1, 2, z], [x0, 2, z]], float)
    return pts, np.array([[0, 1, 2], [0, 2, 3]])


def test_rasterize_covers_exact_pixel_centres():
    pts, tri = _square(0.0, 2.0, 7.5)
    r = rasterize(pts, tri, 12, 12)
    expected = np.zeros((12, 12), bool)
    expected[2:10, 2:8] = True  # centres x in {2..7}, y in {2..9}; edges count as inside, no cracks on the diagonal
    np.testing.assert_array_equal(r.mask, expected)
    assert rasterize(pts, tri[:, [0, 2, 1]], 12, 12).mask.sum() == 0  # the same square facing away: culled


def test_rasterize_keeps_nearest_and_interpolates_linearly():
    near, tri = _square(5.0, 1.0, 6.0)
    far, _ = _square(-5.0, 4.0, 10.0)
    pts = np.concatenate([far, near])
    tris = np.concatenate([tri, tri + 4])
    r = rasterize(pts, tris, 12, 12)
    assert np.all(r.triangle[2:10, 1:7] >= 2)  # the near square wins where both cover
    assert np.all((r.triangle[2:10, 7:11] >= 0) & (r.triangle[2:10, 7:11] < 2))
    # Barycentric interpolation reproduces a linear function of position exactly.
    values = (2.0 * pts[:, 0] - 3.0 * pts[:, 1] + 1.0)[:, None]
    out = interpolate(r, tris, values)[..., 0]
    ys, xs = np.nonzero(r.mask)
    np.testing.assert_allclose(out[ys, xs], 2.0 * xs - 3.0 * ys + 1.0, atol=1e-5)


def test_supersampling_gives_fractional_edge_coverage():
    pts, tri = _square(0.0, 2.0, 7.2)
    color, coverage = render_mesh(pts, tri, np.ones((4, 3)), 12, 12, supersample=4)
    assert coverage[5, 4] == 1.0 and coverage[5, 10] == 0.0
    assert coverage[5, 7] == pytest.approx(0.75)  # pixel 7: samples at x = 6.625, 6.875, 7.125 (in), 7.375 (out)
    assert coverage[5, 2] == pytest.approx(0.5)  # pixel 2: 1.625, 1.875 out; 2.125, 2.375 in
    np.testing.assert_allclose(color[..., 0], coverage, atol=1e-6)


# --- sampling and ground truth ---------------------------------------------------------------------------------------


def test_identities_spread_and_splits(synth):
    cfg = synth.cfg
    shapes = np.stack([synth.identity(i).shape for i in range(200)])
    spread = shapes.std(0) / synth.shape_std
    assert abs(np.median(spread) - cfg.shape_sigma) < 0.2 * cfg.shape_sigma  # truncation at 2.5σ costs ~5%
    np.testing.assert_array_equal(synth.identity(7).shape, synth.identity(7).shape)
    assert not np.allclose(synth.identity(7).shape, synth.identity(8).shape)
    ids = cfg.identities()
    train = {i for i, s in ids if s == "train"}
    evals = {i for i, s in ids if s == "eval"}
    assert len(train) == cfg.identities_train and len(evals) == cfg.identities_eval and not train & evals


def _split_ids(cfg: SynthConfig, split: str) -> list[int]:
    return [i for i, s in cfg.identities() if s == split]


def test_eval_identity_offset_keeps_the_eval_people_while_train_grows():
    base = synth_config(identities_train=4, identities_eval=3, images_per_identity=8)
    grown = synth_config(identities_train=9, identities_eval=3, eval_identity_offset=4, images_per_identity=8)
    assert _split_ids(base, "eval") == _split_ids(grown, "eval") == [4, 5, 6]
    # the old train people first, then past the eval block
    assert _split_ids(grown, "train") == [0, 1, 2, 3, 7, 8, 9, 10, 11]
    assert not set(_split_ids(grown, "train")) & set(_split_ids(grown, "eval"))
    assert synth_config(identities_train=2, identities_eval=1, eval_identity_offset=7,
                        images_per_identity=8).identities() == [
        (0, "train"), (1, "train"), (7, "eval")]
    with pytest.raises(ValueError, match="eval_identity_offset"):
        synth_config(identities_train=2, eval_identity_offset=-1, images_per_identity=8).identities()


def test_render_is_deterministic(synth):
    who = synth.identity(3)
    a, spec_a = synth.render(who, 1)
    b, spec_b = synth.render(synth.identity(3), 1)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.landmarks, b.landmarks)
    np.testing.assert_array_equal(spec_a.pose, spec_b.pose)
    c, _ = synth.render(who, 2)
    assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() > 10


def test_landmarks_land_on_the_face(synth):
    for identity in range(4):
        who = synth.identity(identity)
        for index in range(2):
            out, spec = synth.render(who, index)
            lm = out.landmarks
            assert np.all((lm >= 0) & (lm < synth.cfg.canvas))
            inner = np.rint(lm[27:]).astype(int)  # nose, eyes, mouth
            assert out.mask[inner[:, 1], inner[:, 0]].all()
            # Brow tails turn onto the silhouette at large yaw: on it, never off the face.
            brows = np.rint(lm[17:27]).astype(int)
            assert ndimage.distance_transform_edt(~out.mask)[brows[:, 1], brows[:, 0]].max() < 2.0
            # In the face's own upright frame (undo the in-plane roll): brows above eyes above nose tip above mouth.
            roll = spec.pose[2]
            up = np.array([-np.sin(roll), -np.cos(roll)])  # image direction of the face's "up" (rows grow down)
            height = lm @ up
            assert height[17:27].mean() > height[36:48].mean() > height[30] > height[48:68].mean()
            x0, y0, x1, y1 = out.face_box
            assert x0 <= lm[17:, 0].min() and lm[17:, 0].max() < x1 and y0 <= lm[17:, 1].min() and lm[17:, 1].max() < y1


def test_pose_ground_truth_is_the_camera_rotation(synth):
    out, spec = synth.render(synth.identity(5), 3)
    _, rotation, _ = normalize_pose_matrix(torch.from_numpy(out.pose_matrix))
    np.testing.assert_allclose(matrix_to_angles(rotation).numpy(), spec.pose, atol=1e-9)


def _symmetric_render(synth, pose, center, canvas=160):
    """Mean face, uniform skin (so only geometry matters), given pose and landmark-centroid position."""
    camera = placement(synth.bfm, np.array(pose), 70.0, np.array(center), canvas)
    albedo = np.full((synth.bfm.n_vertices, 3), 0.7)
    bg = np.zeros((canvas, canvas, 3))
    return render_face(synth.bfm, albedo, np.zeros(40, np.float32), np.zeros(10, np.float32), camera, canvas, bg)


def test_mirror_negates_yaw_and_roll(synth):
    """The render of (-yaw, pitch, -roll) is the mirror image of (yaw, pitch, roll), landmarks relabelled L<->R."""
    canvas = 160
    yaw, pitch, roll = np.radians([25.0, 8.0, 10.0])
    a = _symmetric_render(synth, [yaw, pitch, roll], [70.0, 85.0], canvas)
    b = _symmetric_render(synth, [-yaw, pitch, -roll], [canvas - 1 - 70.0, 85.0], canvas)
    mirrored = a.mask[:, ::-1]
    iou = (mirrored & b.mask).sum() / (mirrored | b.mask).sum()
    assert iou > 0.97
    lm_mirror = a.landmarks[MIRROR_LANDMARKS] * [-1, 1] + [canvas - 1, 0]
    assert np.abs(lm_mirror - b.landmarks).max() < 1.5  # BFM's mean face is symmetric to ~1 mm
    # Sign, for the record: positive yaw turns the nose towards the image's right.
    eyes_mid = (a.landmarks[36] + a.landmarks[45]) / 2
    assert a.landmarks[30, 0] > eyes_mid[0] + 3
    assert b.landmarks[30, 0] < (b.landmarks[36, 0] + b.landmarks[45, 0]) / 2 - 3


def test_roll_is_the_in_plane_rotation(synth):
    """Landmarks at roll θ are those at roll 0 rotated about the anchor by θ, counter-clockwise as seen."""
    center = np.array([80.0, 80.0])
    theta = np.radians(12.0)
    a = _symmetric_render(synth, [0.3, -0.1, 0.0], center)
    b = _symmetric_render(synth, [0.3, -0.1, theta], center)
    rel = a.landmarks - center
    # Counter-clockwise on screen with rows growing downwards: (x, y) -> (x cos + y sin, -x sin + y cos).
    c, s = np.cos(theta), np.sin(theta)
    rotated = np.stack([rel[:, 0] * c + rel[:, 1] * s, -rel[:, 0] * s + rel[:, 1] * c], 1)
    np.testing.assert_allclose(rotated + center, b.landmarks, atol=1e-3)
    # And that is what R = Rz(roll) Ry(yaw) Rx(pitch) means: the roll is read back from the matrix.
    r = angles_to_matrix(torch.tensor([0.3, -0.1, theta], dtype=torch.float64))
    assert float(matrix_to_angles(r)[2]) == pytest.approx(theta)


def test_backgrounds_are_not_faces():
    import dlib

    detector = dlib.get_frontal_face_detector()
    hits = 0
    for i in range(12):
        bg = make_background(np.random.default_rng([0, 99, i]), 256)
        hits += len(detector((bg * 255).astype(np.uint8), 1))
    assert hits == 0


def test_dlib_finds_the_rendered_landmarks(synth):
    """dlib's 68-point predictor on a few renders agrees with the projected landmark vertices."""
    import dlib

    from mfim.assets import resolve

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(resolve("dlib_landmarks68")))
    errors, found, tried = [], 0, 0
    for identity in range(6):
        out, _ = synth.render(synth.identity(identity), 0)
        tried += 1
        boxes = detector(out.image, 1)
        if not boxes:
            continue
        found += 1
        shape = predictor(out.image, max(boxes, key=lambda b: b.area()))
        pred = np.array([[p.x, p.y] for p in shape.parts()], float)
        inter_ocular = np.linalg.norm(out.landmarks[36] - out.landmarks[45])
        # Brows, eyes, nose, mouth; the jaw points differ by definition (BFM contour vertices vs. visible outline).
        errors.append(np.linalg.norm(pred[17:] - out.landmarks[17:], axis=1).mean() / inter_ocular)
    assert found >= tried - 1
    assert np.median(errors) < 0.07 and max(errors) < 0.15, errors


def test_tddfa_recovers_the_pose(synth):
    """3DDFA_V2 (ONNX) on renders reads back the ground-truth pose: the convention, the y flip and roll all agree."""
    import cv2
    import onnxruntime as ort

    from mfim.assets import resolve
    from mfim.nets.bfm import tddfa_coefficient_stats

    session = ort.InferenceSession(str(resolve("tddfa_mb1_onnx")), providers=["CPUExecutionProvider"])
    stats = tddfa_coefficient_stats()
    mean = np.concatenate([stats["pose_mean"], stats["shape_mean"], stats["exp_mean"]])
    std = np.concatenate([stats["pose_std"], stats["shape_std"], stats["exp_std"]])
    errors = []
    for identity in range(8):
        out, spec = synth.render(synth.identity(identity), 1)
        # 3DDFA_V2's crop from landmarks: the square around their bounding box, enlarged to its diagonal.
        lo, hi = out.landmarks.min(0), out.landmarks.max(0)
        side = np.sqrt(2) * (hi - lo).max()
        x0, y0 = (lo + hi) / 2 - side / 2
        affine = np.array([[120 / side, 0, -x0 * 120 / side], [0, 120 / side, -y0 * 120 / side]])
        crop = cv2.warpAffine(out.image, affine, (120, 120), flags=cv2.INTER_LINEAR)[..., ::-1]  # BGR
        x = ((crop.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        param = session.run(None, {session.get_inputs()[0].name: x})[0][0] * std + mean
        _, rotation, _ = normalize_pose_matrix(torch.tensor(param[:12].reshape(3, 4), dtype=torch.float64))
        errors.append(np.degrees(matrix_to_angles(rotation).numpy() - spec.pose))
    err = np.abs(np.array(errors))
    assert np.median(err[:, 0]) < 4 and np.median(err[:, 1]) < 6 and np.median(err[:, 2]) < 3, err


# --- data set --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dataset_independent_of_worker_count(tmp_path):
    """Two worker processes write the same bytes and table as one (per-image seeds, no shared state)."""
    one = synthesize_dataset(CFG, tmp_path / "one", progress=False)
    two = synthesize_dataset(synth_config(**{**CFG.__dict__, "render_workers": 2}), tmp_path / "two", progress=False)
    assert one.equals(two)
    for file in one["file"]:
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "two" / file).read_bytes()


def test_dataset_layout_and_table(tmp_path):
    from mfim.provenance import read_record

    report = tmp_path / "reports" / "synthesize.json"
    table = synthesize_dataset(CFG, tmp_path / "raw", report_path=report, progress=False)
    n = (CFG.identities_train + CFG.identities_eval) * CFG.images_per_identity
    assert len(table) == n
    stored = __import__("pandas").read_parquet(tmp_path / "raw" / "ground_truth.parquet")
    assert stored["key"].tolist() == table["key"].tolist() == sorted(table["key"])
    row = stored.iloc[0]
    assert row["key"] == "eval/00003_00" and row["file"] == "images/eval/00003_00.png"
    assert len(row["shape"]) == 40 and len(row["exp"]) == 10
    assert len(row["landmarks"]) == 136 and len(row["face_box"]) == 4
    assert set(stored.groupby("split")["identity"].unique().map(tuple)) == {(0, 1, 2), (3, 4)}
    assert np.all(np.abs(stored["yaw"]) <= np.radians(CFG.yaw_deg))
    assert np.all(np.abs(stored["roll"]) <= np.radians(CFG.roll_deg))
    for _, r in stored.iterrows():
        path = tmp_path / "raw" / r["file"]
        image = np.asarray(Image.open(path))
        assert image.shape == (CFG.canvas, CFG.canvas, 3)
        lm = np.asarray(r["landmarks"]).reshape(68, 2)
        assert np.all((lm >= 0) & (lm < CFG.canvas))
    record = read_record(tmp_path / "raw" / stored.iloc[-1]["file"])
    assert record["kind"] == "synthetic" and record["source"] == "mfim-bfm-render"
    summary = json.loads(report.read_text())
    assert summary["images"] == n and summary["images_per_split"] == {"train": 6, "eval": 4}
    assert summary["mean_render_ms"] > 0
    # A smaller second run leaves no stale images behind.
    synthesize_dataset(synth_config(**{**CFG.__dict__, "identities_train": 1}), tmp_path / "raw", progress=False)
    assert len(list((tmp_path / "raw" / "images" / "train").glob("*.png"))) == CFG.images_per_identity
