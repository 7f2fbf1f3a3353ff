"""3DMM encoders: 3DDFA_V2 conversion parity, parameter layout, pose behaviour on real photos, normaliser, factory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mfim.nets.deca import axis_angle_to_matrix
from mfim.nets.face_crops import image_to_tensor, warp
from mfim.nets.rotation import angles_to_matrix, matrix_to_angles
from mfim.nets.threedmm import (
    TDDFAEncoder,
    ThreeDMMNormalizer,
    build_threedmm_encoder,
    build_threedmm_normalizer,
    roi_box_from_face_box,
    roi_box_from_landmark_box,
)
from mfim.nets.types import ThreeDMMParams


@pytest.fixture(scope="module")
def tddfa():
    return TDDFAEncoder()


@pytest.fixture(scope="module")
def faces(photos):
    from mfim.nets.align import align_face
    from mfim.nets.landmarks import DlibFaceLandmarker

    lmk = DlibFaceLandmarker()
    out = {}
    for name, img in photos.items():
        face = lmk.largest(img)
        aligned = align_face(img, face.landmarks, 256)
        out[name] = (img, face, aligned.image, aligned.transform.rotation_deg)
    return out


def _rotate_on_screen(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate image content clockwise on screen by ``degrees`` about the centre."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    size = x.shape[-1]
    rot = np.array([[c, s], [-s, c]])  # output offset -> input offset
    m = np.zeros((2, 3))
    m[:, :2] = rot
    m[:, 2] = size / 2 - rot @ np.array([size / 2, size / 2])
    return warp(x, m, size)


def test_tddfa_matches_onnxruntime_and_any_batch(tddfa):
    import onnxruntime

    from mfim.assets import resolve

    session = onnxruntime.InferenceSession(str(resolve("tddfa_mb1_onnx")), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 120, 120, generator=torch.Generator().manual_seed(0)).clamp(-2, 2)
    with torch.no_grad():
        batched = tddfa.net(x)
        single = torch.cat([tddfa.net(x[i : i + 1]) for i in range(3)])
    reference = np.concatenate([session.run(None, {"input": x[i : i + 1].numpy()})[0] for i in range(3)])
    assert batched.shape == (3, 62)
    assert (batched - single).abs().max().item() <= 1e-4
    assert np.abs(batched.numpy() - reference).max() <= 1e-4


def test_decode_reads_the_62_layout():
    # a known scaled-orthographic camera s*[R | t] and known coefficients must come back out of decode()
    angles = torch.tensor([[0.3, -0.2, 0.1], [-0.5, 0.25, -0.3]], dtype=torch.float64)
    rot = angles_to_matrix(angles)
    p = torch.zeros(2, 62, dtype=torch.float64)
    p[:, :12] = torch.cat([7e-4 * rot, torch.tensor([[60.0], [70.0], [-60.0]]).expand(2, 3, 1)], 2).reshape(2, 12)
    p[:, 12:52] = torch.arange(40.0)
    p[:, 52:62] = -torch.arange(10.0)
    out = TDDFAEncoder.decode(p)
    assert torch.allclose(out.pose, angles, atol=1e-9)
    assert torch.equal(out.shape[0], torch.arange(40.0, dtype=torch.float64))
    assert torch.equal(out.exp[1], -torch.arange(10.0, dtype=torch.float64))


def test_output_types_shapes_and_gradient(tddfa):
    x = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1).requires_grad_(True)
    out = tddfa(x)
    assert isinstance(out, ThreeDMMParams)
    assert out.shape.shape == (2, 40) and out.exp.shape == (2, 10) and out.pose.shape == (2, 3)
    norm = tddfa.normalizer.normalize(out)
    (norm.shape.square().mean() + norm.exp.square().mean() + out.pose.square().mean()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in tddfa.parameters())


def test_mirror_negates_yaw_and_roll(faces, tddfa):
    x = torch.cat([image_to_tensor(faces[n][2]) for n in faces])
    with torch.no_grad():
        yaw, _, roll = torch.rad2deg(tddfa(x).pose).T
        yaw_m, _, roll_m = torch.rad2deg(tddfa(x.flip(-1)).pose).T
    turned = yaw.abs() > 3
    assert turned.sum() >= 3  # obama2 (~-17), obama3 (~12), biden (~10), partial face (~9) are turned
    assert (torch.sign(yaw[turned]) == -torch.sign(yaw_m[turned])).all(), (yaw, yaw_m)
    assert (yaw + yaw_m).abs().max() < 4.0, (yaw, yaw_m)
    assert (roll + roll_m).abs().max() < 4.0, (roll, roll_m)


def test_in_plane_rotation_moves_roll(faces, tddfa):
    x = torch.cat([image_to_tensor(faces[n][2]) for n in ("obama", "biden")])
    with torch.no_grad():
        roll0 = torch.rad2deg(tddfa(x).pose[:, 2])
        roll_cw = torch.rad2deg(tddfa(_rotate_on_screen(x, 15)).pose[:, 2])
    # project convention: content turned clockwise on screen gives negative roll
    assert ((roll_cw - roll0) - (-15)).abs().max() < 3.5, (roll0, roll_cw)


def test_photo_path_agrees_with_aligned_path(faces, tddfa):
    img, face, aligned, levelled_deg = faces["obama2"]
    with torch.no_grad():
        a = torch.rad2deg(tddfa(image_to_tensor(aligned)).pose[0])
        by_landmarks = torch.rad2deg(tddfa.from_photo(img, landmarks68=face.landmarks).pose[0])
        by_box = torch.rad2deg(tddfa.from_photo(img, box=face.box).pose[0])
    assert a[0] < -10  # obama2 looks towards the image's left
    assert abs(levelled_deg) > 3  # his head is tilted in the photo; alignment levels it
    for p in (by_landmarks, by_box):
        assert (p[:2] - a[:2]).abs().max() < 4.0, (p, a)
        # AlignTransform.rotation_deg > 0 turns photo content clockwise on screen into the aligned crop (a point
        # right of centre moves down), i.e. it adds -rotation_deg of roll: photo roll = aligned roll + rotation_deg
        assert abs(p[2] - (a[2] + levelled_deg)) < 2.5, (p, a, levelled_deg)


def test_roi_boxes_follow_3ddfa():
    """The crop regions 3DDFA_V2's published rule gives (utils/functions.py: parse_roi_box_from_landmark /
    parse_roi_box_from_bbox, then crop_img's int(round(.)) corners), worked by hand from its formula:
    landmark box [0, 0, 100, 50] (pixel indices): square side 100 about (50, 25), grown to 100 sqrt(2) = 141.42
    -> [-20.71, -45.71, 120.71, 95.71] -> rounded [-21, -46, 121, 96];
    detector box [0, 0, 100, 100]: size 100, centre (50, 50 + 14), side int(158) -> [-29, -15, 129, 143];
    detector box [20.3, 30.6, 120.1, 131.0]: size 100.1, centre (70.2, 80.8 + 14.014), side int(158.158) = 158
    -> [-8.8, 15.814, 149.2, 173.814] -> rounded [-9, 16, 149, 174];
    the aligned 256 px face: the canonical landmarks' index box [54.21, 96.96, 200.77, 238.19] (mfim.nets.align's
    FFHQ geometry, 0.5 px less than its continuous box): side 146.56 about (127.49, 167.58), grown to 207.27
    -> [23.85, 63.94, 231.12, 271.21] -> [24, 64, 231, 271]."""
    assert np.array_equal(roi_box_from_landmark_box([0, 0, 100, 50]), [-21, -46, 121, 96])
    assert np.array_equal(roi_box_from_face_box([0, 0, 100, 100]), [-29, -15, 129, 143])
    assert np.array_equal(roi_box_from_face_box([20.3, 30.6, 120.1, 131.0]), [-9, 16, 149, 174])
    assert np.array_equal(TDDFAEncoder.aligned_roi_box(256), [24, 64, 231, 271])


def test_photo_crop_samples_what_3ddfa_crops_and_resizes(tddfa):
    """An independent second path for the pixels: 3DDFA_V2 cuts ``img[sy:ey, sx:ex]`` at the rounded roi and
    cv2.resize(INTER_LINEAR)s it to 120 px; on a ramp image (R = column index, G = row index) our differentiable crop
    must read the same values. Landmarks' box [60.3, 70.2, 130.8, 125.6]: side 70.5 about (95.55, 97.9), grown to
    99.70 -> [45.70, 48.05, 145.40, 147.75] -> rounded [46, 48, 145, 148] (99 x 100 px, resized to 120 x 120).
    The former crop (continuous +0.5, unrounded) was 0.3-0.9 px off at 64-1024 px."""
    import cv2

    yy, xx = np.mgrid[0:200, 0:200]
    image = np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8)
    landmarks = np.array([[60.3, 70.2], [130.8, 125.6]] + [[100.0, 100.0]] * 66)
    got = ((tddfa.crop_photo(image, landmarks68=landmarks)[0].permute(1, 2, 0).numpy() + 1) * 127.5)
    want = cv2.resize(image[48:148, 46:145].astype(np.float32), (120, 120), interpolation=cv2.INTER_LINEAR)
    inner = (slice(2, -2), slice(2, -2))  # cv2 replicates the crop's edge; we read the image beyond it
    assert np.abs(got[inner][..., :2] - want[inner][..., :2]).max() < 2e-3


def test_normalizer_roundtrip_and_scale(faces, tddfa):
    norm = ThreeDMMNormalizer.from_tddfa_stats()
    assert norm.shape_std.shape == (40,) and norm.exp_std.shape == (10,)
    x = torch.cat([image_to_tensor(faces[n][2]) for n in faces])
    with torch.no_grad():
        p = tddfa(x)
    z = norm.normalize(p)
    back = norm.denormalize(z)
    assert torch.allclose(back.shape, p.shape, rtol=1e-5, atol=1e-2) and torch.allclose(back.exp, p.exp, atol=1e-5)
    assert torch.equal(z.pose, p.pose)
    # raw shape coefficients are ~1e5; standardised ones of real faces are O(1)
    assert p.shape.abs().max() > 1e3 and z.shape.abs().max() < 6 and z.exp.abs().max() < 6
    flame = ThreeDMMParams(torch.randn(2, 100), torch.randn(2, 50), torch.randn(2, 3))
    identity = build_threedmm_normalizer("deca").normalize(flame)  # FLAME codes are already in std units
    assert torch.equal(identity.shape, flame.shape) and torch.equal(identity.exp, flame.exp)


def test_axis_angle_pose_uses_project_angles():
    from scipy.spatial.transform import Rotation

    angles = torch.tensor([[0.4, -0.1, 0.2], [-0.2, 0.3, -0.05], [0.0, 0.0, 0.0]], dtype=torch.float64)
    rotvec = torch.from_numpy(Rotation.from_matrix(angles_to_matrix(angles).numpy()).as_rotvec())
    assert torch.allclose(matrix_to_angles(axis_angle_to_matrix(rotvec)), angles, atol=1e-7)


def test_factory(tmp_path):
    from mfim.assets import MissingAssetError

    assert isinstance(build_threedmm_encoder("tddfa"), TDDFAEncoder)
    with pytest.raises(ValueError, match="checkpoint"):
        build_threedmm_encoder("fitted")
    with pytest.raises(ValueError, match="unknown 3DMM encoder"):
        build_threedmm_encoder("bfm")
    with pytest.raises(MissingAssetError, match="deca_model.tar"):
        build_threedmm_encoder("deca", params={"nets": {"threedmm": {"deca_checkpoint": str(tmp_path / "nope.tar")}}})


def test_factory_fitted_regressor(tmp_path):
    from mfim.nets.threedmm_regressor import RegressorConfig, ThreeDMMRegressor, save_regressor

    path = save_regressor(ThreeDMMRegressor(RegressorConfig(input_size=32, width=8)), tmp_path / "r.pt", "gt", {})
    enc = build_threedmm_encoder("fitted", checkpoint=path)
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    out = enc(torch.zeros(2, 3, 64, 64))
    assert out.shape.shape == (2, 40) and out.pose.shape == (2, 3)
